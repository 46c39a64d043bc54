"""Request scheduler: cost-aware, deadline-aware and memory-budgeted, in front of a pool of worker threads.

Every request's cost is known before it runs (``Job.cost``: the forward passes it will take at
most, from the method and its parameters) and so is its memory (``Job.memory``: what it holds
while it runs). The scheduler uses both:

- **Order: shortest expected first, with aging.** A waiting job's key is its arrival time plus
  its own expected run time (cost × the measured seconds per pass). A one-pass FEM request that
  arrives while a 500-pass Score-CAM request waits overtakes it; the Score-CAM request in turn
  waits at most about its own run time longer than first-come-first-served would make it, so
  nothing starves. ``Job.priority`` (higher first) orders before the key.
- **A lane for cheap requests.** Jobs of at most ``cheap_passes`` passes may use every worker
  thread; expensive ones at most ``workers`` of them. The ``cheap_workers`` threads beyond those
  are the cheap lane: a one-pass request never waits for a 500-pass request to finish, and
  several run at once, so their engine calls can share batches (``batcher``).
- **A memory budget.** The jobs running at once hold at most ``memory_budget`` bytes together;
  a job that does not fit waits (jobs behind it that fit may start meanwhile, unless it has
  waited longer than its own expected run time); one that could never fit is refused at once.
- **Dead work leaves at once.** A job whose ``cancel`` is set (the client went away) leaves the
  queue the moment it is set, and a job past its deadline no longer counts against
  ``queue_size``: a full queue of dead requests never refuses a live one.
- **No work that would be wasted.** An expensive job with a deadline leaves the queue
  (DEADLINE_EXCEEDED) as soon as it could no longer finish in time even if it started now, at the
  measured pace: started, it would be cancelled half-way, its passes wasted and the jobs behind it
  delayed. It is not refused earlier for the work queued ahead of it: that estimate changes as
  cheap traffic comes and goes, and clients refused early send other work at once (measured with
  ``serve_bench --scenario mixed``: SIDU/Score-CAM throughput fell 6×, see benchmarks/RESULTS.md).
  Cheap jobs are never refused for this.

A full queue refuses a job at once (``QueueFull`` → RESOURCE_EXHAUSTED) instead of letting
latency grow without bound. A running job stops between two chunks of masked passes once its
``cancel`` is set (``Explainer.explain(cancel=...)``).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Optional

from ..errors import ExplainRTError
from .logs import log_event

log = logging.getLogger(__name__)

INITIAL_SECONDS_PER_PASS = 0.005  # until the first job has been measured
SECONDS_PER_PASS_SMOOTHING = 0.2  # weight of the newest job in the running estimate


class QueueFull(ExplainRTError):
    """The scheduler's queue is full; the client should retry later or slow down."""


class OverBudget(ExplainRTError):
    """The request needs more memory than the server's whole budget (→ RESOURCE_EXHAUSTED)."""


class ShuttingDown(ExplainRTError):
    """The server is draining and takes no new work."""


class DeadlineExceeded(ExplainRTError):
    """The request's deadline passed before its work finished."""


