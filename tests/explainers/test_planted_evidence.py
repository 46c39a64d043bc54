"""Localisation of planted evidence: a model that decides on a red patch; every map must peak on it."""
from __future__ import annotations

import numpy as np
import pytest

from explainrt import Explainer
from explainrt.export import export_torch

torch = pytest.importorskip("torch")

SIZE = 64
PATCH = (40, 52, 12, 24)  # y0, y1, x0, x1: the red square


def red_detector():
    """Class 1 ('red') fires on saturated red pixels only; class 0 is a constant.

    Channel 0 of the explained layer is a red detector (R − G − B, ReLU); channels 1–5 are weak
    texture detectors so the methods have distractor channels to weigh.
    """
    torch.manual_seed(0)
    conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
    conv2 = torch.nn.Conv2d(6, 6, 3, stride=4, padding=1)
    with torch.no_grad():
        conv1.weight.normal_(0, 0.05)
        conv1.bias.zero_()
        conv1.weight[0] = 0
        conv1.weight[0, :, 1, 1] = torch.tensor([1.0, -1.0, -1.0])
        conv1.bias[0] = -0.3
        conv2.weight.normal_(0, 0.05)
        conv2.bias.zero_()
        conv2.weight[0] = 0
        conv2.weight[0, 0] = 1.0 / 3  # red response ≈ 1.3, above SIDU τ = 0.5
        linear = torch.nn.Linear(6, 2)
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([0.5, -1.0]))
        linear.weight[1, 0] = 200.0
    return torch.nn.Sequential(conv1, torch.nn.ReLU(), conv2, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), linear).eval()


def planted_image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 180, (SIZE, SIZE, 3)).astype(np.uint8)
    img[..., 0] = img[..., 1]  # grey noise: no red anywhere …
    img[..., 2] = img[..., 1]
    y0, y1, x0, x1 = PATCH
    img[y0:y1, x0:x1] = (230, 20, 20)  # … but here
    return img


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("planted") / "red.onnx")
    export_torch(red_detector(), path, input_size=(SIZE, SIZE), mean=(0, 0, 0), std=(255, 255, 255),
                 labels=["grey", "red"])
    return Explainer(path, batch_size=16)


def test_model_decides_on_the_patch(detector):
    img = planted_image()
    assert int(np.argmax(detector.predict(img))) == 1
    grey = img.copy()
    grey[PATCH[0]:PATCH[1], PATCH[2]:PATCH[3]] = 128
    assert int(np.argmax(detector.predict(grey))) == 0


@pytest.mark.parametrize("method,params", [
    ("sidu", {}), ("sidu", {"threshold": 0.1}), ("scorecam", {}), ("scorecam", {"score": "logit"}),
    ("rise", {"n_masks": 300, "grid_size": 8}), ("fem", {}), ("featurecam", {}),
    ("featurecam", {"base": "sidu", "combination": "complement", "feature_input": "blend11"}),
])
def test_saliency_peaks_on_planted_patch(detector, method, params):
    result = detector.explain(planted_image(), method, target=1, **params)
    sal = result.saliency
    assert sal.shape == (SIZE, SIZE) and np.isfinite(sal).all()
    assert sal.min() >= 0.0 and sal.max() <= 1.0 and sal.max() > sal.min()
    y, x = np.unravel_index(int(np.argmax(sal)), sal.shape)
    y0, y1, x0, x1 = PATCH
    margin = 3  # bilinear upsampling of a 16×16 activation blurs the edges
    assert y0 - margin <= y < y1 + margin and x0 - margin <= x < x1 + margin, (method, (y, x))
    inside = sal[y0:y1, x0:x1].mean()
    outside = np.delete(sal.reshape(-1), np.ravel_multi_index(np.mgrid[y0:y1, x0:x1].reshape(2, -1), sal.shape)).mean()
    assert inside > 2 * outside, (method, inside, outside)
