"""TensorRT engine: loads and runs plans on CuPy buffers (building lives in ``tensorrt_build``).

Name-based I/O (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) on the
engine's own stream, ordered with the caller's by events (``base.DeviceEngine``). Output
buffers are allocated once at ``max_batch``; a tensor is re-bound only when its shape or
address changes, and every ``set_*`` result is checked: TensorRT keeps the previous address
when it rejects one (I/O pointers must be 256-byte aligned), which would run the plan on a
stale input. ``DeviceEngine`` copies misaligned inputs into an aligned staging buffer.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np

from ..errors import InvalidInputError, ModelError, require
from ..export.metadata import ModelMetadata
from .base import DeviceEngine, TensorInfo
from .staging import IO_ALIGNMENT
from .tensorrt_build import (build_plan, default_plan_path, import_tensorrt, plan_info_path, read_bytes,
                             read_plan_info, trt_logger)

log = logging.getLogger(__name__)


class TensorRTEngine(DeviceEngine):
    """Runs a TensorRT plan on CuPy arrays (CUDA only).

    ``path`` is a ``.plan`` (with its ``.json`` beside it) or an exported ``.onnx``, which is
    built once into ``default_plan_path(...)`` and reused while the plan is newer than it.
    ``fp16``/``tf32``/``opt_batch``/``workspace_gb``/``timing_cache`` apply when it builds;
    a loaded plan's ``fp16`` and ``tf32`` come from its ``.json``. A plan built with a static
    batch reports it as ``max_batch`` and ``fixed_batch`` (any ``max_batch`` asked for is accepted;
    smaller batches are padded up to it). ``threads`` is accepted for interface parity with the CPU
    engines and has no effect.
    """

    backend = "tensorrt"
    device = "cuda"

    def __init__(self, path: str, max_batch: int = 64, device: str = "cuda", fp16: bool = False,
                 plan_path: Optional[str] = None, opt_batch: Optional[int] = None,
                 workspace_gb: Optional[float] = None, timing_cache: Optional[str] = None,
                 tf32: bool = False, threads: Optional[int] = None):
        if device != "cuda":
            raise InvalidInputError("the TensorRT engine runs on device='cuda' only")
        trt = import_tensorrt()
        cp = require("cupy", "gpu", "the TensorRT engine (CuPy buffers)")
        self._trt = trt
        if not os.path.isfile(path):
            raise ModelError(f"model file not found: {path}")
        if path.endswith(".onnx"):
            plan = plan_path or default_plan_path(path, max_batch, fp16)
            if not (os.path.isfile(plan) and os.path.isfile(plan_info_path(plan))
                    and os.path.getmtime(plan) >= os.path.getmtime(path)):
                build_plan(path, plan, max_batch=max_batch, fp16=fp16, opt_batch=opt_batch,
                           workspace_gb=workspace_gb, timing_cache=timing_cache, tf32=tf32)
            path = plan
        info = read_plan_info(path)
        meta = ModelMetadata.from_json(json.dumps(info["metadata"]))
        built_max = int(info["build"]["max_batch"])
        meta.fixed_batch = info["build"].get("fixed_batch") or meta.fixed_batch  # a static-batch plan
        if max_batch > built_max and meta.fixed_batch is None:
            raise InvalidInputError(f"{path} was built for batches up to {built_max}, not {max_batch}; rebuild it "
                                    f"with `explainrt build --max-batch {max_batch}` or use max_batch <= {built_max}")
        super().__init__(meta, max_batch)
        self.path = path
        self.fp16 = bool(info["build"].get("fp16"))
        # plans built before the TF32 policy was recorded ran TensorRT's default: TF32 on
        self.tf32 = bool(info["build"].get("tf32", True))
        if "tf32" not in info["build"]:
            log.warning("%s records no TF32 policy (built by an older explainrt): TensorRT's default, TF32 on, "
                        "applies; rebuild it for FP32 parity", path)
        self._runtime = trt.Runtime(trt_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(read_bytes(path))
        if self.engine is None:
            raise ModelError(f"TensorRT could not load {path} (built with TensorRT {info['build'].get('tensorrt')}, "
                             f"this is {trt.__version__}); rebuild it with `explainrt build`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._output_names = [n for n in names if n not in self._input_names]
        if self._input_names != [meta.input_name]:
            raise ModelError(f"{path}: expected one input '{meta.input_name}', the plan has {self._input_names}")
        for role, name in meta.engine_outputs():
            if name not in self._output_names:
                raise ModelError(f"{path}: the {role} output '{name}' is not in the plan ({self._output_names})")
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._init_device(cp, self._dtypes[meta.input_name])
        # Output buffers at max_batch, allocated and bound once.
        self._buffers = {}
        for name in self._output_names:
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape[1:]):
                raise ModelError(f"{path}: output '{name}' has shape {shape}; only the batch axis may be dynamic")
            self._buffers[name] = cp.empty((self.max_batch, *shape[1:]), dtype=self._dtypes[name])
            self._bind_address(name, self._buffers[name].data.ptr)
        self._bound_shape: Optional[tuple] = None
        self._bound_input_ptr: Optional[int] = None
        log.info("loaded TensorRT plan %s (%s%s, max_batch=%d)", path, "fp16" if self.fp16 else "fp32",
                 ", tf32" if self.tf32 else "", self.max_batch)

    @property
    def inputs(self) -> list[TensorInfo]:
        return [self._tensor_info(n) for n in self._input_names]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [self._tensor_info(n) for n in self._output_names]

    def _tensor_info(self, name: str) -> TensorInfo:
        shape = tuple(None if d < 0 else int(d) for d in self.engine.get_tensor_shape(name))
        return TensorInfo(name, shape, str(self._dtypes[name]))

    def _bind_address(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise ModelError(f"TensorRT rejected the address 0x{ptr:x} of '{name}' (I/O pointers must be "
                             f"{IO_ALIGNMENT}-byte aligned; this one is {ptr % IO_ALIGNMENT} bytes past a boundary)")

    def _enqueue(self, x, output_names: list, stream) -> dict:
        name = self.metadata.input_name
        shape = tuple(int(d) for d in x.shape)
        if shape != self._bound_shape:
            if not self.context.set_input_shape(name, shape):
                raise InvalidInputError(f"TensorRT rejected the input shape {shape} (the plan takes "
                                        f"(1..{self.max_batch}, {', '.join(map(str, shape[1:]))}))")
            self._bound_shape = shape
        if x.data.ptr != self._bound_input_ptr:
            self._bound_input_ptr = None
            self._bind_address(name, x.data.ptr)
            self._bound_input_ptr = x.data.ptr
        if not self.context.execute_async_v3(stream.ptr):
            raise ModelError("TensorRT failed to execute the plan (see the TensorRT log)")
        batch = shape[0]
        # DeviceEngine copies these out on the engine's stream before the next call can overwrite them
        return {n: self._buffers[n][:batch] for n in output_names}

    def close(self) -> None:
        self.stream.synchronize()  # the plan may still read its buffers
        self._buffers.clear()
        self.context = None
        self.engine = None
