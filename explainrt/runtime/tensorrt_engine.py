"""TensorRT engine: native plans built from the exported ONNX file, run on CuPy buffers.

Build (``build_plan`` / ``explainrt build``): TensorRT >= 10 ``Builder`` + ``OnnxParser``, one
optimisation profile over the batch axis (1 / opt / max), FP32 or FP16, a timing cache file,
and the model's explainrt metadata saved beside the plan as ``<plan>.json``. FP16 uses
``BuilderFlag.FP16`` where it exists (TensorRT 10); TensorRT 11 removed the weak-typing flags,
so there the ONNX file is converted to FP16 first (inputs and outputs stay FP32) and built
as is.

Run: name-based I/O (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) on
CuPy's current stream. Output buffers are allocated once at ``max_batch``; a tensor is
re-bound only when its shape or address changes.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from ..errors import InvalidInputError, ModelError, require
from ..export.metadata import ModelMetadata, read_metadata_props
from .base import Engine, TensorInfo

log = logging.getLogger(__name__)

PLAN_INFO_SUFFIX = ".json"


def plan_info_path(plan_path: str) -> str:
    """Where the metadata of a plan is kept: ``<plan>.json``."""
    return plan_path + PLAN_INFO_SUFFIX


def default_plan_path(onnx_path: str, max_batch: int, fp16: bool) -> str:
    """``model.onnx`` → ``model.b64.fp32.plan`` (the batch limit and precision in the name)."""
    stem = onnx_path[:-5] if onnx_path.endswith(".onnx") else onnx_path
    return f"{stem}.b{max_batch}.{'fp16' if fp16 else 'fp32'}.plan"


def _trt():
    return require("tensorrt", "trt", "the TensorRT engine")


_logger_instance = None


def _logger(trt):
    """One TensorRT logger for the process (builders and runtimes share it)."""
    global _logger_instance
    if _logger_instance is None:
        _logger_instance = trt.Logger(trt.Logger.WARNING)
    return _logger_instance


def has_fp16_flag(trt) -> bool:
    """TensorRT 10 builds FP16 with a builder flag; TensorRT 11 (strong typing) has none."""
    return hasattr(trt.BuilderFlag, "FP16")


def onnx_to_fp16(src: str, dst: str) -> None:
    """Write an FP16 copy of the ONNX model ``src`` to ``dst``, inputs and outputs kept FP32.

    Uses onnxconverter-common's float16 conversion, or the copy that ships inside
    onnxruntime (``onnxruntime.transformers.float16``).
    """
    import onnx

    try:
        from onnxconverter_common.float16 import convert_float_to_float16
    except ImportError:
        try:
            from onnxruntime.transformers.float16 import convert_float_to_float16
        except ImportError as exc:
            raise ModelError("FP16 with TensorRT >= 11 needs an FP16 ONNX model; install onnxconverter-common "
                             f"(or onnxruntime >= 1.17, which ships the converter) ({exc})") from exc
    model = onnx.load(src)
    converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, dst)


def build_plan(onnx_path: str, plan_path: Optional[str] = None, max_batch: int = 64, fp16: bool = False,
               opt_batch: Optional[int] = None, workspace_gb: Optional[float] = None,
               timing_cache: Optional[str] = None) -> dict:
    """Build a TensorRT plan from an exported ONNX model; returns the info saved as ``<plan>.json``.

    ``opt_batch`` (default ``max_batch``) is the batch TensorRT tunes for; ``timing_cache`` a
    file reused and updated across builds (default: ``trt_timing.cache`` beside the plan).
    """
    trt = _trt()
    import onnx

    if max_batch < 1:
        raise InvalidInputError(f"max_batch must be at least 1, got {max_batch}")
    opt_batch = int(opt_batch or max_batch)
    if not 1 <= opt_batch <= max_batch:
        raise InvalidInputError(f"opt_batch must be within 1..max_batch={max_batch}, got {opt_batch}")
    if not os.path.isfile(onnx_path):
        raise ModelError(f"model file not found: {onnx_path}")
    model = onnx.load(onnx_path, load_external_data=False)
    meta = read_metadata_props({p.key: p.value for p in model.metadata_props}, onnx_path)
    plan_path = plan_path or default_plan_path(onnx_path, max_batch, fp16)
    plan_dir = os.path.dirname(os.path.abspath(plan_path))
    os.makedirs(plan_dir, exist_ok=True)
    timing_cache = timing_cache or os.path.join(plan_dir, "trt_timing.cache")

    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    config = builder.create_builder_config()
    source = onnx_path
    with tempfile.TemporaryDirectory() as tmp:
        if fp16 and has_fp16_flag(trt):
            config.set_flag(trt.BuilderFlag.FP16)
        elif fp16:
            source = os.path.join(tmp, "model.fp16.onnx")
            onnx_to_fp16(onnx_path, source)
        if not parser.parse_from_file(source):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT could not parse {onnx_path}: {errors}")
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    for role, name in (("probabilities", meta.probs_output), ("activation", meta.activation_output)):
        if name not in outputs:
            raise ModelError(f"{onnx_path}: the {role} output '{name}' is not an output of the parsed network "
                             f"(outputs: {sorted(outputs)})")
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    c, (h, w) = meta.channels, meta.input_size
    profile.set_shape(meta.input_name, (1, c, h, w), (opt_batch, c, h, w), (max_batch, c, h, w))
    config.add_optimization_profile(profile)
    cache_bytes = b""
    if os.path.isfile(timing_cache):
        with open(timing_cache, "rb") as fh:
            cache_bytes = fh.read()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT failed to build {onnx_path} (see the TensorRT log above)")
    seconds = time.perf_counter() - t0
    with open(plan_path, "wb") as fh:
        fh.write(memoryview(serialized))
    with open(timing_cache, "wb") as fh:
        fh.write(memoryview(config.get_timing_cache().serialize()))

    # The activation output must survive the build as an engine I/O tensor.
    runtime = trt.Runtime(logger)  # must outlive the engine it deserialises
    engine = runtime.deserialize_cuda_engine(_read_bytes(plan_path))
    if engine is None:
        raise ModelError(f"TensorRT could not load the plan it just built ({plan_path})")
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    if meta.activation_output not in names:
        os.remove(plan_path)
        raise ModelError(f"the activation output '{meta.activation_output}' did not survive the TensorRT build "
                         f"(engine tensors: {sorted(names)})")
    info = {
        "metadata": json.loads(meta.to_json()),
        "build": {"source": os.path.abspath(onnx_path), "max_batch": int(max_batch), "opt_batch": opt_batch,
                  "fp16": bool(fp16), "fp16_via": ("builder_flag" if has_fp16_flag(trt) else "onnx") if fp16 else None,
                  "tensorrt": trt.__version__, "build_seconds": round(seconds, 2), "timing_cache": timing_cache},
    }
    with open(plan_info_path(plan_path), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=1)
    log.info("built %s from %s in %.1f s (%s, max_batch=%d)", plan_path, onnx_path, seconds,
             "fp16" if fp16 else "fp32", max_batch)
    return info


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def read_plan_info(plan_path: str) -> dict:
    """The ``<plan>.json`` written by ``build_plan``."""
    path = plan_info_path(plan_path)
    if not os.path.isfile(path):
        raise ModelError(f"{plan_path} has no metadata file {path}; build plans with `explainrt build`")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read the plan metadata {path}: {exc}; rebuild the plan") from exc


class TensorRTEngine(Engine):
    """Runs a TensorRT plan on CuPy arrays (CUDA only).

    ``path`` is a ``.plan`` (with its ``.json`` beside it) or an exported ``.onnx``, which is
    built once into ``default_plan_path(...)`` and reused while the plan is newer than it.
    ``threads`` is accepted for interface parity with the CPU engines and has no effect.
    """

    backend = "tensorrt"
    device = "cuda"

    def __init__(self, path: str, max_batch: int = 64, device: str = "cuda", fp16: bool = False,
                 plan_path: Optional[str] = None, opt_batch: Optional[int] = None,
                 workspace_gb: Optional[float] = None, timing_cache: Optional[str] = None,
                 threads: Optional[int] = None):
        if device != "cuda":
            raise InvalidInputError("the TensorRT engine runs on device='cuda' only")
        trt = _trt()
        self._cp = cp = require("cupy", "gpu", "the TensorRT engine (CuPy buffers)")
        self.xp = cp
        self._trt = trt
        if not os.path.isfile(path):
            raise ModelError(f"model file not found: {path}")
        if path.endswith(".onnx"):
            plan = plan_path or default_plan_path(path, max_batch, fp16)
            if not (os.path.isfile(plan) and os.path.isfile(plan_info_path(plan))
                    and os.path.getmtime(plan) >= os.path.getmtime(path)):
                build_plan(path, plan, max_batch=max_batch, fp16=fp16, opt_batch=opt_batch,
                           workspace_gb=workspace_gb, timing_cache=timing_cache)
            path = plan
        info = read_plan_info(path)
        meta = ModelMetadata.from_json(json.dumps(info["metadata"]))
        built_max = int(info["build"]["max_batch"])
        if max_batch > built_max:
            raise InvalidInputError(f"{path} was built for batches up to {built_max}, not {max_batch}; rebuild it "
                                    f"with `explainrt build --max-batch {max_batch}` or use max_batch <= {built_max}")
        super().__init__(meta, max_batch)
        self.path = path
        self.fp16 = bool(info["build"].get("fp16"))
        self._runtime = trt.Runtime(_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(_read_bytes(path))
        if self.engine is None:
            raise ModelError(f"TensorRT could not load {path} (built with TensorRT {info['build'].get('tensorrt')}, "
                             f"this is {trt.__version__}); rebuild it with `explainrt build`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._output_names = [n for n in names if n not in self._input_names]
        if self._input_names != [meta.input_name]:
            raise ModelError(f"{path}: expected one input '{meta.input_name}', the plan has {self._input_names}")
        for role, name in (("probabilities", meta.probs_output), ("activation", meta.activation_output)):
            if name not in self._output_names:
                raise ModelError(f"{path}: the {role} output '{name}' is not in the plan ({self._output_names})")
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # Output buffers at max_batch, allocated and bound once.
        self._buffers = {}
        for name in self._output_names:
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape[1:]):
                raise ModelError(f"{path}: output '{name}' has shape {shape}; only the batch axis may be dynamic")
            self._buffers[name] = cp.empty((self.max_batch, *shape[1:]), dtype=self._dtypes[name])
            self.context.set_tensor_address(name, self._buffers[name].data.ptr)
        self._bound_shape: Optional[tuple] = None
        self._bound_input_ptr: Optional[int] = None
        self._input_ref = None  # the bound input stays referenced until the next call
        # enqueueV3 on the legacy default stream makes TensorRT synchronise; callers on it get
        # this stream instead, ordered with theirs by events.
        self._own_stream = cp.cuda.Stream(non_blocking=True)
        log.info("loaded TensorRT plan %s (%s, max_batch=%d)", path, "fp16" if self.fp16 else "fp32", self.max_batch)

    @property
    def inputs(self) -> list[TensorInfo]:
        return [self._tensor_info(n) for n in self._input_names]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [self._tensor_info(n) for n in self._output_names]

    def _tensor_info(self, name: str) -> TensorInfo:
        shape = tuple(None if d < 0 else int(d) for d in self.engine.get_tensor_shape(name))
        return TensorInfo(name, shape, str(self._dtypes[name]))

    def _run(self, inputs: dict, output_names: Sequence[str]) -> dict:
        cp = self._cp
        name = self.metadata.input_name
        x = cp.ascontiguousarray(cp.asarray(inputs[name], dtype=self._dtypes[name]))
        shape = tuple(int(d) for d in x.shape)
        if shape != self._bound_shape:
            if not self.context.set_input_shape(name, shape):
                raise InvalidInputError(f"TensorRT rejected the input shape {shape} (the plan takes "
                                        f"(1..{self.max_batch}, {', '.join(map(str, shape[1:]))}))")
            self._bound_shape = shape
        if x.data.ptr != self._bound_input_ptr:
            self.context.set_tensor_address(name, x.data.ptr)
            self._bound_input_ptr = x.data.ptr
        self._input_ref = x
        caller = cp.cuda.get_current_stream()
        stream = self._own_stream if caller.ptr == 0 else caller
        if stream is not caller:
            stream.wait_event(caller.record())
        if not self.context.execute_async_v3(stream.ptr):
            raise ModelError("TensorRT failed to execute the plan (see the TensorRT log)")
        if stream is not caller:
            caller.wait_event(stream.record())
        batch = shape[0]
        # The buffers are overwritten by the next call: hand out copies (stream-ordered, no sync).
        return {n: self._buffers[n][:batch].astype(cp.float32, copy=True) for n in output_names}

    def close(self) -> None:
        self._input_ref = None
        self._buffers.clear()
        self.context = None
        self.engine = None
