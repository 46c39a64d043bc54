"""Feature CAM's explanation-map evaluation (seed 001) on a model with a known score."""
import numpy as np
import pytest

from metric_models import REGION, REGION_SCALE, sigmoid
from explainrt import InvalidInputError
from explainrt.metrics import (explanation_map, explanation_map_scores, explanation_mask,
                               summarise_explanation_maps)


def test_mask_keeps_pixels_strictly_above_the_80th_percentile():
    sal = np.arange(100, dtype=np.float64).reshape(10, 10)
    mask = explanation_mask(sal)
    assert mask.sum() == 20 and mask.reshape(-1)[80:].all()  # np.percentile → 79.2: values 80..99 kept
    relu_like = np.zeros((10, 10))
    relu_like[0, :7] = np.linspace(0.2, 1.0, 7)
    assert explanation_mask(relu_like).sum() == 7  # the 80th percentile is 0: only positive pixels pass
    assert explanation_mask(sal, 50).sum() == 50
    with pytest.raises(InvalidInputError):
        explanation_mask(sal, 100)


def test_explanation_map_zeroes_the_rest():
    x = np.random.default_rng(0).normal(size=(1, 3, 10, 10)).astype(np.float32)
    sal = np.arange(100, dtype=np.float32).reshape(10, 10)
    out = explanation_map(x, sal)
    np.testing.assert_array_equal(out.reshape(1, 3, 100)[..., 80:], x.reshape(1, 3, 100)[..., 80:])
    assert not out.reshape(1, 3, 100)[..., :80].any()


def test_scores_on_region_model(region_model):
    x = np.ones((1, 3, 8, 8), np.float32)
    inside = np.zeros((8, 8), np.float32)
    inside[REGION] = np.arange(16).reshape(4, 4) + 1.0  # top 20% (12.8 px → 12) all inside the region
    outside = 1.0 - (inside > 0)  # the region is below the percentile: dropped
    outside += np.random.default_rng(0).random((8, 8)) * 1e-3
    scores = explanation_map_scores(region_model, x, {"inside": inside, "outside": outside})
    kept_inside = explanation_mask(inside)
    m_inside = kept_inside[REGION].sum() / 16.0
    s = scores["inside"]
    assert s.original_class == 0 and s.original_prob == pytest.approx(sigmoid(REGION_SCALE), abs=1e-6)
    assert s.map_prob == pytest.approx(sigmoid(REGION_SCALE * m_inside), abs=1e-6)
    assert s.right and not s.increase  # m < 1 but > 0: still class 0, lower confidence
    assert s.kept_fraction == pytest.approx(kept_inside.mean())
    o = scores["outside"]
    assert o.map_prob == pytest.approx(0.5, abs=1e-6)  # region all zero: logits tie
    summary = summarise_explanation_maps([s, o])
    assert summary["mean_confidence"] == pytest.approx((s.map_prob + o.map_prob) / 2)
    assert summary["right_classification_pct"] == pytest.approx(100.0 * (1 + o.right) / 2)
    assert summary["confidence_increase_pct"] == 0.0


def test_single_map_returns_one_score(region_model):
    x = np.ones((1, 3, 8, 8), np.float32)
    score = explanation_map_scores(region_model, x, np.ones((8, 8)) * np.arange(8)[:, None])
    assert score.original_class == 0 and 0 < score.kept_fraction < 0.3
