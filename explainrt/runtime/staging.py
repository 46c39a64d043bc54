"""Stream order, staging buffers and the chunked loop: the one place that owns them.

The rules every GPU engine and every batched loop follow (DESIGN.md, "stream order is part
of the engine contract"):

- **Outputs are valid on the caller's stream.** A GPU engine runs on a stream of its own; it
  waits for an event recorded on the caller's current stream before it reads the inputs, and
  the caller's stream waits for the engine's event before anything else is enqueued there.
  Arrays handed back are allocated while the caller's stream is current, so CuPy's
  stream-aware pool never recycles them under another stream's pending work.
- **Nothing a stream may still read is freed early.** Arrays another stream may still read
  (bound inputs, staging buffers on an error path) are kept referenced until an event
  recorded after their last use has completed (``InFlight``), checked without a host wait.
- **Engine I/O pointers are 256-byte aligned** (TensorRT's rule for ``set_tensor_address``);
  ``EngineInput`` copies a misaligned, strided or wrongly typed input into an aligned buffer.
- **Default streams:** pointer 0 (legacy), 1 (``cudaStreamLegacy``) and 2
  (``cudaStreamPerThread``, CuPy's per-thread default stream) are all default streams.
- **Cross-thread hand-over:** arrays produced on one thread's stream and used on another's go
  through ``handoff`` / ``receive`` (``Engine.handoff`` / ``Engine.receive``).

``run_in_chunks`` is the chunked loop the explainer driver, ``Engine.infer_batches`` and the
metrics share: one (CPU) or two (GPU, double-buffered) input buffers, chunk k+1 written on a
side stream while the engine runs chunk k.
"""
from __future__ import annotations

import collections
import contextlib
import threading
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import require

#: TensorRT needs I/O tensor addresses aligned to 256 bytes (CuPy's pool gives 512).
IO_ALIGNMENT = 256
#: stream handles that mean "a default stream": legacy null, cudaStreamLegacy, cudaStreamPerThread
DEFAULT_STREAM_POINTERS = (0, 1, 2)

_local = threading.local()


def _cupy():
    return require("cupy", "gpu", "GPU staging buffers and streams")


def is_default_stream(stream) -> bool:
    """Whether ``stream`` (a CuPy stream or a raw handle) is a default stream."""
    ptr = stream if isinstance(stream, int) else int(stream.ptr)
    return ptr in DEFAULT_STREAM_POINTERS


def pointer(arr) -> int:
    """Address of an array's first element (CuPy or NumPy)."""
    data = arr.data
    return int(data.ptr) if hasattr(data, "ptr") else int(arr.ctypes.data)


def is_aligned(arr, alignment: int = IO_ALIGNMENT) -> bool:
    return pointer(arr) % alignment == 0


def side_stream(cp=None):
    """A non-blocking stream for this thread and device, created once and reused across requests."""
    cp = cp or _cupy()
    streams = getattr(_local, "side_streams", None)
    if streams is None:
        streams = _local.side_streams = {}
    key = (id(cp), cp.cuda.Device().id)
    owner, stream = streams.get(key, (None, None))
    if owner is not cp:  # the module is kept with its stream, so a reused id() cannot alias another
        stream = cp.cuda.Stream(non_blocking=True)
        streams[key] = (cp, stream)
    return stream


class InFlight:
    """Arrays kept referenced until the event recorded after their last use has completed."""

    def __init__(self):
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def keep(self, event, *arrays) -> None:
        with self._lock:
            self._pending.append((event, arrays))
            while self._pending and _event_done(self._pending[0][0]):
                self._pending.popleft()

    def __len__(self) -> int:
        return len(self._pending)


def _event_done(event) -> bool:
    return bool(getattr(event, "done", True))


# ----------------------------------------------------------------------------- hand-over


class Handoff:
    """Arrays made on one thread's stream, with the point of that stream they are valid after."""

    __slots__ = ("arrays", "event")

    def __init__(self, arrays: dict, event=None):
        self.arrays, self.event = arrays, event


_handoff_flight = InFlight()


