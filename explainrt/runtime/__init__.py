"""Engines behind one contract (see ``base.Engine``) and the factory that picks one."""
from __future__ import annotations

from ..errors import InvalidInputError
from .base import BasePass, Engine, TensorInfo

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def load_engine(path: str, backend: str = "onnxruntime", device: str = "cpu", max_batch: int = 64, **kwargs) -> Engine:
    """Open the exported model at ``path`` with ``backend`` on ``device``."""
    if device not in ("cpu", "cuda"):
        raise InvalidInputError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if backend == "onnxruntime":
        from .ort_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, max_batch=max_batch, device=device, **kwargs)
    if backend == "torch":
        from .torch_engine import TorchEngine  # GPU path (issue: GPU pipeline)

        return TorchEngine(path, max_batch=max_batch, device=device, **kwargs)
    if backend == "tensorrt":
        from .tensorrt_engine import TensorRTEngine

        return TensorRTEngine(path, max_batch=max_batch, device=device, **kwargs)
    raise InvalidInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "BasePass", "Engine", "TensorInfo", "load_engine"]
