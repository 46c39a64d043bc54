"""Cross-request batching: engine calls of concurrent requests for one model share engine batches.

``BatchingEngine`` wraps a model's engine and keeps its contract (``run``/``infer``/
``base_pass``/...), so the explainer and its driver do not change. Calls from the worker
threads wait in a queue; an executor thread takes what is waiting, packs it into one batch of at
most ``max_batch`` rows (cheap requests' calls first), runs it once, and hands every caller its
own rows. This is Triton's dynamic batcher applied to what explanation traffic sends an engine:

- the base pass of every request (the whole of FEM) is a batch of 1: concurrent requests'
  base passes become one engine call;
- a request's last chunk of masked passes is a partial batch: chunks of different requests
  fill one batch together. A full chunk (``max_batch`` rows) runs as it is, without a copy.

``max_queue_delay_s``: once a batch has room, how long the executor waits for more calls,
but only while other requests for this model are in flight and could still send one (a lone
request never waits). ``express``: a second engine instance with an executor of its own that
runs only calls of cheap requests, so a one-pass request never waits behind a full chunk of a
500-pass one (the server gives ONNX Runtime models one: a second session, whose thread pool
runs at normal priority while the main session's runs at a lower one, ``bulk_nice``). Without
one, a call that has waited ``AGED_CALL_S`` goes first, so cheap calls never starve a full chunk.

A failure of a merged call is retried call by call, so one request's bad input fails that
request only. On a GPU the executor runs on its own thread and CUDA stream: inputs and outputs
cross between the threads through the engine contract's ``handoff``/``receive`` (an event on
the producer's stream that the consumer's stream waits for; nothing to do on the CPU).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Optional, Sequence

from ..runtime.base import Engine
from .logs import log_event
from .scheduler import settle

log = logging.getLogger(__name__)

# Express executors run at once (their ONNX Runtime session takes concurrent runs): one batch's
# Python work (packing, slicing, hand-back) overlaps the other's engine run.
EXPRESS_EXECUTORS = 2
# A call that has waited this long goes first whatever its lane: without an express instance,
# a stream of one-image calls would otherwise keep a full chunk (which never fits beside them) waiting.
AGED_CALL_S = 0.05
WAIT_SLICE_S = 0.25  # a caller waiting for its call looks at its request's cancel event this often
_context = threading.local()  # per worker thread: the request it runs (cheap or not, its cancel event)


@contextlib.contextmanager
def request_scope(engine: Engine, cheap: bool, cancel: Optional[threading.Event] = None):
    """Around one request's explanation on a worker thread: its calls are ranked as ``cheap`` ones,
    a call still queued when ``cancel`` is set is withdrawn, and the engine (when it is a
    ``BatchingEngine``) knows one more request may send calls."""
    previous = getattr(_context, "cheap", False), getattr(_context, "cancel", None)
    _context.cheap, _context.cancel = cheap, cancel
    batching = isinstance(engine, BatchingEngine)
    if batching:
        engine._enter(cheap)
    try:
        yield
    finally:
        _context.cheap, _context.cancel = previous
        if batching:
            engine._leave(cheap)


@dataclasses.dataclass(eq=False)
class _Call:
    ticket: Any  # Engine.handoff of the caller's input: valid on the executor's stream once received
    rows: int
    names: list
    cheap: bool
    arrived: float
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


class BatchStats:
    """Counters of the batcher (engine calls, rows, calls merged), for metrics and the benchmark."""

    def __init__(self):
        self.engine_calls = 0
        self.calls = 0
        self.rows = 0
        self.merged_calls = 0  # calls that shared an engine call with another one
        self._lock = threading.Lock()

    def add(self, calls: int, rows: int) -> None:
        with self._lock:
            self.engine_calls += 1
            self.calls += calls
            self.rows += rows
            self.merged_calls += calls if calls > 1 else 0


class BatchingEngine(Engine):
    """``engine`` with the calls of concurrent requests merged into shared engine batches."""

    def __init__(self, engine: Engine, max_queue_delay_s: float = 0.002, express: Optional[Engine] = None,
                 name: str = "model", on_batch=None, bulk_nice: int = 0):
        super().__init__(engine.metadata, engine.max_batch)
        self.engine = engine
        self.xp = engine.xp
        self.backend = engine.backend
        self.device = engine.device
        self.input_dtype = engine.input_dtype
        self.max_queue_delay_s = max(0.0, float(max_queue_delay_s))
        self.stats = BatchStats()
        self._on_batch = on_batch  # on_batch(calls, rows) after each engine call (metrics)
        self._queue: list[_Call] = []
        self._cond = threading.Condition()
        # Requests in flight that may send calls, and of them those blocked on a call, by lane (cheap or not).
        self._requests = {True: 0, False: 0}
        self._waiting = {True: 0, False: 0}
        self._executing = 0  # engine runs under way (executors' batches and lone requests' own calls)
        # Engines without an express instance take one run at a time (TensorRT contexts, torch CUDA graphs).
        self._max_executing = 1 + EXPRESS_EXECUTORS if express is not None else 1
        self._closed = False
        self.bulk_nice = bulk_nice if express is not None else 0
        self._threads = [threading.Thread(target=self._execute, args=(False,), name=f"explainrt-batch-{name}",
                                          daemon=True)]
        self.express = express  # the express executor's own engine instance (its own threads / stream)
        if express is not None:
            self._threads += [threading.Thread(target=self._execute, args=(True,), daemon=True,
                                               name=f"explainrt-batch-{name}-express-{i}")
                              for i in range(EXPRESS_EXECUTORS)]
        for thread in self._threads:
            thread.start()

    # ---- the engine contract ------------------------------------------------------------------
    @property
    def inputs(self):
        return self.engine.inputs

    @property
    def outputs(self):
        return self.engine.outputs

    def _run(self, inputs: dict, output_names: Sequence[str]) -> dict:
        cheap = getattr(_context, "cheap", False)
        with self._cond:
            # A lone request runs its calls on its own thread: no hand-over to an executor and back.
            direct = (not self._closed and sum(self._requests.values()) <= 1 and not self._queue
                      and self._executing == 0)
            if direct:
                self._executing += 1
        if direct:
            try:
                engine = self.express if cheap and self.express is not None else self.engine
                out = engine.run(inputs, output_names)
                self._count(1, int(inputs[self.metadata.input_name].shape[0]))
                return out
            finally:
                with self._cond:
                    self._executing -= 1
                    self._cond.notify_all()
        x = inputs[self.metadata.input_name]
        call = _Call(self.engine.handoff({"x": x}), int(x.shape[0]), list(output_names), cheap, time.perf_counter())
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.append(call)
            self._waiting[cheap] += 1
            self._cond.notify_all()
        try:
            ticket = self._wait(call, getattr(_context, "cancel", None))
        finally:
            with self._cond:
                self._waiting[cheap] -= 1
        return self.engine.receive(ticket)

    def _wait(self, call: _Call, cancel: Optional[threading.Event]):
        """The call's result; a call still queued when its request is cancelled is withdrawn (Cancelled)."""
        while True:
            try:
                return call.future.result(WAIT_SLICE_S)
            except concurrent.futures.TimeoutError:
                if cancel is None or not cancel.is_set():
                    continue
                with self._cond:
                    if call not in self._queue:
                        continue  # already running: its result comes soon
                    self._queue.remove(call)
                from ..explainers.driver import Cancelled

                raise Cancelled("the request was cancelled while its engine call waited for a batch") from None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(5)
        self.engine.close()
        if self.express is not None:
            self.express.close()

    # ---- requests in flight --------------------------------------------------------------------
    def _enter(self, cheap: bool) -> None:
        with self._cond:
            self._requests[cheap] += 1

    def _leave(self, cheap: bool) -> None:
        with self._cond:
            self._requests[cheap] -= 1
            self._cond.notify_all()

    # ---- the executor ---------------------------------------------------------------------------
    def _mine(self, call: _Call, express: bool) -> bool:
        """Whether an executor takes ``call``: with an express executor, cheap calls are its alone (a
        one-image call merged into a 64-image batch would wait for all of it)."""
        return call.cheap == express if self.express is not None else True

    def _take(self, express: bool) -> list[_Call]:
        """Calls for one engine batch (under the lock): cheap requests' calls first, then by arrival."""
        queue = [c for c in self._queue if self._mine(c, express)]
        if not queue:
            return []
        aged = time.perf_counter() - AGED_CALL_S
        order = sorted(queue, key=lambda c: (c.arrived > aged, not c.cheap, c.arrived))  # aged calls, then cheap
        batch, rows = [], 0
        for call in order:
            if rows + call.rows > self.max_batch:
                if batch:
                    continue  # a smaller call further down may still fit
                batch, rows = [call], call.rows  # (a call is never larger than max_batch)
                break
            batch.append(call)
            rows += call.rows
            if rows == self.max_batch:
                break
        for call in batch:
            self._queue.remove(call)
        return batch

    def _more_may_come(self, rows: int, express: bool) -> bool:
        """Whether waiting could fill the batch: room left, and requests in flight that could send this
        executor a call and are not yet waiting on one (with an express instance, only its lane counts)."""
        if rows >= self.max_batch:
            return False
        if self.express is None:
            return sum(self._requests.values()) > sum(self._waiting.values())
        return self._requests[express] > self._waiting[express]

    def _execute(self, express: bool) -> None:
        if not express:
            lower_thread_priority(self.bulk_nice)
        while True:
            with self._cond:
                while not self._closed and not any(self._mine(c, express) for c in self._queue):
                    self._cond.wait()
                if self._closed:
                    self._fail_all()
                    return
                while self._executing >= self._max_executing and not self._closed:
                    self._cond.wait()
                batch = self._take(express)
                if not batch:
                    continue
                self._executing += 1  # the slot is held from here, the batching window included
                if self.max_queue_delay_s > 0:
                    end = time.perf_counter() + self.max_queue_delay_s
                    while self._more_may_come(sum(c.rows for c in batch), express):
                        left = end - time.perf_counter()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                        if self._closed:
                            break
                        self._queue.extend(batch)  # re-pack with what arrived, in rank order
                        batch = self._take(express)
            try:
                self._run_batch(batch, self.express if express else self.engine)
            except BaseException as exc:  # noqa: BLE001 (the executor must outlive any failure)
                log_event(log, "batch_executor_error", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
                for call in batch:
                    settle(call.future, exc)
            finally:
                with self._cond:
                    self._executing -= 1
                    self._cond.notify_all()

    def _run_batch(self, batch: list[_Call], engine: Engine) -> None:
        names = list(dict.fromkeys(n for call in batch for n in call.names))
        rows = sum(call.rows for call in batch)
        try:
            # Read-only while each caller waits for its answer: no device copy of every chunk.
            xs = [self.engine.receive(call.ticket, copy=False)["x"] for call in batch]
            x = xs[0] if len(batch) == 1 else self.xp.concatenate(xs, axis=0)
            out = engine.run({self.metadata.input_name: x}, names)
        except Exception as exc:
            if len(batch) == 1:
                settle(batch[0].future, exc)
                return
            log_event(log, "batch_failed_retrying_alone", logging.WARNING, calls=len(batch), error=str(exc))
            for call in batch:  # one request's failure must not fail its batch-mates
                self._run_batch([call], engine)
            return
        try:
            self._count(len(batch), rows)
        except Exception as exc:  # noqa: BLE001 (metrics must not fail requests)
            log_event(log, "batch_metrics_failed", logging.WARNING, error=str(exc))
        start = 0
        for call in batch:
            stop = start + call.rows
            try:
                part = {n: out[n] if len(batch) == 1 else out[n][start:stop] for n in call.names}
                settle(call.future, result=self.engine.handoff(part))
            except Exception as exc:  # noqa: BLE001 (this call's hand-back failed: its request alone)
                settle(call.future, exc)
            start = stop

    def _count(self, calls: int, rows: int) -> None:
        self.stats.add(calls, rows)
        if self._on_batch is not None:
            self._on_batch(calls, rows)

    def _fail_all(self) -> None:
        for call in self._queue:
            settle(call.future, RuntimeError("the engine was closed while this call waited"))
        self._queue.clear()


def lower_thread_priority(nice: int) -> bool:
    """Raise the calling thread's nice value by ``nice`` (Linux: per thread; threads it starts inherit it).

    The bulk executor runs at a lower CPU priority than the express one, so that on a machine whose
    cores are all busy with a 64-image chunk, a one-image call still gets a core when it needs one.
    Lowering needs no privilege; False where the platform has no per-thread priority.
    """
    if nice <= 0 or not hasattr(os, "setpriority"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        return True
    except OSError:
        return False


def in_low_priority_thread(fn, nice: int):
    """``fn()`` on a new thread whose priority is lowered by ``nice`` first (so are the threads ``fn`` starts:
    an ONNX Runtime session made there has its intra-op thread pool at that priority)."""
    box: dict = {}

    def run():
        lower_thread_priority(nice)
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (re-raised on the caller's thread)
            box["error"] = exc

    thread = threading.Thread(target=run, name="explainrt-load-low-priority")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def wrap(engine: Engine, max_queue_delay_s: Optional[float], name: str, on_batch=None,
         express: Optional[Engine] = None, bulk_nice: int = 0) -> Engine:
    """``engine`` behind a batcher, or itself when batching is off (``max_queue_delay_s`` None).

    ``express``: a second instance of the model for the express executor. It must be a separate
    instance: concurrent runs of one ONNX Runtime session share its intra-op thread pool, so a
    one-image run would wait behind every operator of a 64-image one.
    """
    if max_queue_delay_s is None:
        return engine
    return BatchingEngine(engine, max_queue_delay_s=max_queue_delay_s, express=express, name=name,
                          on_batch=on_batch, bulk_nice=bulk_nice)
