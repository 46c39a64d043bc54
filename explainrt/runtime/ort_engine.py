"""ONNX Runtime engine: CPU everywhere, CUDA/TensorRT execution providers with onnxruntime-gpu."""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np

from ..errors import InvalidInputError, ModelError, require
from ..export.metadata import ModelMetadata, read_metadata_props
from .base import Engine, TensorInfo

log = logging.getLogger(__name__)

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def default_providers(device: str) -> list[str]:
    """Execution providers for ``device``: CPU, or the GPU ones onnxruntime-gpu offers."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    chosen = [p for p in _GPU_PROVIDERS if p in available]
    if not chosen:
        raise ModelError(
            f"device='{device}' needs onnxruntime-gpu (providers available here: {available}); "
            "install onnxruntime-gpu, or use device='cpu'"
        )
    return chosen + ["CPUExecutionProvider"]


class OnnxRuntimeEngine(Engine):
    """Runs an exported model with ONNX Runtime.

    On ``device="cpu"`` NumPy in, NumPy out. On ``device="cuda"`` (onnxruntime-gpu) CuPy in,
    CuPy out through IOBinding: the input is bound at its device pointer and the outputs are
    written into CuPy buffers, so nothing goes through the host. ``session_config``: extra
    ONNX Runtime session config entries (``add_session_config_entry``).
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: str,
        max_batch: int = 64,
        device: str = "cpu",
        providers: Optional[Sequence] = None,
        threads: Optional[int] = None,
        metadata: Optional[ModelMetadata] = None,
        session_config: Optional[dict] = None,
    ):
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise ModelError(f"model file not found: {path}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3
        for key, value in (session_config or {}).items():  # e.g. {"session.intra_op.allow_spinning": "0"}
            opts.add_session_config_entry(key, str(value))
        try:
            self.session = ort.InferenceSession(path, opts, providers=list(providers or default_providers(device)))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ModelError(f"ONNX Runtime could not load {path}: {exc}") from exc
        meta = metadata or read_metadata_props(self.session.get_modelmeta().custom_metadata_map, path)
        super().__init__(meta, max_batch)
        self.device = device
        self.path = path
        names = {o.name for o in self.session.get_outputs()}
        for role, name in (("probabilities", meta.probs_output), ("activation", meta.activation_output)):
            if name not in names:
                raise ModelError(
                    f"{path}: its metadata names '{name}' as the {role} output, but the model has only "
                    f"outputs {sorted(names)}; re-export it with `explainrt export`"
                )
        inp = self.session.get_inputs()[0]
        if inp.name != meta.input_name:
            raise ModelError(f"{path}: metadata names input '{meta.input_name}' but the model's input is '{inp.name}'")
        self._float16 = inp.type == "tensor(float16)"
        if device == "cuda":
            self._cp = require("cupy", "gpu", "the ONNX Runtime engine on CUDA (CuPy arrays in and out)")
            self.xp = self._cp
            self._output_types = {o.name: o.type for o in self.session.get_outputs()}
            cuda_options = self.session.get_provider_options().get("CUDAExecutionProvider", {})
            self._device_id = int(cuda_options.get("device_id", 0))
        log.info("loaded %s with %s (max_batch=%d)", path, self.session.get_providers(), self.max_batch)

    @property
    def inputs(self) -> list[TensorInfo]:
        return [_info(i) for i in self.session.get_inputs()]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [_info(o) for o in self.session.get_outputs()]

    def _run(self, inputs: dict, output_names: Sequence[str]) -> dict:
        if self.device == "cuda":
            return self._run_bound(inputs, output_names)
        feed = {}
        for name, arr in inputs.items():
            arr = np.asarray(arr)
            feed[name] = arr.astype(np.float16 if self._float16 else np.float32, copy=False)
        try:
            values = self.session.run(list(output_names), feed)
        except Exception as exc:
            raise InvalidInputError(f"ONNX Runtime rejected the input: {exc}") from exc
        return {n: (v.astype(np.float32) if v.dtype == np.float16 else v) for n, v in zip(output_names, values)}

    def _output_shape(self, name: str, batch: int) -> Optional[tuple]:
        """Shape of output ``name`` for a batch, when the metadata tells it (None: let ORT allocate)."""
        meta = self.metadata
        if name in (meta.probs_output, meta.logits_output):
            return (batch, meta.num_classes)
        if name == meta.activation_output:
            return (batch, *meta.activation_shape)
        return None

    def _run_bound(self, inputs: dict, output_names: Sequence[str]) -> dict:
        """One batch on the GPU with IOBinding: CuPy buffers bound by pointer, no host copies."""
        cp = self._cp
        dtype = cp.float16 if self._float16 else cp.float32
        feeds = {name: cp.asarray(arr, dtype=dtype) for name, arr in inputs.items()}
        batch = int(next(iter(feeds.values())).shape[0])
        shapes = {name: self._output_shape(name, batch) for name in output_names}
        # ORT runs on its own CUDA stream: the input must be complete before it starts (the
        # run itself returns only once its outputs are written).
        cp.cuda.get_current_stream().synchronize()
        results = run_with_binding(self.session, cp, "cuda", self._device_id, feeds, shapes, self._output_types)
        return {n: (v.astype(cp.float32) if v.dtype == cp.float16 else v) for n, v in results.items()}


def run_with_binding(session, xp, device_type: str, device_id: int, feeds: dict, output_shapes: dict,
                     output_types: dict) -> dict:
    """Run ``session`` with IOBinding on arrays of module ``xp`` living on ``device_type``.

    Inputs are bound at their data pointers; outputs with a known shape (``output_shapes[name]``
    not None) are written straight into new ``xp`` arrays, the others are allocated by ORT
    and copied (through the host). ``output_types`` maps names to ORT type strings.
    """
    binding = session.io_binding()
    keep = []  # arrays whose memory is bound: referenced until the run returns
    for name, arr in feeds.items():
        arr = xp.ascontiguousarray(arr)
        keep.append(arr)
        binding.bind_input(name, device_type, device_id, arr.dtype, tuple(arr.shape), _pointer(arr))
    results = {}
    for name, shape in output_shapes.items():
        if shape is None:
            binding.bind_output(name, device_type, device_id)
            continue
        dtype = np.float16 if output_types[name] == "tensor(float16)" else np.float32
        results[name] = xp.empty(shape, dtype=dtype)
        binding.bind_output(name, device_type, device_id, np.dtype(dtype), tuple(shape), _pointer(results[name]))
    try:
        session.run_with_iobinding(binding)
    except Exception as exc:
        raise InvalidInputError(f"ONNX Runtime rejected the input: {exc}") from exc
    unbound = [n for n in output_shapes if n not in results]
    if unbound:  # not on the explain path: outputs the metadata gives no shape for
        for name, value in zip(output_shapes, binding.get_outputs()):  # binding order
            if name in unbound:
                results[name] = xp.asarray(value.numpy())
    return {name: results[name] for name in output_shapes}


def _pointer(arr) -> int:
    """Address of an array's first element (CuPy or NumPy)."""
    data = arr.data
    return int(data.ptr) if hasattr(data, "ptr") else int(arr.ctypes.data)


def _info(arg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorInfo(arg.name, shape, arg.type.replace("tensor(", "").rstrip(")"))
