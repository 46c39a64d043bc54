"""EfficientNet-Lite0 (pretrained, from PyPI) on scikit-image's chelsea: a cat, and sane maps."""
from __future__ import annotations

import numpy as np
import pytest

from explainrt import Explainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def explainer(lite0):
    return Explainer(lite0[1], batch_size=64)


def test_top1_is_a_cat(explainer, chelsea):
    probs = explainer.predict(chelsea)
    assert int(np.argmax(probs)) in range(281, 286)
    assert explainer.metadata.label(int(np.argmax(probs))) == "Egyptian cat"


@pytest.mark.parametrize("method,params,min_passes,max_passes", [
    ("fem", {}, 1, 1),
    ("sidu", {}, 100, 1281),
    ("scorecam", {}, 100, 1281),
    ("rise", {"n_masks": 256}, 257, 257),
    ("featurecam", {"base": "fem"}, 1, 1),
])
def test_each_method_gives_a_finite_non_constant_map(explainer, chelsea, method, params, min_passes, max_passes):
    result = explainer.explain(chelsea, method, **params)
    sal = result.saliency
    assert result.target in range(281, 286)
    assert sal.shape == (224, 224) and sal.dtype == np.float32
    assert np.isfinite(sal).all() and sal.min() >= 0.0 and sal.max() <= 1.0
    assert sal.std() > 0.05
    assert min_passes <= result.forward_passes <= max_passes
    overlay = result.overlay()
    assert overlay.shape == chelsea.shape and overlay.dtype == np.uint8


def test_exact_speedups_cut_passes(explainer, chelsea):
    """SIDU runs distinct masks only; Score-CAM skips constant channels.

    Measured with this preprocessing ((x − 127)/128, INTER_AREA resize): 383 distinct SIDU masks
    and 764 constant channels (ALGORITHMS.md quotes 388 and 751 with another preprocessing).
    """
    sidu = explainer.explain(chelsea, "sidu")
    score = explainer.explain(chelsea, "scorecam")
    assert abs(sidu.forward_passes - 384) <= 5
    assert abs(score.extras["channels_skipped"] - 764) <= 5
    assert score.forward_passes == 1 + 1280 - score.extras["channels_skipped"]
