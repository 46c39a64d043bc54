"""Insertion/deletion against hand-computed curves, RISE's blur, and a naive one-image float64 loop."""
import math

import numpy as np
import pytest

from metric_models import REGION, REGION_SCALE, sigmoid
from explainrt import Explainer, InvalidInputError, load_engine
from explainrt.metrics import area_under_curve, deletion, insertion, insertion_deletion_curves, pixel_order
from explainrt.metrics.insertion_deletion import blur_substrate, rise_blur_kernel

torch = pytest.importorskip("torch")
ndimage = pytest.importorskip("scipy.ndimage")


def region_mask():
    m = np.zeros((8, 8), bool)
    m[REGION] = True
    return m


def rise_blur_reference(x64):
    """RISE's substrate: scipy gaussian_filter of an 11×11 delta, conv2d with padding 5, per channel."""
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    k = ndimage.gaussian_filter(delta, 5)
    weight = torch.zeros(3, 3, 11, 11, dtype=torch.float64)
    for c in range(3):
        weight[c, c] = torch.from_numpy(k)
    return torch.nn.functional.conv2d(torch.from_numpy(x64), weight, padding=5).numpy()


def test_area_under_curve_formula():
    assert area_under_curve([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    a = np.array([0.9, 0.7, 0.72, 0.1, 0.0])
    assert area_under_curve(a) == pytest.approx((a.sum() - a[0] / 2 - a[-1] / 2) / 4)
    assert area_under_curve(a) == pytest.approx(np.sum((a[1:] + a[:-1]) / 2) / 4)  # trapezoids of width 1/4
    with pytest.raises(InvalidInputError):
        area_under_curve([1.0])


def test_pixel_order_is_descending_and_stable():
    sal = np.array([[0.1, 0.5], [0.5, 0.9]])
    assert pixel_order(sal).tolist() == [3, 1, 2, 0]  # ties (0.5) in raster order


def test_blur_kernel_is_rises():
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    np.testing.assert_allclose(np.outer(rise_blur_kernel(), rise_blur_kernel()), ndimage.gaussian_filter(delta, 5),
                               rtol=1e-12, atol=1e-15)
    assert rise_blur_kernel().sum() == pytest.approx(1.0)


def test_blur_substrate_zero_padding_matches_conv2d():
    x = np.random.default_rng(0).normal(size=(1, 3, 13, 17))
    np.testing.assert_allclose(blur_substrate(x.astype(np.float32)), rise_blur_reference(x), atol=2e-6)


def test_deletion_curve_of_region_model(region_model):
    x = np.ones((1, 3, 8, 8), np.float32)
    sal = region_mask().astype(np.float32)  # the region first, ties in raster order
    curve = deletion(region_model, x, sal, step=4)
    m = np.r_[1.0 - np.arange(5) / 4.0, np.zeros(12)]  # 4 region pixels per step, then the rest
    expected = sigmoid(REGION_SCALE * m)
    assert curve.scores.shape == (64 // 4 + 1,)
    np.testing.assert_allclose(curve.scores, expected, atol=1e-6)
    assert curve.auc == pytest.approx(area_under_curve(expected), abs=1e-6)
    assert curve.target == 0
    np.testing.assert_allclose(curve.fractions, np.arange(17) / 16)

    # The region last: the score stays up until 48 other pixels are gone.
    late = deletion(region_model, x, 1.0 - sal, step=4)
    m_late = np.r_[np.ones(13), 1.0 - np.arange(1, 5) / 4.0]
    np.testing.assert_allclose(late.scores, sigmoid(REGION_SCALE * m_late), atol=1e-6)
    assert late.auc > curve.auc


def test_deletion_constant_map_goes_in_raster_order(region_model):
    x = np.ones((1, 3, 8, 8), np.float32)
    curve = deletion(region_model, x, np.zeros((8, 8), np.float32), step=8)  # one row per step
    rows_of_region_deleted = np.clip(np.arange(9) - 2, 0, 4)
    np.testing.assert_allclose(curve.scores, sigmoid(REGION_SCALE * (1.0 - rows_of_region_deleted / 4.0)), atol=1e-6)


def test_insertion_curve_of_region_model(region_model):
    x = np.ones((1, 3, 8, 8), np.float32)
    sal = region_mask().astype(np.float32)
    curve = insertion(region_model, x, sal, step=5)  # 64/5 → 13 steps, the last partial
    blurred = rise_blur_reference(x.astype(np.float64))[0]
    order = np.argsort(-sal.reshape(-1), kind="stable")
    expected = []
    for i in range(14):
        img = blurred.reshape(3, 64).copy()
        img[:, order[:5 * i]] = 1.0
        expected.append(sigmoid(REGION_SCALE * img.reshape(3, 8, 8)[:, REGION[0], REGION[1]].mean()))
    assert curve.scores.shape == (math.ceil(64 / 5) + 1,)
    np.testing.assert_allclose(curve.scores, expected, atol=1e-6)
    assert curve.scores[-1] == pytest.approx(sigmoid(REGION_SCALE), abs=1e-6)


def naive_curve(session, x64, sal, mode, step, target=None):
    """RISE's CausalMetric.single_run, one image per forward pass, images built in float64."""
    _, c, h, w = x64.shape
    hw = h * w
    if mode == "deletion":
        start, finish = x64.copy(), np.zeros_like(x64)
    else:
        start, finish = rise_blur_reference(x64), x64.copy()
    n_steps = (hw + step - 1) // step
    order = np.argsort(-sal.reshape(-1), kind="stable")
    scores = []
    for i in range(n_steps + 1):
        probs = session.run(["probs"], {"input": start.astype(np.float32)})[0][0]
        if target is None:
            target = int(np.argmax(session.run(["probs"], {"input": x64.astype(np.float32)})[0][0]))
        scores.append(float(probs[target]))
        if i < n_steps:
            coords = order[step * i:step * (i + 1)]
            start.reshape(1, c, hw)[0, :, coords] = finish.reshape(1, c, hw)[0, :, coords]
    return np.array(scores)


def test_batched_curves_match_naive_loop(tiny_model):
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 3, 16, 16))
    maps = {"smooth": rng.random((16, 16)), "ties": np.round(rng.random((16, 16)) * 4) / 4}
    engine = load_engine(tiny_model, max_batch=16)
    curves = insertion_deletion_curves(Explainer(engine, batch_size=7), x.astype(np.float32), maps, step=10)
    session = ort.InferenceSession(tiny_model, providers=["CPUExecutionProvider"])
    for name, sal in maps.items():
        for mode in ("insertion", "deletion"):
            expected = naive_curve(session, x, sal, mode, 10)
            got = curves[name][mode]
            assert got.scores.shape == (27,)
            np.testing.assert_allclose(got.scores, expected, atol=2e-5, err_msg=f"{name} {mode}")
            assert got.auc == pytest.approx(area_under_curve(expected), abs=2e-5)


def test_saliency_resized_and_progress_counts_passes(tiny_model):
    x = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)
    seen = []
    small = np.random.default_rng(2).random((8, 8)).astype(np.float32)
    curves = insertion_deletion_curves(tiny_model, x, small, step=64, batch_size=3, progress=lambda d, t: seen.append((d, t)))
    assert set(curves) == {"insertion", "deletion"}
    assert seen[0] == (0, 10) and seen[-1] == (10, 10)  # 2 curves × (256/64 + 1) points


def test_bad_arguments(tiny_model):
    x = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(InvalidInputError, match="step"):
        deletion(tiny_model, x, np.zeros((16, 16)), step=0)
    with pytest.raises(InvalidInputError, match="2-D"):
        deletion(tiny_model, x, np.zeros((2, 16, 16)))
    with pytest.raises(InvalidInputError, match="modes"):
        insertion_deletion_curves(tiny_model, x, np.zeros((16, 16)), modes=("sideways",))
