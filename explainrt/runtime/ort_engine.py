"""ONNX Runtime engine: CPU everywhere, CUDA/TensorRT execution providers with onnxruntime-gpu.

On ``device="cuda"`` the CUDA execution provider is the default. ORT runs on a stream of its
own, so each chunk costs one host synchronisation (the input must be complete before ORT
starts); the torch and TensorRT engines have none. The TensorRT execution provider is used
only when asked for (``providers=["TensorrtExecutionProvider", ...]``); it then gets an
explicit batch profile (1 / max_batch / max_batch) and an engine cache, so it builds one
TensorRT engine per model once, not one per batch size seen (tens of seconds each).
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np

from ..errors import InvalidInputError, ModelError, require
from ..export.metadata import ModelMetadata, read_metadata_props
from .base import DeviceEngine, TensorInfo
from .staging import pointer

log = logging.getLogger(__name__)

TENSORRT_EP = "TensorrtExecutionProvider"


def default_providers(device: str) -> list[str]:
    """Execution providers for ``device``: CPU, or CUDA (onnxruntime-gpu); TensorRT only when asked."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise ModelError(
            f"device='{device}' needs onnxruntime-gpu (providers available here: {available}); "
            "install onnxruntime-gpu, or use device='cpu'"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def tensorrt_provider_options(meta: ModelMetadata, max_batch: int, cache_dir: str, fp16: bool = False) -> dict:
    """TensorRT EP options: one explicit batch profile and an engine cache (ORT >= 1.15 option names).

    A fixed-batch model's profile is that batch alone.
    """
    c, (h, w) = meta.channels, meta.input_size
    lo, max_batch = meta.fixed_batch or 1, meta.fixed_batch or max_batch

    def shape(batch: int) -> str:
        return f"{meta.input_name}:{batch}x{c}x{h}x{w}"

    return {
        "trt_profile_min_shapes": shape(lo),
        "trt_profile_opt_shapes": shape(max_batch),
        "trt_profile_max_shapes": shape(max_batch),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache_dir,
        "trt_timing_cache_enable": "True",
        "trt_fp16_enable": "True" if fp16 else "False",
    }


def with_tensorrt_options(providers: Sequence, options: dict) -> list:
    """``providers`` with a bare TensorRT EP name given ``options`` (an entry with options is kept)."""
    return [(p, options) if p == TENSORRT_EP else p for p in providers]


class OnnxRuntimeEngine(DeviceEngine):
    """Runs an exported model with ONNX Runtime.

    On ``device="cpu"`` NumPy in, NumPy out. On ``device="cuda"`` (onnxruntime-gpu) CuPy in,
    CuPy out through IOBinding: the input is bound at its device pointer and the outputs are
    written into CuPy buffers, so no data goes through the host, but the host waits for each
    chunk's input before ORT runs (ORT's stream is its own). ``session_config``: extra ONNX
    Runtime session config entries (``add_session_config_entry``). ``trt_cache_dir``: where
    the TensorRT EP, when listed in ``providers``, caches engines (default: beside the model).
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
        trt_cache_dir: Optional[str] = None,
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
        providers = list(providers or default_providers(device))
        if TENSORRT_EP in providers:
            meta_for_profile = metadata or read_metadata_props(_onnx_metadata_props(path), path)
            cache = trt_cache_dir or os.path.join(os.path.dirname(os.path.abspath(path)), "ort_trt_cache")
            os.makedirs(cache, exist_ok=True)
            providers = with_tensorrt_options(providers, tensorrt_provider_options(meta_for_profile, max_batch, cache))
        try:
            self.session = ort.InferenceSession(path, opts, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ModelError(f"ONNX Runtime could not load {path}: {exc}") from exc
        meta = metadata or read_metadata_props(self.session.get_modelmeta().custom_metadata_map, path)
        super().__init__(meta, max_batch)
        self.device = "cpu" if device == "cpu" else "cuda"
        self.path = path
        names = {o.name for o in self.session.get_outputs()}
        for role, name in meta.engine_outputs():
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
            self._init_device(require("cupy", "gpu", "the ONNX Runtime engine on CUDA (CuPy arrays in and out)"),
                              np.float16 if self._float16 else np.float32)
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
            return super()._run(inputs, output_names)  # DeviceEngine: handshake, staging, hand-back
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

    def _enqueue(self, x, output_names: list, stream) -> dict:
        """One batch with IOBinding: CuPy buffers bound by pointer, no host copies, one host wait."""
        batch = int(x.shape[0])
        shapes = {name: self._output_shape(name, batch) for name in output_names}
        # ORT runs on its own CUDA stream: the staged input must be complete before it starts
        # (the run itself returns only once its outputs are written).
        stream.synchronize()
        return run_with_binding(self.session, self._cp, "cuda", self._device_id, {self.metadata.input_name: x},
                                shapes, self._output_types)


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
        binding.bind_input(name, device_type, device_id, arr.dtype, tuple(arr.shape), pointer(arr))
    results = {}
    for name, shape in output_shapes.items():
        if shape is None:
            binding.bind_output(name, device_type, device_id)
            continue
        dtype = np.float16 if output_types[name] == "tensor(float16)" else np.float32
        results[name] = xp.empty(shape, dtype=dtype)
        binding.bind_output(name, device_type, device_id, np.dtype(dtype), tuple(shape), pointer(results[name]))
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


def _onnx_metadata_props(path: str) -> dict:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _info(arg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorInfo(arg.name, shape, arg.type.replace("tensor(", "").rstrip(")"))