def handoff(xp, arrays: dict) -> Handoff:
    """Mark ``arrays`` (made on the calling thread's current stream) for use on another thread."""
    if xp is np:
        return Handoff(dict(arrays))
    return Handoff(dict(arrays), xp.cuda.get_current_stream().record())


def receive(xp, item: Handoff, copy: bool = True) -> dict:
    """On the receiving thread: the arrays of ``item``, valid on this thread's current stream.

    The current stream waits for the producer's event, and each array is copied into memory
    allocated on this stream; the producer's arrays stay referenced until the copies are done.
    ``copy=False`` skips the copies, for a receiver that only reads the arrays while the producer
    is blocked waiting for its answer (the batcher's engine input: no device copy per chunk).
    """
    if xp is np or item.event is None:
        return dict(item.arrays)
    stream = xp.cuda.get_current_stream()
    stream.wait_event(item.event)
    if not copy:
        return dict(item.arrays)
    copies = {name: xp.array(arr, copy=True) for name, arr in item.arrays.items()}
    _handoff_flight.keep(stream.record(), *item.arrays.values())
    return copies


# ----------------------------------------------------------------------------- engine streams


class EngineStream:
    """A GPU engine's own stream and the record/wait handshake with its callers.

    ``with handshake.call() as (caller, stream):`` — inside, ``stream`` is current and has
    waited for everything enqueued on ``caller`` so far; on exit (also on an exception)
    ``caller`` waits for ``stream`` and the arrays passed to ``keep`` stay referenced until
    the engine's work on them is done. Calls are serialised (the engine's buffers are shared).
    """

    def __init__(self, cp):
        self._cp = cp
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._lock = threading.Lock()
        self._in_flight = InFlight()
        self._kept: list = []

    @contextlib.contextmanager
    def call(self):
        cp = self._cp
        with self._lock:
            caller = cp.cuda.get_current_stream()
            self.stream.wait_event(caller.record())
            self._kept = []
            try:
                with self.stream:
                    yield caller, self.stream
            finally:
                done = self.stream.record()
                caller.wait_event(done)
                self._in_flight.keep(done, *self._kept)
                self._kept = []

    def keep(self, *arrays) -> None:
        """Keep ``arrays`` referenced until the engine's work of this call is done."""
        self._kept.extend(arrays)


class EngineInput:
    """The engine's input staging: an input is used in place when it is C-contiguous, of the
    engine's dtype and 256-byte aligned; otherwise it is copied (on the engine's stream) into a
    buffer allocated once at ``max_batch``, whose slices from row 0 are aligned."""

    def __init__(self, cp, max_batch: int, dtype):
        self._cp, self.max_batch, self.dtype = cp, int(max_batch), np.dtype(dtype)
        self._buffer = None
        self.copies = 0

    def stage(self, x):
        cp = self._cp
        if (x.dtype == self.dtype and x.flags.c_contiguous and is_aligned(x)) or x.shape[0] == 0:
            return x
        item_shape = tuple(int(d) for d in x.shape[1:])
        if self._buffer is None or tuple(self._buffer.shape[1:]) != item_shape:
            self._buffer = cp.empty((self.max_batch, *item_shape), dtype=self.dtype)
        staged = self._buffer[:int(x.shape[0])]
        staged[...] = x  # casts and gathers strides; enqueued on the current (engine) stream
        self.copies += 1
        return staged


# ----------------------------------------------------------------------------- chunk staging


class HostInput:
    """The CPU engine input: one buffer, written then run, chunk after chunk."""

    def __init__(self, shape, dtype):
        self.buffer = np.empty(shape, dtype=dtype)

    @contextlib.contextmanager
    def fill(self, k: int):
        yield self.buffer

    def ready(self, k: int):
        return self.buffer

    def release(self, k: int) -> None:
        pass

    def close(self) -> None:
        pass


