"""PyTorch engine: runs the exported ONNX file with torch ops, on CUDA (or the CPU, for tests).

The GPU path where TensorRT is absent. On ``device="cuda"`` inputs and outputs are CuPy arrays
exchanged zero-copy through DLPack; the model runs on the engine's own stream, ordered with
the caller's by events (``base.DeviceEngine``), so kernels, engine and score copies never wait
on the host. On ``device="cpu"`` it takes and returns NumPy arrays.

CUDA graphs (``cuda_graphs=True``) are captured per (batch bucket, outputs): a batch is padded
up to the next of a few bucket sizes (powers of two and ``max_batch``), so the varying last
chunk of SIDU or Score-CAM reuses a graph instead of capturing a new one; at most
``max_graphs`` graphs are kept (least recently used dropped); capture uses the thread-local
error mode, so CUDA calls of other server threads cannot invalidate it.
"""
from __future__ import annotations

import collections
import contextlib
import logging
from typing import Optional, Sequence

import numpy as np

from ..errors import InvalidInputError, ModelError, require
from ..export.metadata import ModelMetadata, load_onnx, read_metadata_props
from .base import DeviceEngine, TensorInfo

log = logging.getLogger(__name__)

_ONNX_TYPE_NAMES = {1: "float", 10: "float16", 11: "double", 7: "int64", 6: "int32"}


def graph_buckets(max_batch: int) -> tuple:
    """Batch sizes CUDA graphs are captured for: powers of two below ``max_batch``, and ``max_batch``."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [int(max_batch)])


def bucket_for(batch: int, buckets: tuple) -> int:
    """The smallest bucket that holds ``batch``."""
    for size in buckets:
        if size >= batch:
            return size
    raise InvalidInputError(f"batch of {batch} is larger than the largest graph bucket {buckets[-1]}")


class GraphCache:
    """Least-recently-used cache of captured graphs: ``get(key, make)`` captures on a miss."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise InvalidInputError(f"max_graphs must be at least 1, got {capacity}")
        self.capacity = int(capacity)
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self.captures = 0

    def get(self, key, make):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        entry = self._entries[key] = make()
        self.captures += 1
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list:
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()


