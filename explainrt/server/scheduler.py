"""Request scheduler: a bounded queue in front of a pool of worker threads.

A full queue refuses a job at once (``QueueFull`` → RESOURCE_EXHAUSTED) instead of letting
latency grow without bound. Each job carries a ``cancel`` event: the RPC layer sets it when the
client goes away or the deadline passes, a queued job is then dropped without running, and a
running one stops between two chunks of masked passes (``Explainer.explain(cancel=...)``).

Jobs are independent: each worker runs one ``Explainer.explain`` at a time and the engine
takes concurrent calls (ONNX Runtime sessions are thread-safe; other engines are serialised
per model, see ``models.engine_lock``). Masked passes of one request are already batched by
the driver (``batch_size`` per engine call, any request size, never refused for it).

The base passes (and so whole FEM requests) of concurrent requests are *not* merged into one
engine batch. Measured on the 2-core CPU machine with EfficientNet-Lite0 at 224x224, ONNX
Runtime takes 16.9 ms per image at batch 1 and 15.6-16.0 ms at batch 2-8: a merge would save
under 8 % of a pass while adding a rendezvous point whose failures must fan out to every
request in it. On a GPU, where batch 1 leaves the device idle, a coalescing engine wrapper
(collect the base passes waiting at that moment, run them as one batch, hand each its row)
is the place to add it; the scheduler would not change.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable, Optional

from ..errors import ExplainRTError
from .logs import log_event

log = logging.getLogger(__name__)


class QueueFull(ExplainRTError):
    """The scheduler's queue is full; the client should retry later or slow down."""


class ShuttingDown(ExplainRTError):
    """The server is draining and takes no new work."""


class DeadlineExceeded(ExplainRTError):
    """The request's deadline passed before its work finished."""


@dataclasses.dataclass(eq=False)
class Job:
    """One unit of work: ``run(job)`` executes on a worker thread; its result lands in ``future``.

    ``deadline`` is a ``time.monotonic()`` instant (None: none); ``cancel`` stops the work.
    """

    run: Callable[["Job"], Any]
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    deadline: Optional[float] = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    enqueued_at: float = dataclasses.field(default_factory=time.perf_counter)
    started_at: Optional[float] = None
    name: str = "job"

    @property
    def queue_seconds(self) -> float:
        """Time spent waiting for a worker (0 until it starts)."""
        return 0.0 if self.started_at is None else self.started_at - self.enqueued_at

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


_STOP = object()


class Scheduler:
    """Runs jobs on ``workers`` threads from a queue of at most ``queue_size`` waiting jobs."""

    def __init__(self, workers: int, queue_size: int, name: str = "explainrt-worker"):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.workers = int(workers)
        self.queue_size = int(queue_size)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._accepting = True
        self._lock = threading.Lock()
        self._running = 0
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting for a worker."""
        return self._queue.qsize()

    @property
    def running(self) -> int:
        """Jobs a worker is executing now."""
        return self._running

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(self, job: Job, wait: Optional[float] = 0.0) -> concurrent.futures.Future:
        """Queue ``job``; raises ``QueueFull`` when no slot frees up within ``wait`` seconds.

        ``wait=0`` refuses at once (unary RPCs); ``wait=None`` blocks until a slot frees up or
        the job is cancelled (streams, whose clients are slowed down by flow control instead).
        """
        if not self._accepting:
            raise ShuttingDown("the server is shutting down and takes no new requests; retry on another replica")
        job.enqueued_at = time.perf_counter()
        if wait == 0.0:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(self._full_message()) from None
            return job.future
        limit = None if wait is None else time.monotonic() + wait
        while True:
            if job.cancel.is_set():
                raise DeadlineExceeded("the request was cancelled while waiting for a queue slot") \
                    if job.expired() else _cancelled("while waiting for a queue slot")
            if not self._accepting:
                raise ShuttingDown("the server is shutting down and takes no new requests; retry on another replica")
            step = 0.05 if limit is None else min(0.05, limit - time.monotonic())
            if step <= 0:
                raise QueueFull(self._full_message())
            try:
                self._queue.put(job, timeout=step)
                return job.future
            except queue.Full:
                continue

    def _full_message(self) -> str:
        return (f"the server's queue is full ({self.queue_size} requests waiting for {self.workers} workers); "
                "retry with backoff, or start the server with a larger --queue-size / more --workers")

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            future = job.future
            if job.cancel.is_set() or job.expired():
                future.set_exception(DeadlineExceeded("the deadline passed while the request waited in the queue")
                                     if job.expired() else _cancelled("before a worker started it"))
                continue
            if not future.set_running_or_notify_cancel():
                continue
            job.started_at = time.perf_counter()
            with self._lock:
                self._running += 1
            try:
                result = job.run(job)
            except BaseException as exc:  # delivered to the waiting RPC, which maps it to a status
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                with self._lock:
                    self._running -= 1

    def close(self) -> None:
        """Stop taking new jobs; queued and running ones still finish."""
        self._accepting = False

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Close, let the workers finish what is queued, and join them; True if all stopped in time."""
        self.close()
        end = None if timeout is None else time.monotonic() + timeout
        for _ in self._threads:  # after every queued job (FIFO); a full queue must not outlast the timeout
            try:
                self._queue.put(_STOP, timeout=None if end is None else max(0.001, end - time.monotonic()))
            except queue.Full:
                break
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log_event(log, "scheduler_shutdown_timeout", logging.WARNING, workers_still_running=len(alive))
        return not alive


def _cancelled(when: str) -> ExplainRTError:
    from ..explainers.driver import Cancelled

    return Cancelled(f"the request was cancelled {when}")
