"""TensorRT plan building, apart from running (Polygraphy's loader/runner split).

``build_plan`` (also ``explainrt build``): TensorRT >= 10 ``Builder`` + ``OnnxParser``, one
optimisation profile over the batch axis (``batch_profile``: 1 / opt / max), the precision
policy (``apply_precision``: FP16 by ``BuilderFlag.FP16`` on TensorRT 10, by an FP16 ONNX copy
on TensorRT 11, which dropped the weak-typing flags; TF32 cleared unless asked for), a timing
cache file, and the model's explainrt metadata plus the build policy saved beside the plan as
``<plan>.json``. ``tensorrt_engine.TensorRTEngine`` only loads and runs plans.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Optional

from ..errors import InvalidInputError, ModelError, require
from ..export.metadata import ModelMetadata, read_metadata_props

log = logging.getLogger(__name__)

PLAN_INFO_SUFFIX = ".json"


def plan_info_path(plan_path: str) -> str:
    """Where the metadata of a plan is kept: ``<plan>.json``."""
    return plan_path + PLAN_INFO_SUFFIX


def default_plan_path(onnx_path: str, max_batch: int, fp16: bool) -> str:
    """``model.onnx`` → ``model.b64.fp32.plan`` (the batch limit and precision in the name)."""
    stem = onnx_path[:-5] if onnx_path.endswith(".onnx") else onnx_path
    return f"{stem}.b{max_batch}.{'fp16' if fp16 else 'fp32'}.plan"


def import_tensorrt():
    return require("tensorrt", "trt", "the TensorRT engine")


_logger_instance = None


def trt_logger(trt):
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


def apply_precision(trt, config, fp16: bool, tf32: bool) -> Optional[str]:
    """Set the builder's precision flags; returns how FP16 is obtained (None, "builder_flag", "onnx").

    TensorRT enables TF32 for FP32 layers by default; explainrt clears it unless ``tf32`` is
    asked for, so an "FP32" plan computes in FP32 like the torch engine (TF32 is ~1e-3 off).
    """
    if hasattr(trt.BuilderFlag, "TF32"):
        if tf32:
            config.set_flag(trt.BuilderFlag.TF32)
        else:
            config.clear_flag(trt.BuilderFlag.TF32)
    if not fp16:
        return None
    if has_fp16_flag(trt):
        config.set_flag(trt.BuilderFlag.FP16)
        return "builder_flag"
    return "onnx"


def batch_profile(builder, meta: ModelMetadata, opt_batch: int, max_batch: int):
    """The one optimisation profile: the batch axis from 1 over ``opt_batch`` to ``max_batch``."""
    profile = builder.create_optimization_profile()
    c, (h, w) = meta.channels, meta.input_size
    profile.set_shape(meta.input_name, (1, c, h, w), (opt_batch, c, h, w), (max_batch, c, h, w))
    return profile


def static_batch(network) -> Optional[int]:
    """The batch a parsed network's input hard-codes (a fixed-batch ONNX), or None when it is dynamic."""
    dims = tuple(network.get_input(0).shape)
    return int(dims[0]) if dims and int(dims[0]) > 0 else None


def build_plan(onnx_path: str, plan_path: Optional[str] = None, max_batch: int = 64, fp16: bool = False,
               opt_batch: Optional[int] = None, workspace_gb: Optional[float] = None,
               timing_cache: Optional[str] = None, tf32: bool = False) -> dict:
    """Build a TensorRT plan from an exported ONNX model; returns the info saved as ``<plan>.json``.

    ``opt_batch`` (default ``max_batch``) is the batch TensorRT tunes for; ``timing_cache`` a
    file reused and updated across builds (default: ``trt_timing.cache`` beside the plan);
    ``tf32`` lets FP32 layers use TF32 (off by default; recorded in the plan's metadata). A model
    whose input has a fixed batch (``static_batch``) builds without a profile; its plan runs that
    batch only, recorded as ``max_batch`` and ``fixed_batch``.
    """
    trt = import_tensorrt()
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

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    config = builder.create_builder_config()
    source = onnx_path
    fp16_via = apply_precision(trt, config, fp16, tf32)
    with tempfile.TemporaryDirectory() as tmp:
        if fp16_via == "onnx":
            source = os.path.join(tmp, "model.fp16.onnx")
            onnx_to_fp16(onnx_path, source)
        if not parser.parse_from_file(source):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT could not parse {onnx_path}: {errors}")
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    for role, name in meta.engine_outputs():
        if name not in outputs:
            raise ModelError(f"{onnx_path}: the {role} output '{name}' is not an output of the parsed network "
                             f"(outputs: {sorted(outputs)})")
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    fixed = static_batch(network)
    if fixed is None:
        config.add_optimization_profile(batch_profile(builder, meta, opt_batch, max_batch))
    else:  # nothing to profile: the plan runs its one batch (engines pad smaller batches up to it)
        max_batch = opt_batch = meta.fixed_batch = fixed
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
    engine = runtime.deserialize_cuda_engine(read_bytes(plan_path))
    if engine is None:
        raise ModelError(f"TensorRT could not load the plan it just built ({plan_path})")
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    if meta.has_activation and meta.activation_output not in names:
        os.remove(plan_path)
        raise ModelError(f"the activation output '{meta.activation_output}' did not survive the TensorRT build "
                         f"(engine tensors: {sorted(names)})")
    info = {
        "metadata": json.loads(meta.to_json()),
        "build": {"source": os.path.abspath(onnx_path), "max_batch": int(max_batch), "opt_batch": opt_batch,
                  "fixed_batch": fixed,
                  "fp16": bool(fp16), "fp16_via": fp16_via, "tf32": bool(tf32),
                  "tensorrt": trt.__version__, "build_seconds": round(seconds, 2), "timing_cache": timing_cache},
    }
    with open(plan_info_path(plan_path), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=1)
    log.info("built %s from %s in %.1f s (%s%s, %s=%d)", plan_path, onnx_path, seconds,
             "fp16" if fp16 else "fp32", ", tf32" if tf32 else "", "max_batch" if fixed is None else "fixed batch",
             max_batch)
    return info


def read_bytes(path: str) -> bytes:
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
