"""PyTorch engine: runs the exported ONNX file with torch ops, on CUDA (or the CPU, for tests).

The GPU path where TensorRT is absent. On ``device="cuda"`` inputs and outputs are CuPy arrays
exchanged zero-copy through DLPack, and the model runs on CuPy's current stream, so the
masking kernels, the engine and the score copies are ordered on one stream without host
synchronisation. On ``device="cpu"`` it takes and returns NumPy arrays.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence

import numpy as np

from ..errors import InvalidInputError, ModelError, require
from ..export.metadata import ModelMetadata, load_onnx, read_metadata_props
from .base import Engine, TensorInfo

log = logging.getLogger(__name__)

_ONNX_TYPE_NAMES = {1: "float", 10: "float16", 11: "double", 7: "int64", 6: "int32"}


class TorchEngine(Engine):
    """Runs an exported model with the ONNX → torch interpreter (``onnx_torch.TorchGraph``).

    ``fp16`` computes in half precision (CUDA only; outputs are returned as float32);
    ``cuda_graphs`` captures one CUDA graph per (batch size, outputs) and replays it; ``tf32``
    allows TF32 convolutions on Ampere and later (faster, ~1e-3 relative error), off by
    default so FP32 results match the exported model. ``threads`` sets torch's (process-wide)
    intra-op CPU threads on ``device="cpu"``.
    """

    backend = "torch"

    def __init__(self, path: str, max_batch: int = 64, device: str = "cuda", fp16: bool = False,
                 cuda_graphs: bool = False, tf32: bool = False, threads: Optional[int] = None,
                 metadata: Optional[ModelMetadata] = None):
        torch = require("torch", "export", "the torch engine")

        from .onnx_torch import TorchGraph

        if device not in ("cpu", "cuda"):
            raise InvalidInputError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cpu" and (fp16 or cuda_graphs):
            raise InvalidInputError("fp16 and cuda_graphs need device='cuda'")
        if device == "cpu" and threads:
            torch.set_num_threads(int(threads))
        if device == "cuda":
            self._cp = require("cupy", "gpu", "the torch engine on CUDA (CuPy arrays in and out)")
            if not torch.cuda.is_available():
                raise ModelError("device='cuda' but torch sees no CUDA device (is this a CPU-only torch build?)")
            self.xp = self._cp
        model = load_onnx(path, "model file")
        meta = metadata or read_metadata_props({p.key: p.value for p in model.metadata_props}, path)
        super().__init__(meta, max_batch)
        self.torch = torch
        self.path = path
        self.device = device
        self.fp16 = bool(fp16)
        self.cuda_graphs = bool(cuda_graphs)
        self.tf32 = bool(tf32)
        self.input_dtype = "float16" if self.fp16 else "float32"
        self._dtype = torch.float16 if self.fp16 else torch.float32
        if device == "cuda":
            self._torch_device = torch.device("cuda", self._cp.cuda.Device().id)
        else:
            self._torch_device = torch.device("cpu")
        self.graph = TorchGraph(model, device=str(self._torch_device), dtype=self._dtype)
        self._inputs = [_info(i) for i in model.graph.input if i.name in self.graph.input_names]
        self._outputs = [_info(o) for o in model.graph.output]
        names = {o.name for o in self._outputs}
        for role, name in (("probabilities", meta.probs_output), ("activation", meta.activation_output)):
            if name not in names:
                raise ModelError(f"{path}: its metadata names '{name}' as the {role} output, but the model has only "
                                 f"outputs {sorted(names)}; re-export it with `explainrt export`")
        if self.graph.input_names != [meta.input_name]:
            raise ModelError(f"{path}: expected one input '{meta.input_name}', the model has {self.graph.input_names}")
        self._graphs: dict = {}  # (batch, outputs) → (CUDAGraph, static input, static outputs)
        log.info("loaded %s with the torch engine on %s (%s, max_batch=%d)", path, self._torch_device,
                 "fp16" if self.fp16 else "fp32", self.max_batch)

    @property
    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def _stream(self):
        """Run torch on CuPy's current stream, so kernels and engine share one ordered queue."""
        if self.device != "cuda":
            return contextlib.nullcontext()
        ptr = self._cp.cuda.get_current_stream().ptr
        torch = self.torch
        stream = torch.cuda.default_stream(self._torch_device) if ptr == 0 else \
            torch.cuda.ExternalStream(ptr, device=self._torch_device)
        return torch.cuda.stream(stream)

    def _to_tensor(self, x):
        torch = self.torch
        if self.device == "cuda":
            t = torch.from_dlpack(self._cp.ascontiguousarray(self._cp.asarray(x)))
        else:
            t = torch.from_numpy(np.ascontiguousarray(np.asarray(x), dtype=np.float32))
        return t.to(dtype=self._dtype)

    def _from_tensor(self, t):
        t = t.float().contiguous()
        if self.device == "cuda":
            return self._cp.from_dlpack(t)
        return t.numpy()

    def _run(self, inputs: dict, output_names: Sequence[str]) -> dict:
        names = tuple(output_names)
        with self.torch.inference_mode(), self._stream(), _conv_precision(self.torch, self.tf32):
            x = self._to_tensor(inputs[self.metadata.input_name])
            try:
                if self.cuda_graphs:
                    outs = self._replay(x, names)
                else:
                    outs = self.graph.run({self.metadata.input_name: x}, names)
            except (RuntimeError, ValueError) as exc:
                raise InvalidInputError(f"the torch engine could not run the input {tuple(x.shape)}: {exc}") from exc
            return {n: self._from_tensor(outs[n]) for n in names}

    def _replay(self, x, names: tuple) -> dict:
        """Run through a CUDA graph captured for this batch size and output set (captured once)."""
        torch = self.torch
        key = (tuple(x.shape), names)
        entry = self._graphs.get(key)
        if entry is None:
            static_in = torch.empty_like(x)
            static_in.copy_(x)
            side = torch.cuda.Stream(device=self._torch_device)
            side.wait_stream(torch.cuda.current_stream(self._torch_device))
            with torch.cuda.stream(side):  # warm-up outside the capture, as torch requires
                for _ in range(2):
                    self.graph.run({self.metadata.input_name: static_in}, names)
            torch.cuda.current_stream(self._torch_device).wait_stream(side)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                static_out = self.graph.run({self.metadata.input_name: static_in}, names)
            entry = self._graphs[key] = (cuda_graph, static_in, static_out)
            log.debug("captured a CUDA graph for batch %s, outputs %s", tuple(x.shape), names)
        cuda_graph, static_in, static_out = entry
        static_in.copy_(x)
        cuda_graph.replay()
        # the next replay overwrites the static outputs: hand out copies
        return {n: static_out[n].clone() for n in names}

    def close(self) -> None:
        self._graphs.clear()


@contextlib.contextmanager
def _conv_precision(torch, tf32: bool):
    """cuDNN convolutions in TF32 or full FP32 for the duration of a run (restored after)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        previous = conv.fp32_precision
        conv.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = previous
    else:
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = previous


def _info(value_info) -> TensorInfo:
    t = value_info.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return TensorInfo(value_info.name, shape, _ONNX_TYPE_NAMES.get(t.elem_type, str(t.elem_type)))
