"""explainrt: forward-only visual explanations of deployed CNN classifiers, at engine speed.

    from explainrt import Explainer
    explainer = Explainer("models/lite0.onnx", batch_size=64)
    result = explainer.explain("cat.jpg", method="sidu")
    result.saliency  # float32 (H, W) in [0, 1]
"""
from .api import ConstantMapWarning, Explainer, Explanation
from .errors import ExplainRTError, InvalidInputError, MissingDependencyError, ModelError
from .export.metadata import ModelMetadata
from .runtime import Engine, load_engine

__version__ = "0.1.0"


def load_model(path: str, backend: str = "onnxruntime", device: str = "cpu", max_batch: int = 64, **kwargs) -> Engine:
    """Open an exported model as an engine (alias of ``runtime.load_engine``)."""
    return load_engine(path, backend=backend, device=device, max_batch=max_batch, **kwargs)


__all__ = ["ConstantMapWarning", "Engine", "Explainer", "Explanation", "ExplainRTError", "InvalidInputError",
           "MissingDependencyError", "ModelError", "ModelMetadata", "load_engine", "load_model", "__version__"]