class CancelEvent(threading.Event):
    """A ``threading.Event`` that also calls its callbacks once, on the first ``set()``."""

    def __init__(self):
        super().__init__()
        self._callbacks: list = []
        self._callback_lock = threading.Lock()

    def add_callback(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` when the event is set (at once if it already is)."""
        with self._callback_lock:
            if not self.is_set():
                self._callbacks.append(fn)
                return
        fn()

    def set(self) -> None:
        with self._callback_lock:
            if self.is_set():
                return
            super().set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()


@dataclasses.dataclass(eq=False)
class Job:
    """One unit of work: ``run(job)`` executes on a worker thread; its result lands in ``future``.

    ``deadline`` is a ``time.monotonic()`` instant (None: none); setting ``cancel`` stops the work.
    ``cost`` is the forward passes the job takes at most, ``memory`` the bytes it holds while it
    runs, ``priority`` orders it before cost (higher first), ``method`` labels its metrics.
    """

    run: Callable[["Job"], Any]
    cancel: CancelEvent = dataclasses.field(default_factory=CancelEvent)
    deadline: Optional[float] = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    enqueued_at: float = dataclasses.field(default_factory=time.perf_counter)
    started_at: Optional[float] = None
    name: str = "job"
    cost: float = 1.0
    memory: int = 0
    priority: int = 0
    method: str = ""
    key: float = 0.0  # set by the scheduler: arrival + expected run time

    @property
    def queue_seconds(self) -> float:
        """Time spent waiting for a worker (0 until it starts)."""
        return 0.0 if self.started_at is None else self.started_at - self.enqueued_at

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def dead(self) -> bool:
        """Cancelled or past its deadline: its result is of no use to anyone."""
        return self.cancel.is_set() or self.expired()


class Scheduler:
    """Runs jobs on ``workers + cheap_workers`` threads from a queue of at most ``queue_size`` waiting jobs.

    At most ``workers`` expensive jobs run at once; ``cheap_passes``: jobs of at most this cost
    form the cheap lane, which may use every thread. ``memory_budget``: bytes the
    running jobs may hold together (None: no budget). ``on_dequeue(job, seconds)`` is called when
    a job leaves the queue, started or dropped, with the time it waited (metrics of queue wait).
    """

    def __init__(self, workers: int, queue_size: int, name: str = "explainrt-worker", cheap_passes: float = 8,
                 cheap_workers: int = 0, memory_budget: Optional[int] = None,
                 on_dequeue: Optional[Callable[[Job, float], None]] = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if cheap_workers < 0:
            raise ValueError(f"cheap_workers must be >= 0, got {cheap_workers}")
        self.workers = int(workers)
        self.cheap_workers = int(cheap_workers)
        self.queue_size = int(queue_size)
        self.cheap_passes = float(cheap_passes)
        self.memory_budget = memory_budget
        self.seconds_per_pass = INITIAL_SECONDS_PER_PASS
        self._paced = False  # an expensive job has been measured: seconds_per_pass is real
        self._on_dequeue = on_dequeue
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._running = 0
        self._running_expensive = 0
        self._memory_in_use = 0
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers + cheap_workers)]
        for thread in self._threads:
            thread.start()

    # ---- state ---------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Live jobs waiting for a worker (cancelled and expired ones are not counted)."""
        with self._cond:
            self._prune()
            return len(self._pending)

    @property
    def running(self) -> int:
        """Jobs a worker is executing now."""
        return self._running

    @property
    def memory_in_use(self) -> int:
        """Bytes held by the running jobs (their estimates)."""
        return self._memory_in_use

    @property
    def accepting(self) -> bool:
        return self._accepting

    def cheap(self, job: Job) -> bool:
        """Whether ``job`` belongs to the cheap lane."""
        return job.cost <= self.cheap_passes

    def expected_seconds(self, job: Job) -> float:
        """The job's expected run time from its cost and the measured seconds per forward pass."""
        return job.cost * self.seconds_per_pass

    # ---- submitting -----------------------------------------------------------------------
    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue ``job``; raises ``QueueFull``, ``OverBudget`` or ``ShuttingDown`` at once when it cannot be."""
        if self.memory_budget is not None and job.memory > self.memory_budget:
            raise OverBudget(
                f"the request needs about {job.memory / 2**20:.0f} MiB while it runs, more than this server's whole "
                f"memory budget of {self.memory_budget / 2**20:.0f} MiB (--memory-budget-mib): ask for less work "
                "(a smaller image, MAP_SIZE_MODEL_INPUT, fewer targets or masks)")
        with self._cond:
            if not self._accepting:  # under the lock: a job is never queued after the workers left
                raise ShuttingDown("the server is shutting down and takes no new requests; retry on another replica")
            self._prune()
            if len(self._pending) >= self.queue_size:
                raise QueueFull(self._full_message())
            job.enqueued_at = time.perf_counter()
            job.key = job.enqueued_at + self.expected_seconds(job)
            self._pending.append(job)
            self._cond.notify_all()
        job.cancel.add_callback(lambda: self._drop(job))
        return job.future

    def _full_message(self) -> str:
        return (f"the server's queue is full ({self.queue_size} requests waiting for {self.workers} workers); "
                "retry with backoff, or start the server with a larger --queue-size / more --workers")

    def _drop(self, job: Job) -> None:
        """A cancelled job leaves the queue at once (its RPC is told why)."""
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                return  # already running or finished
        self._fail_dead(job, "before a worker started it")

    def _prune(self) -> None:
        """Remove dead and hopeless jobs from the queue (under the lock) and fail their futures."""
        dead = [job for job in self._pending if job.dead()]
        hopeless = {job: own for job, own in self._hopeless().items() if job not in dead}  # each leaves once
        if dead or hopeless:
            gone = set(dead) | set(hopeless)
            self._pending = [job for job in self._pending if job not in gone]
            for job in dead:
                self._fail_dead(job, "before a worker started it")
            for job, own in hopeless.items():
                self._dequeued(job)
                left = job.deadline - time.monotonic()
                settle(job.future, DeadlineExceeded(
                    f"the request would not finish before its deadline: at this server's pace it needs {own:.1f} s "
                    f"and has {left:.1f} s left, so it was not started; retry later or on another replica, give it "
                    "a longer deadline, or ask for less work"))

    def _hopeless(self) -> dict:
        """The waiting expensive jobs that could no longer finish before their deadlines even if they
        started now, at the measured seconds per pass (under the lock): ``{job: seconds it would run}``.
        Nothing is refused before one expensive job has been measured; cheap jobs never are."""
        if not self._paced:
            return {}
        now = time.monotonic()
        return {job: job.cost * self.seconds_per_pass for job in self._pending
                if job.deadline is not None and not self.cheap(job)
                and now + job.cost * self.seconds_per_pass > job.deadline}

    def _fail_dead(self, job: Job, when: str) -> None:
        self._dequeued(job)
        if job.expired():
            settle(job.future, DeadlineExceeded("the deadline passed while the request waited in the queue"))
        else:
            settle(job.future, _cancelled(when))

    def _dequeued(self, job: Job) -> None:
        if self._on_dequeue is not None:
            try:
                self._on_dequeue(job, time.perf_counter() - job.enqueued_at)
            except Exception:  # noqa: BLE001 (metrics must not break scheduling)
                log.exception("on_dequeue failed")

    # ---- choosing ---------------------------------------------------------------------------
    def _eligible(self, job: Job) -> bool:
        if not self.cheap(job) and self._running_expensive >= self.workers:
            return False  # the other threads are the cheap lane
        return self.memory_budget is None or self._memory_in_use + job.memory <= self.memory_budget

    def _next(self) -> Optional[Job]:
        """The best job that may start now (under the lock), or None."""
        self._prune()
        ranked = sorted(self._pending, key=lambda j: (-j.priority, j.key))
        now = time.perf_counter()
        for job in ranked:
            if self._eligible(job):
                return job
            # A job that has waited past its own expected run time holds back the lower-ranked
            # jobs that would keep taking the memory it needs (no starvation by the budget).
            if (self.memory_budget is not None and not self.cheap(job) and
                    now - job.enqueued_at > self.expected_seconds(job) and
                    self._memory_in_use + job.memory > self.memory_budget):
                return None
        return None

    def _work(self) -> None:
        while True:
            try:
                if not self._work_one():
                    return
            except Exception:  # noqa: BLE001 (a worker thread must outlive a bug in one job's bookkeeping)
                log.exception("scheduler worker error")

    def _work_one(self) -> bool:
        """Take and run one job; False once the scheduler has stopped."""
        with self._cond:
            job = None
            while not self._stopping or self._pending:
                job = self._next()
                if job is not None:
                    break
                self._cond.wait(0.25)  # also re-checks deadlines now and then
            if job is None:
                return False
            self._pending.remove(job)
            if not job.future.set_running_or_notify_cancel():
                return True
            cheap = self.cheap(job)
            self._running += 1
            self._running_expensive += 0 if cheap else 1
            self._memory_in_use += job.memory
        job.started_at = time.perf_counter()
        self._dequeued(job)
        error, result = None, None
        try:
            result = job.run(job)
        except BaseException as exc:  # delivered to the waiting RPC, which maps it to a status
            error = exc
        with self._cond:  # the worker is free before its caller hears back
            self._running -= 1
            self._running_expensive -= 0 if cheap else 1
            self._memory_in_use -= job.memory
            self._cond.notify_all()
        if error is not None:
            settle(job.future, error)
        else:
            self._measured(job, time.perf_counter() - job.started_at)
            settle(job.future, result=result)
        return True

    def _measured(self, job: Job, seconds: float) -> None:
        """Update the seconds-per-pass estimate that turns costs into expected run times.

        Only expensive jobs count: a one-pass job's time is mostly decoding and the response, which
        would make every masked pass look as slow as a whole request.
        """
        if not self.cheap(job) and seconds > 0:
            per_pass = seconds / job.cost
            if not self._paced:
                self.seconds_per_pass, self._paced = per_pass, True
            else:
                self.seconds_per_pass += SECONDS_PER_PASS_SMOOTHING * (per_pass - self.seconds_per_pass)

    # ---- stopping -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop taking new jobs; queued and running ones still finish."""
        self._accepting = False

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Close, let the workers finish what is queued, and join them; True if all stopped in time."""
        self.close()
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            with self._cond:  # what is still queued will not run: tell its callers
                left, self._pending = self._pending, []
            for job in left:
                settle(job.future, ShuttingDown("the server stopped before this request could run"))
            log_event(log, "scheduler_shutdown_timeout", logging.WARNING, workers_still_running=len(alive))
        return not alive


def settle(future: concurrent.futures.Future, error: Optional[BaseException] = None, result: Any = None) -> None:
    """Resolve ``future`` unless it already is: the event loop may cancel it at the same moment
    (the RPC ended), and a worker must not die of ``InvalidStateError`` for that."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _cancelled(when: str) -> ExplainRTError:
    from ..explainers.driver import Cancelled

    return Cancelled(f"the request was cancelled {when}")
