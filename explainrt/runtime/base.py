"""The engine contract every backend implements.

An engine runs the exported model on a batch: ``run({input_name: x}) -> {output: array}``
with the batch size free up to ``max_batch``. CPU engines take and return NumPy arrays, GPU
engines device arrays (CuPy); ``xp`` names the array module an engine speaks. A model whose
graph hard-codes its batch (``ModelMetadata.fixed_batch``, a static-batch TensorRT plan) has
``fixed_batch`` set and ``max_batch`` equal to it: ``run`` pads a smaller batch up to it, and
the chunked loop (``staging.run_in_chunks``) feeds chunks of exactly that size.

GPU engines derive from ``DeviceEngine``, which holds the stream contract (``staging.py``):
inputs are read after everything enqueued on the caller's current stream, outputs are valid
on it, input pointers are 256-byte aligned. A caller that hands arrays to an engine call made
on another thread (a batcher merging concurrent requests) passes them through
``Engine.handoff`` on the producing thread and ``Engine.receive`` on the consuming one.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError
from ..export.metadata import ModelMetadata
from . import staging

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TensorInfo:
    """Name, shape (``None`` for a dynamic axis) and dtype of one engine input or output."""

    name: str
    shape: tuple
    dtype: str


@dataclasses.dataclass
class BasePass:
    """Outputs of the model on the unmasked input (batch of 1, first axis dropped)."""

    probs: Any  # (K,)
    logits: Optional[Any]  # (K,) or None when the model has no logits output
    activations: Any  # (C, h, w), or None for a black-box model (no activation output)


class Engine(abc.ABC):
    """Runs an exported explainrt model on batches of inputs."""

    #: array module of inputs and outputs (numpy, or cupy on GPU engines)
    xp: Any = np
    #: name of the backend, e.g. "onnxruntime"
    backend: str = "?"
    #: "cpu" or "cuda"
    device: str = "cpu"
    #: dtype of the batches the driver writes for ``infer`` ("float16" for half-precision engines)
    input_dtype: str = "float32"

    def __init__(self, metadata: ModelMetadata, max_batch: int):
        if max_batch < 1:
            raise InvalidInputError(f"max_batch must be at least 1, got {max_batch}")
        self.metadata = metadata
        #: the one batch size the model runs at (its graph hard-codes it); None: any batch up to max_batch
        self.fixed_batch: Optional[int] = metadata.fixed_batch
        #: the max_batch asked for (a fixed-batch model's max_batch is its fixed batch)
        self.requested_max_batch = int(max_batch)
        self.max_batch = int(self.fixed_batch or max_batch)
        self._warned_fixed_batch = False

    @property
    @abc.abstractmethod
    def inputs(self) -> list[TensorInfo]:
        """Input tensors of the engine."""

    @property
    @abc.abstractmethod
    def outputs(self) -> list[TensorInfo]:
        """Output tensors of the engine."""

    @abc.abstractmethod
    def _run(self, inputs: dict, output_names: Sequence[str]) -> dict:
        """Backend-specific execution of one batch (already validated)."""

    def run(self, inputs: dict, output_names: Optional[Sequence[str]] = None) -> dict:
        """Run one batch; ``output_names`` limits what is returned (default: every output)."""
        names = list(output_names) if output_names is not None else [o.name for o in self.outputs]
        x = inputs.get(self.metadata.input_name)
        if x is None:
            raise InvalidInputError(
                f"the engine input is named '{self.metadata.input_name}', got inputs {sorted(inputs)}"
            )
        batch = x.shape[0]
        if batch < 1 or batch > self.max_batch:
            fixed = (f" (the model's batch is fixed at {self.fixed_batch}: run larger batches with infer_batches)"
                     if self.fixed_batch else "")
            raise InvalidInputError(f"batch of {batch} is outside 1..max_batch={self.max_batch}{fixed}")
        if self.fixed_batch is not None and batch < self.fixed_batch:
            return self._run_padded(inputs, names, int(batch))
        return self._run(inputs, names)

    def _run_padded(self, inputs: dict, names: list, batch: int) -> dict:
        """Run a batch smaller than ``fixed_batch``: zero rows appended, their outputs dropped."""
        xp = self.xp
        padded = {}
        for name, arr in inputs.items():
            arr = xp.asarray(arr)
            padded[name] = xp.concatenate([arr, xp.zeros((self.fixed_batch - batch, *arr.shape[1:]), arr.dtype)])
        return {n: v[:batch] for n, v in self._run(padded, names).items()}

    def warn_fixed_batch(self, count: int, batch_size: Optional[int] = None) -> None:
        """Log once per engine that ``count`` inputs run ``fixed_batch`` per call, not ``batch_size``, and why."""
        wanted = int(batch_size or self.requested_max_batch)
        fixed = self.fixed_batch
        if fixed is None or self._warned_fixed_batch or wanted <= fixed or count <= fixed:
            return
        self._warned_fixed_batch = True
        calls, batched = -(-count // fixed), -(-count // wanted)
        log.warning("%s has a fixed batch of %d (its graph hard-codes it; its metadata's batch_rewrite says why it "
                    "was not made dynamic): %d inputs take %d engine calls of %d instead of %d of up to %d "
                    "(%.0fx the calls, each paying the per-call overhead without batched throughput); export the "
                    "model with a dynamic batch axis to avoid this", self.metadata.name or "the model", fixed,
                    count, calls, fixed, batched, wanted, calls / batched)

    def infer(self, x, output_names: Optional[Sequence[str]] = None) -> dict:
        """Run a batch held in one array ``x`` (N, C, H, W) through the model's input."""
        return self.run({self.metadata.input_name: x}, output_names)

    def infer_batches(self, x, output_names: Sequence[str], batch_size: Optional[int] = None) -> dict:
        """Run (N, C, H, W) inputs of any N in chunks of ``batch_size`` (≤ ``max_batch``); outputs concatenated.

        Chunks go through the same staging as the explainer driver (``staging.run_in_chunks``):
        copied into an aligned engine-dtype buffer, double-buffered on a GPU.
        """
        parts: list = []

        def write(buffer, start, b):
            buffer[...] = x[start:start + b]

        staging.run_in_chunks(self, int(x.shape[0]), batch_size, tuple(x.shape[1:]), write, output_names,
                              lambda start, b, out: parts.append(out))
        return {n: self.xp.concatenate([p[n] for p in parts], axis=0) for n in output_names}

    def handoff(self, arrays: dict) -> staging.Handoff:
        """Hand ``arrays`` made on this thread to another thread (for ``receive`` there).

        Call it on the producing thread, after the arrays are enqueued; on a GPU it records an
        event on this thread's current stream. On CPU engines the arrays pass as they are.
        """
        return staging.handoff(self.xp, arrays)

    def receive(self, item: staging.Handoff, copy: bool = True) -> dict:
        """On the consuming thread: the arrays of a ``handoff``, valid on this thread's stream.

        On a GPU this thread's current stream waits for the producer's event and gets copies
        allocated on it (the originals are kept until the copies are done), so neither thread's
        memory pool recycles memory the other may still read. On CPU engines: the arrays as they are.
        """
        return staging.receive(self.xp, item, copy)

    def base_pass(self, x) -> BasePass:
        """The one unmasked pass: probabilities, logits and activations of a (1,C,H,W) input."""
        meta = self.metadata
        names = [name for _role, name in meta.engine_outputs()] + ([meta.logits_output] if meta.logits_output else [])
        out = self.infer(x, names)
        logits = out[meta.logits_output][0] if meta.logits_output else None
        activations = out[meta.activation_output][0] if meta.has_activation else None
        return BasePass(out[meta.probs_output][0], logits, activations)

    def close(self) -> None:
        """Release the engine's resources (no-op by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DeviceEngine(Engine):
    """Base of the GPU engines: the stream handshake, input staging and output hand-back.

    A subclass calls ``_init_device(cupy, input dtype)`` and implements ``_enqueue(x, names,
    stream)``: enqueue the model on ``stream`` (current, already ordered after the caller)
    for the staged input ``x`` and return device arrays valid on ``stream``. This class copies
    them (as float32) into arrays allocated on the caller's stream, orders the caller's stream
    after the engine's, and keeps the input and the engine's arrays referenced until the
    engine's work on them is done — also when ``_enqueue`` raises.
    """

    device = "cuda"

    def _init_device(self, cp, input_dtype) -> None:
        self._cp = self.xp = cp
        self._handshake = staging.EngineStream(cp)
        self._input_staging = staging.EngineInput(cp, self.max_batch, input_dtype)

    @property
    def stream(self):
        """The engine's own CUDA stream (every engine call runs on it)."""
        return self._handshake.stream

    @abc.abstractmethod
    def _enqueue(self, x, output_names: list, stream) -> dict:
        """Enqueue one batch on ``stream``; return its outputs (device arrays valid on ``stream``)."""

    def _run(self, inputs: dict, output_names: Sequence[str]) -> dict:
        cp, names = self._cp, list(output_names)
        given = inputs[self.metadata.input_name]
        with self._handshake.call() as (caller, stream):
            self._handshake.keep(given)
            x = self._input_staging.stage(cp.asarray(given))
            self._handshake.keep(x)
            produced = self._enqueue(x, names, stream)
            self._handshake.keep(*produced.values())
            with caller:  # handed-back arrays live in the caller's stream's pool
                outs = {n: cp.empty(tuple(produced[n].shape), dtype=cp.float32) for n in names}
            for n in names:
                outs[n][...] = produced[n]  # on the engine's stream: the next call may overwrite its buffers
        return outs
