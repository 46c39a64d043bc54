"""ONNX Runtime engine: CPU everywhere, CUDA/TensorRT execution providers with onnxruntime-gpu."""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np

from ..errors import InvalidInputError, ModelError
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
    """Runs an exported model with ONNX Runtime (NumPy in, NumPy out).

    ``session_config``: extra ONNX Runtime session config entries (``add_session_config_entry``).
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
        log.info("loaded %s with %s (max_batch=%d)", path, self.session.get_providers(), self.max_batch)

    @property
    def inputs(self) -> list[TensorInfo]:
        return [_info(i) for i in self.session.get_inputs()]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [_info(o) for o in self.session.get_outputs()]

    def _run(self, inputs: dict, output_names: Sequence[str]) -> dict:
        feed = {}
        for name, arr in inputs.items():
            arr = np.asarray(arr)
            feed[name] = arr.astype(np.float16 if self._float16 else np.float32, copy=False)
        try:
            values = self.session.run(list(output_names), feed)
        except Exception as exc:
            raise InvalidInputError(f"ONNX Runtime rejected the input: {exc}") from exc
        return {n: (v.astype(np.float32) if v.dtype == np.float16 else v) for n, v in zip(output_names, values)}


def _info(arg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorInfo(arg.name, shape, arg.type.replace("tensor(", "").rstrip(")"))
