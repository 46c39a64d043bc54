"""The engine contract every backend implements.

An engine runs the exported model on a batch: ``run({input_name: x}) -> {output: array}``
with the batch size free up to ``max_batch``. CPU engines take and return NumPy arrays, GPU
engines device arrays (CuPy); ``xp`` names the array module an engine speaks.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError
from ..export.metadata import ModelMetadata


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
    activations: Any  # (C, h, w)


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
        self.max_batch = int(max_batch)

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
            raise InvalidInputError(f"batch of {batch} is outside 1..max_batch={self.max_batch}")
        return self._run(inputs, names)

    def infer(self, x, output_names: Optional[Sequence[str]] = None) -> dict:
        """Run a batch held in one array ``x`` (N, C, H, W) through the model's input."""
        return self.run({self.metadata.input_name: x}, output_names)

    def infer_batches(self, x, output_names: Sequence[str], batch_size: Optional[int] = None) -> dict:
        """Run (N, C, H, W) inputs of any N in chunks of ``batch_size`` (≤ ``max_batch``); outputs concatenated."""
        bs = max(1, min(int(batch_size or self.max_batch), self.max_batch))
        parts = [self.infer(x[s:s + bs], output_names) for s in range(0, int(x.shape[0]), bs)]
        return {n: self.xp.concatenate([p[n] for p in parts], axis=0) for n in output_names}

    def base_pass(self, x) -> BasePass:
        """The one unmasked pass: probabilities, logits and activations of a (1,C,H,W) input."""
        meta = self.metadata
        names = [meta.probs_output, meta.activation_output] + ([meta.logits_output] if meta.logits_output else [])
        out = self.infer(x, names)
        logits = out[meta.logits_output][0] if meta.logits_output else None
        return BasePass(out[meta.probs_output][0], logits, out[meta.activation_output][0])

    def close(self) -> None:
        """Release the engine's resources (no-op by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