class TorchEngine(DeviceEngine):
    """Runs an exported model with the ONNX → torch interpreter (``onnx_torch.TorchGraph``).

    ``fp16`` computes in half precision (CUDA only; outputs are returned as float32);
    ``cuda_graphs`` captures one CUDA graph per (batch bucket, outputs), at most ``max_graphs``
    of them, and replays it; ``tf32``
    allows TF32 convolutions on Ampere and later (faster, ~1e-3 relative error), off by
    default so FP32 results match the exported model. ``threads`` sets torch's (process-wide)
    intra-op CPU threads on ``device="cpu"``.
    """

    backend = "torch"

    def __init__(self, path: str, max_batch: int = 64, device: str = "cuda", fp16: bool = False,
                 cuda_graphs: bool = False, tf32: bool = False, threads: Optional[int] = None,
                 metadata: Optional[ModelMetadata] = None, max_graphs: int = 16):
        torch = require("torch", "export", "the torch engine")

        from .onnx_torch import TorchGraph

        if device not in ("cpu", "cuda"):
            raise InvalidInputError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cpu" and (fp16 or cuda_graphs):
            raise InvalidInputError("fp16 and cuda_graphs need device='cuda'")
        if device == "cpu" and threads:
            torch.set_num_threads(int(threads))
        if device == "cuda":
            cp = require("cupy", "gpu", "the torch engine on CUDA (CuPy arrays in and out)")
            if not torch.cuda.is_available():
                raise ModelError("device='cuda' but torch sees no CUDA device (is this a CPU-only torch build?)")
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
            self._init_device(cp, self.input_dtype)
            self._torch_device = torch.device("cuda", cp.cuda.Device().id)
            self._torch_stream = torch.cuda.ExternalStream(self.stream.ptr, device=self._torch_device)
        else:
            self._torch_device = torch.device("cpu")
        self.graph = TorchGraph(model, device=str(self._torch_device), dtype=self._dtype)
        self._inputs = [_info(i) for i in model.graph.input if i.name in self.graph.input_names]
        self._outputs = [_info(o) for o in model.graph.output]
        names = {o.name for o in self._outputs}
        for role, name in meta.engine_outputs():
            if name not in names:
                raise ModelError(f"{path}: its metadata names '{name}' as the {role} output, but the model has only "
                                 f"outputs {sorted(names)}; re-export it with `explainrt export`")
        if self.graph.input_names != [meta.input_name]:
            raise ModelError(f"{path}: expected one input '{meta.input_name}', the model has {self.graph.input_names}")
        self._buckets = graph_buckets(self.max_batch)
        self._graphs = GraphCache(max_graphs)  # (bucket shape, outputs) → (CUDAGraph, static input, static outputs)
        log.info("loaded %s with the torch engine on %s (%s, max_batch=%d)", path, self._torch_device,
                 "fp16" if self.fp16 else "fp32", self.max_batch)

    @property
    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def _run(self, inputs: dict, output_names: Sequence[str]) -> dict:
        if self.device == "cuda":
            return super()._run(inputs, output_names)  # DeviceEngine: handshake, staging, hand-back
        names = tuple(output_names)
        x = np.ascontiguousarray(np.asarray(inputs[self.metadata.input_name]), dtype=np.float32)
        with self.torch.inference_mode():
            outs = self._forward(self.torch.from_numpy(x), names)
            return {n: outs[n].float().contiguous().numpy() for n in names}

    def _enqueue(self, x, output_names: list, stream) -> dict:
        torch, names = self.torch, tuple(output_names)
        with torch.inference_mode(), torch.cuda.stream(self._torch_stream), _conv_precision(torch, self.tf32):
            t = torch.from_dlpack(x)
            outs = self._replay(t, names) if self.cuda_graphs else self._forward(t, names)
            return {n: self._cp.from_dlpack(outs[n].contiguous()) for n in names}

    def _forward(self, x, names: tuple) -> dict:
        try:
            return self.graph.run({self.metadata.input_name: x}, names)
        except (RuntimeError, ValueError) as exc:
            raise InvalidInputError(f"the torch engine could not run the input {tuple(x.shape)}: {exc}") from exc

    def _replay(self, x, names: tuple) -> dict:
        """Run through the CUDA graph of the batch's bucket (the batch padded up to it); outputs sliced back."""
        batch = int(x.shape[0])
        bucket = bucket_for(batch, self._buckets)
        shape = (bucket, *x.shape[1:])
        cuda_graph, static_in, static_out = self._graphs.get((shape, names), lambda: self._capture(shape, x, names))
        static_in[:batch].copy_(x)
        cuda_graph.replay()
        # the next replay overwrites the static outputs; DeviceEngine copies them out on this stream first
        return {n: static_out[n][:batch] for n in names}

    def _capture(self, shape: tuple, x, names: tuple):
        torch = self.torch
        static_in = torch.zeros(shape, dtype=x.dtype, device=x.device)
        current = torch.cuda.current_stream(self._torch_device)
        side = torch.cuda.Stream(device=self._torch_device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch requires
            for _ in range(2):
                self._forward(static_in, names)
        current.wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        # thread-local: CUDA calls of other threads (other requests) cannot invalidate this capture
        with torch.cuda.graph(cuda_graph, capture_error_mode="thread_local"):
            static_out = self._forward(static_in, names)
        log.debug("captured a CUDA graph for batch bucket %s, outputs %s", shape, names)
        return cuda_graph, static_in, static_out

    def close(self) -> None:
        if self.device == "cuda":
            self.stream.synchronize()  # replays may still read the graphs' static buffers
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
