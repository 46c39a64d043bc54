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
500-pass one (the server gives ONNX Runtime models one, a session with one intra-op thread).

A failure of a merged call is retried call by call, so one request's bad input fails that
request only. On a GPU the executor runs on its own thread and CUDA stream: each call's inputs
are made ready for it with an event recorded on the caller's stream, and the caller's stream
waits for the executor's work before it reads the outputs (``_StreamHandoff``).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Optional, Sequence

import numpy as np

from ..runtime.base import Engine
from .logs import log_event

log = logging.getLogger(__name__)

_context = threading.local()  # per worker thread: is the request it runs a cheap one


@contextlib.contextmanager
def request_scope(engine: Engine, cheap: bool):
    """Around one request's explanation on a worker thread: its calls are ranked as ``cheap`` ones,
    and the engine (when it is a ``BatchingEngine``) knows one more request may send calls."""
    previous = getattr(_context, "cheap", False)
    _context.cheap = cheap
    batching = isinstance(engine, BatchingEngine)
    if batching:
        engine._enter()
    try:
        yield
    finally:
        _context.cheap = previous
        if batching:
            engine._leave()


@dataclasses.dataclass(eq=False)
class _Call:
    x: Any
    names: list
    cheap: bool
    arrived: float
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    ready: Any = None  # GPU: event recorded on the caller's stream after its inputs were written

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


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
                 name: str = "model", on_batch=None):
        super().__init__(engine.metadata, engine.max_batch)
        self.engine = engine
        self.xp = engine.xp
        self.backend = engine.backend
        self.device = engine.device
        self.input_dtype = engine.input_dtype
        self.max_queue_delay_s = max(0.0, float(max_queue_delay_s))
        self.stats = BatchStats()
        self._on_batch = on_batch  # on_batch(calls, rows) after each engine call (metrics)
        self._handoff = _StreamHandoff(engine.xp)
        self._queue: list[_Call] = []
        self._cond = threading.Condition()
        self._requests = 0  # requests in flight that may send calls
        self._waiting = 0  # of them, blocked on a call of theirs
        self._closed = False
        self._threads = [threading.Thread(target=self._execute, args=(False,), name=f"explainrt-batch-{name}",
                                          daemon=True)]
        self.express = express  # the express executor's own engine instance (its own threads / stream)
        if express is not None:
            self._threads.append(threading.Thread(target=self._execute, args=(True,),
                                                  name=f"explainrt-batch-{name}-express", daemon=True))
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
        call = _Call(inputs[self.metadata.input_name], list(output_names), getattr(_context, "cheap", False),
                     time.perf_counter(), ready=self._handoff.record())
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.append(call)
            self._waiting += 1
            self._cond.notify_all()
        try:
            out, done = call.future.result()
        finally:
            with self._cond:
                self._waiting -= 1
        self._handoff.wait(done)
        return out

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
    def _enter(self) -> None:
        with self._cond:
            self._requests += 1

    def _leave(self) -> None:
        with self._cond:
            self._requests -= 1
            self._cond.notify_all()

    # ---- the executor ---------------------------------------------------------------------------
    def _take(self, express: bool) -> list[_Call]:
        """Calls for one engine batch (under the lock): cheap requests' calls first, then by arrival."""
        queue = [c for c in self._queue if c.cheap] if express else self._queue
        if not queue:
            return []
        order = sorted(queue, key=lambda c: (not c.cheap, c.arrived))
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

    def _more_may_come(self, rows: int, calls: int) -> bool:
        """Whether waiting could fill the batch: room left, and requests in flight not yet waiting on a call."""
        return rows < self.max_batch and self._requests > self._waiting

    def _execute(self, express: bool) -> None:
        while True:
            with self._cond:
                while not self._closed and not any(c.cheap or not express for c in self._queue):
                    self._cond.wait()
                if self._closed:
                    self._fail_all()
                    return
                batch = self._take(express)
                if self.max_queue_delay_s > 0:
                    end = time.perf_counter() + self.max_queue_delay_s
                    while self._more_may_come(sum(c.rows for c in batch), len(batch)):
                        left = end - time.perf_counter()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                        if self._closed:
                            break
                        self._queue.extend(batch)  # re-pack with what arrived, in rank order
                        batch = self._take(express)
            self._run_batch(batch, self.express if express else self.engine)

    def _run_batch(self, batch: list[_Call], engine: Engine) -> None:
        names = list(dict.fromkeys(n for call in batch for n in call.names))
        rows = sum(call.rows for call in batch)
        try:
            for call in batch:
                self._handoff.before(call.ready)
            x = batch[0].x if len(batch) == 1 else self.xp.concatenate([call.x for call in batch], axis=0)
            out = engine.run({self.metadata.input_name: x}, names)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log_event(log, "batch_failed_retrying_alone", logging.WARNING, calls=len(batch), error=str(exc))
            for call in batch:  # one request's failure must not fail its batch-mates
                self._run_batch([call], engine)
            return
        self.stats.add(len(batch), rows)
        if self._on_batch is not None:
            self._on_batch(len(batch), rows)
        done = self._handoff.record()
        start = 0
        for call in batch:
            stop = start + call.rows
            part = {n: out[n] if len(batch) == 1 else out[n][start:stop] for n in call.names}
            call.future.set_result((part, done))
            start = stop

    def _fail_all(self) -> None:
        for call in self._queue:
            call.future.set_exception(RuntimeError("the engine was closed while this call waited"))
        self._queue.clear()


class _StreamHandoff:
    """Stream order across threads on a GPU; nothing to do for NumPy engines.

    CuPy's current stream is per thread: the caller's inputs are written on its stream and the
    executor runs the engine on its own. ``record()`` marks "everything so far on this thread's
    stream"; ``before(event)`` makes the executor's stream wait for a caller's event;
    ``wait(event)`` makes the caller's stream wait for the executor's.
    """

    def __init__(self, xp):
        self.cupy = None if xp is np else xp

    def record(self):
        if self.cupy is None:
            return None
        event = self.cupy.cuda.Event(block=False, disable_timing=True)
        event.record(self.cupy.cuda.get_current_stream())
        return event

    def before(self, event) -> None:
        if event is not None:
            self.cupy.cuda.get_current_stream().wait_event(event)

    wait = before


def wrap(engine: Engine, max_queue_delay_s: Optional[float], name: str, on_batch=None,
         express: Optional[Engine] = None) -> Engine:
    """``engine`` behind a batcher, or itself when batching is off (``max_queue_delay_s`` None).

    ``express``: a second instance of the model for the express executor. It must be a separate
    instance: concurrent runs of one ONNX Runtime session share its intra-op thread pool, so a
    one-image run would wait behind every operator of a 64-image one.
    """
    if max_queue_delay_s is None:
        return engine
    return BatchingEngine(engine, max_queue_delay_s=max_queue_delay_s, express=express, name=name,
                          on_batch=on_batch)