class DoubleBufferedInput:
    """Two engine input buffers; chunk k+1 is written on a side stream while the engine runs chunk k.

    Protocol per chunk k: ``with fill(k) as buf:`` write the chunk (the side stream is
    current inside); ``ready(k)`` makes the caller's stream wait for it and returns the
    buffer; after the engine has been enqueued on that chunk, ``release(k)`` lets chunk k+2
    reuse the buffer; ``close()`` (always, also after an error) orders the caller's stream
    after the side stream, so the buffers and whatever the fills read can be freed. The first
    ``fill`` waits for everything enqueued on the caller's stream before it: every input the
    fills read (image, masks, index arrays) must be made before the first ``fill``. Only
    events order the streams: the host never waits.
    """

    def __init__(self, shape, dtype):
        cp = self._cp = _cupy()
        self.main = cp.cuda.get_current_stream()
        self.side = side_stream(cp)
        self.buffers = [cp.empty(shape, dtype=dtype) for _ in range(2)]
        self.filled = [cp.cuda.Event(disable_timing=True) for _ in range(2)]
        self.released = [None, None]
        self._started = False

    @contextlib.contextmanager
    def fill(self, k: int):
        slot = k % 2
        if not self._started:  # the inputs made on the main stream so far come first
            self.side.wait_event(self.main.record())
            self._started = True
        if self.released[slot] is not None:
            self.side.wait_event(self.released[slot])
        with self.side:
            try:
                yield self.buffers[slot]
            finally:
                self.filled[slot].record(self.side)

    def ready(self, k: int):
        slot = k % 2
        self.main.wait_event(self.filled[slot])
        return self.buffers[slot]

    def release(self, k: int) -> None:
        slot = k % 2
        event = self.released[slot] or self._cp.cuda.Event(disable_timing=True)
        event.record(self.main)
        self.released[slot] = event

    def close(self) -> None:
        if self._started:
            self.main.wait_event(self.side.record())


def input_staging(xp, shape, dtype):
    """Engine input buffers for a chunk loop: one on the host; two on a GPU, writing overlapping the engine."""
    if xp is np:
        return HostInput(shape, dtype)
    return DoubleBufferedInput(shape, dtype)


WriteFn = Callable[[Any, int, int], None]  # (buffer[:b], start, b)
TakeFn = Callable[[int, int, dict], None]  # (start, b, outputs)


def run_in_chunks(engine, count: int, batch_size: Optional[int], item_shape: Sequence[int], write: WriteFn,
                  output_names: Sequence[str], take: TakeFn,
                  before_chunk: Optional[Callable[[int], None]] = None) -> None:
    """Run ``count`` engine inputs of ``item_shape`` in chunks of ``batch_size`` (≤ ``max_batch``).

    ``write(buf, start, b)`` writes inputs ``start..start+b`` into the staging buffer (on a
    GPU the side stream is current); ``take(start, b, outputs)`` receives the chunk's outputs
    (valid on the caller's stream; the buffer is reused two chunks later). ``before_chunk(done)``
    runs before each chunk (cancellation, progress). An engine with a ``fixed_batch`` gets chunks
    of exactly that size, the last one padded with zeros (its outputs dropped), and a one-line
    warning, once, of what that costs.
    """
    if count <= 0:
        return
    fixed = getattr(engine, "fixed_batch", None)
    if fixed is not None:
        engine.warn_fixed_batch(count, batch_size)
        bs = int(fixed)
    else:
        bs = max(1, min(int(batch_size or engine.max_batch), engine.max_batch))
    staging = input_staging(engine.xp, (bs if fixed is not None else min(bs, count), *item_shape),
                            engine.input_dtype)
    try:
        for k, start in enumerate(range(0, count, bs)):
            if before_chunk is not None:
                before_chunk(start)
            b = min(bs, count - start)
            with staging.fill(k) as buffer:
                write(buffer[:b], start, b)
                if b < bs and fixed is not None:
                    buffer[b:] = 0
            if fixed is None:
                out = engine.infer(staging.ready(k)[:b], output_names)
            else:
                out = {n: v[:b] for n, v in engine.infer(staging.ready(k), output_names).items()}
            take(start, b, out)
            staging.release(k)
    finally:
        staging.close()
