"""Every explanation method against an independent naive implementation of ALGORITHMS.md.

The model is a tiny CNN built here (see ``naive.build_tiny_model``) whose explained layer has
duplicate, dead (all-zero) and constant channels, so SIDU meets duplicate, all-zero and all-one
masks and Score-CAM meets constant channels: the driver's dedupe / reuse / skip shortcuts run,
and the naive references (which run every mask, one image at a time) show they are exact.
The Explainer uses batch_size=7 so chunk edges fall inside every mask set.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the export extra: builds the tiny model
pytest.importorskip("skimage")  # the SIDU / RISE reference resampler

try:  # tests/ as packages or as rootdir-relative modules
    from . import naive
except ImportError:
    import naive

import explainrt
from explainrt.explainers.featurecam import sobel_edges
from explainrt.export import export_torch

BATCH = 7


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    meta = export_torch(naive.build_tiny_model(), str(path), input_size=naive.INPUT_HW, mean=(0, 0, 0),
                        std=(255, 255, 255))
    assert tuple(meta.activation_shape) == (naive.CHANNELS, 16, 16)
    assert meta.num_classes == naive.NUM_CLASSES
    return path


@pytest.fixture(scope="module")
def explainer(tiny_onnx):
    with explainrt.Explainer(str(tiny_onnx), batch_size=BATCH) as ex:
        yield ex


@pytest.fixture(scope="module")
def reference(tiny_onnx):
    return naive.NaiveModel(tiny_onnx)


@pytest.fixture(scope="module")
def image():
    return naive.tiny_image()


@pytest.fixture(scope="module")
def x(image):
    return naive.preprocess(image)


@pytest.fixture(scope="module")
def acts(reference, x):
    return reference.activations(x)


def assert_maps_close(got, want, rel=1e-4, what="map"):
    """max |got − want| ≤ rel · max |want| (scale-aware absolute tolerance)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.abs(want).max()), 1e-12)
    err = float(np.abs(got - want).max())
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:g} × {scale:.3g}"


def distinct_masks(masks: np.ndarray) -> set:
    return {m.astype(bool).tobytes() for m in masks}


# --------------------------------------------------------------------------------------------
# the fixture itself
# --------------------------------------------------------------------------------------------

def test_exported_model_matches_torch_and_input_is_img_over_255(explainer, reference, image, x):
    model = naive.build_tiny_model().double()
    with torch.no_grad():
        xt = torch.from_numpy(x.astype(np.float64))
        want_acts = model[:4](xt)[0].numpy()
        want_logits = model(xt)[0].numpy()
    np.testing.assert_allclose(reference.activations(x), want_acts, atol=1e-4)
    np.testing.assert_allclose(reference.logits(x), want_logits, atol=1e-4)
    np.testing.assert_array_equal(explainer.prepare(image).x, x)
    np.testing.assert_allclose(explainer.predict(image), naive.softmax(want_logits), atol=1e-5)


@pytest.mark.parametrize("threshold", [0.5, 0.1])
def test_fixture_has_duplicate_zero_and_one_masks(acts, threshold):
    masks = acts > threshold
    flat = masks.reshape(masks.shape[0], -1)
    assert len(distinct_masks(masks)) < masks.shape[0] - 2, "needs duplicate masks"
    assert (~flat.any(axis=1)).sum() >= 2, "needs (duplicate) all-zero masks"
    assert flat.all(axis=1).any(), "needs an all-one mask"
    partial = flat.any(axis=1) & ~flat.all(axis=1)
    assert partial.sum() >= 8, "needs enough partial masks to span more than one chunk"
    # no activation sits on the threshold, where float noise could flip a mask pixel
    assert np.abs(acts - threshold).min() > 1e-4


def test_fixture_has_constant_channels(acts):
    constant = [k for k in range(acts.shape[0]) if acts[k].max() == acts[k].min()]
    assert sorted(constant) == sorted([*naive.DEAD_CHANNELS, *naive.CONSTANT_CHANNELS])
    assert acts.shape[0] - len(constant) > 2 * BATCH


# --------------------------------------------------------------------------------------------
# SIDU
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "threshold, sigma, target",
    [(0.5, 0.25, None), (0.1, 0.25, None), (0.5, 0.1, [0, 3]), (0.1, 0.6, [0, 3])],
)
def test_sidu_matches_naive(explainer, reference, image, x, threshold, sigma, target):
    params = {"threshold": threshold}
    if sigma != 0.25:
        params["sigma"] = sigma
    exp = explainer.explain(image, "sidu", target=target, **params)
    targets = [int(np.argmax(reference.probs(x)))] if target is None else target
    assert exp.targets == targets

    want_raw, masks = naive.sidu(reference, x, targets, threshold=threshold, sigma=sigma)
    assert_maps_close(exp.raw_maps, want_raw, what="SIDU raw S_c")
    want = np.stack([naive.minmax(m) for m in want_raw])
    np.testing.assert_allclose(exp.saliency_maps, want, atol=1e-4)
    assert exp.saliency_maps.dtype == np.float32

    # the base pass + one pass per distinct mask, except an all-one mask (x ⊙ 1 = x: the base pass)
    flat = masks.reshape(masks.shape[0], -1).astype(bool)
    has_all_ones = bool(flat.all(axis=1).any())
    assert exp.forward_passes == 1 + len(distinct_masks(masks)) - int(has_all_ones)
    assert exp.forward_passes < 1 + masks.shape[0]


def test_sidu_does_not_depend_on_batch_size(tiny_onnx, explainer, image):
    want = explainer.explain(image, "sidu", target=[0, 3], threshold=0.1)
    for bs in (1, 64):
        with explainrt.Explainer(str(tiny_onnx), batch_size=bs) as ex:
            got = ex.explain(image, "sidu", target=[0, 3], threshold=0.1)
        np.testing.assert_allclose(got.saliency_maps, want.saliency_maps, atol=1e-5)
        assert got.forward_passes == want.forward_passes


# --------------------------------------------------------------------------------------------
# Score-CAM
# --------------------------------------------------------------------------------------------

SCORECAM_CASES = [
    ({}, None),
    ({"score": "logit"}, None),
    ({"channel_softmax": True, "score": "logit"}, None),  # pytorch-grad-cam's weighting
    ({"channel_softmax": True}, [0, 3]),
    ({"baseline": True}, None),
    ({"baseline": True, "score": "logit"}, [0, 3]),
    ({}, [0, 3]),
]


@pytest.mark.parametrize("params, target", SCORECAM_CASES)
def test_scorecam_matches_naive(explainer, reference, image, x, acts, params, target):
    exp = explainer.explain(image, "scorecam", target=target, **params)
    targets = [int(np.argmax(reference.probs(x)))] if target is None else target
    assert exp.targets == targets

    want_raw, skipped = naive.scorecam(reference, x, targets, **params)
    assert skipped == len(naive.DEAD_CHANNELS) + len(naive.CONSTANT_CHANNELS)
    assert exp.extras["channels_skipped"] == skipped
    kept = acts.shape[0] - skipped
    assert exp.forward_passes == 1 + kept + int(bool(params.get("baseline")))

    assert_maps_close(exp.raw_maps, want_raw, what="Score-CAM L_c")
    assert any(m.max() > m.min() for m in want_raw), "degenerate reference maps"
    for t in range(len(targets)):
        # a map the ReLU zeroes everywhere (e.g. baseline: every mask scores below the black
        # image) min-max normalises to all zeros
        np.testing.assert_allclose(exp.saliency_maps[t], naive.minmax(want_raw[t]), atol=1e-4)


def test_scorecam_skipping_constant_channels_is_exact(explainer, reference, image, x):
    """Running the constant channels too (with pytorch-grad-cam's all-zero mask) changes nothing."""
    exp = explainer.explain(image, "scorecam")
    with_constant, _ = naive.scorecam(reference, x, exp.targets, keep_constant=True)
    np.testing.assert_allclose(exp.saliency, naive.minmax(with_constant[0]), atol=1e-4)


@pytest.fixture(scope="module")
def odd_scale(tmp_path_factory):
    """(explainer, naive model, image, x) for the 33×33 model with an 11×11 explained layer."""
    path = tmp_path_factory.mktemp("odd") / "odd.onnx"
    export_torch(naive.build_odd_scale_model(), str(path), input_size=naive.ODD_INPUT_HW, mean=(0, 0, 0),
                 std=(255, 255, 255))
    img = naive.tiny_image(seed=2, hw=naive.ODD_INPUT_HW)
    with explainrt.Explainer(str(path), batch_size=BATCH) as ex:
        yield ex, naive.NaiveModel(path), img, naive.preprocess(img)


@pytest.mark.parametrize("params", [{}, {"baseline": True, "score": "logit"}, {"channel_softmax": True}])
def test_scorecam_matches_naive_at_non_dyadic_scale(odd_scale, params):
    ex, reference, img, x = odd_scale
    exp = ex.explain(img, "scorecam", **params)
    want_raw, skipped = naive.scorecam(reference, x, exp.targets, **params)
    assert skipped == len(naive.ODD_DEAD_CHANNELS) + len(naive.ODD_CONSTANT_CHANNELS)
    np.testing.assert_allclose(exp.saliency, naive.minmax(want_raw[0]), atol=1e-4)


def test_scorecam_skips_every_constant_channel_at_non_dyadic_scale(odd_scale):
    ex, reference, img, x = odd_scale
    acts = reference.activations(x)
    constant = [k for k in range(acts.shape[0]) if acts[k].max() == acts[k].min()]
    assert sorted(constant) == sorted([*naive.ODD_DEAD_CHANNELS, *naive.ODD_CONSTANT_CHANNELS])
    exp = ex.explain(img, "scorecam")
    assert exp.extras["channels_skipped"] == len(constant)
    assert exp.forward_passes == 1 + acts.shape[0] - len(constant)


# --------------------------------------------------------------------------------------------
# RISE
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p1, seed, target", [(0.5, 0, None), (0.3, 11, [0, 3])])
def test_rise_matches_naive(explainer, reference, image, x, p1, seed, target):
    n, s = 50, 4
    exp = explainer.explain(image, "rise", target=target, n_masks=n, grid_size=s, p1=p1, seed=seed)
    targets = [int(np.argmax(reference.probs(x)))] if target is None else target
    assert exp.targets == targets
    assert exp.forward_passes == 1 + n

    want_raw = naive.rise(reference, x, targets, n_masks=n, grid_size=s, p1=p1, seed=seed)
    assert_maps_close(exp.raw_maps, want_raw, rel=1e-5, what="RISE S_c")
    want = np.stack([naive.minmax(m) for m in want_raw])
    np.testing.assert_allclose(exp.saliency_maps, want, atol=1e-4)


def test_rise_is_seeded(explainer, image):
    kw = dict(n_masks=20, grid_size=4, p1=0.5)
    a = explainer.explain(image, "rise", seed=5, **kw)
    b = explainer.explain(image, "rise", seed=5, **kw)
    c = explainer.explain(image, "rise", seed=6, **kw)
    np.testing.assert_array_equal(a.raw_maps, b.raw_maps)
    assert np.abs(a.saliency - c.saliency).max() > 0.05


# --------------------------------------------------------------------------------------------
# FEM
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [None, 2.0, 0.5])
def test_fem_matches_naive(explainer, image, acts, k):
    params = {} if k is None else {"k": k}
    exp = explainer.explain(image, "fem", target=[0, 3], **params)
    want = naive.fem(acts, naive.INPUT_HW, k=1.0 if k is None else k)
    assert want.max() > 0.5 and want.min() < 0.1, "degenerate reference map"
    assert exp.forward_passes == 1
    for t in range(2):  # class-agnostic: the same map for every target
        np.testing.assert_allclose(exp.saliency_maps[t], want, atol=1e-5)


def test_fem_k_changes_the_map(explainer, image):
    one = explainer.explain(image, "fem", k=1.0).saliency
    two = explainer.explain(image, "fem", k=2.0).saliency
    assert np.abs(one - two).max() > 0.05


# --------------------------------------------------------------------------------------------
# Feature CAM (base map FEM: cheap and exactly known)
# --------------------------------------------------------------------------------------------

def jet_rgb(m: np.ndarray) -> np.ndarray:
    u8 = np.clip(np.rint(m * 255.0), 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB).astype(np.float64) / 255.0


@pytest.mark.parametrize("combination, k", [("add", None), ("add", 0.5), ("complement", None)])
@pytest.mark.parametrize("feature_input", ["edges", "blend21", "blend11"])
def test_featurecam_matches_formula(explainer, image, acts, feature_input, combination, k):
    params = {"base": "fem", "feature_input": feature_input, "combination": combination}
    if k is not None:
        params["k"] = k
    k = 0.25 if k is None else k
    exp = explainer.explain(image, "featurecam", **params)

    m = naive.fem(acts, naive.INPUT_HW)  # the base map M in [0, 1]
    f = sobel_edges(image).astype(np.float64)  # the edge descriptor F in [0, 1]
    img = image.astype(np.float64) / 255.0
    f3 = np.repeat(f[:, :, None], 3, axis=2)
    f_in = {"edges": f3, "blend21": (2.0 * img + f3) / 3.0, "blend11": (img + f3) / 2.0}[feature_input]
    grey = f_in.mean(axis=2)
    heat_over_photo = 0.5 * img + 0.5 * jet_rgb(m)  # the figure's M: the heatmap over the photograph
    if combination == "add":
        want = np.clip(k * grey + m, 0.0, 1.0)
        want_vis = np.clip(k * f_in + heat_over_photo, 0.0, 1.0)
    else:
        want = (1.0 - grey) * m
        want_vis = (1.0 - f_in) * heat_over_photo

    assert exp.raw_maps.shape == (1, *naive.INPUT_HW)
    np.testing.assert_allclose(exp.raw_maps[0], want, atol=1e-5)
    np.testing.assert_allclose(exp.saliency, want, atol=1e-5)  # already in [0, 1]: not stretched
    assert exp.visualization.shape == (*naive.INPUT_HW, 3)
    assert exp.visualization.dtype == np.uint8
    diff = np.abs(exp.visualization.astype(np.int64) - np.rint(want_vis * 255.0).astype(np.int64))
    assert diff.max() <= 1
    assert exp.forward_passes == 1


def test_featurecam_default_base_is_normalised_scorecam(explainer, reference, image, x):
    exp = explainer.explain(image, "featurecam", target=[0, 3])  # base scorecam, blend21, add, k=0.25
    f = sobel_edges(image).astype(np.float64)
    grey = ((2.0 * image.astype(np.float64) / 255.0 + f[:, :, None]) / 3.0).mean(axis=2)
    cams, skipped = naive.scorecam(reference, x, [0, 3])
    assert exp.forward_passes == 1 + naive.CHANNELS - skipped
    for t in range(2):
        want = np.clip(0.25 * grey + naive.minmax(cams[t]), 0.0, 1.0)
        np.testing.assert_allclose(exp.raw_maps[t], want, atol=1e-4)
        np.testing.assert_allclose(exp.base_saliency_maps[t], naive.minmax(cams[t]), atol=1e-4)


# --------------------------------------------------------------------------------------------
# parameter validation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "method, params, name",
    [
        ("sidu", {"tau": 0.5}, "tau"),
        ("sidu", {"threshold": float("nan")}, "threshold"),
        ("sidu", {"threshold": "high"}, "threshold"),
        ("sidu", {"sigma": 0.0}, "sigma"),
        ("sidu", {"sigma": float("inf")}, "sigma"),
        ("scorecam", {"score": "softmax"}, "score"),
        ("scorecam", {"n_masks": 10}, "n_masks"),
        ("rise", {"p1": 0.0}, "p1"),
        ("rise", {"p1": 1.5}, "p1"),
        ("rise", {"n_masks": 0}, "n_masks"),
        ("rise", {"grid_size": 0}, "grid_size"),
        ("rise", {"seed": -1}, "seed"),
        ("rise", {"n_masks": 2.5}, "n_masks"),
        ("rise", {"grid_size": True}, "grid_size"),
        ("rise", {"seed": 1.9}, "seed"),
        ("scorecam", {"channel_softmax": "no"}, "channel_softmax"),
        ("scorecam", {"baseline": 1}, "baseline"),
        ("fem", {"k": "abc"}, "k"),
        ("fem", {"k": float("nan")}, "k"),
        ("featurecam", {"k": "abc"}, "k"),
        ("featurecam", {"k": 2.0}, "k"),
        ("featurecam", {"feature_input": "hed"}, "feature_input"),
        ("featurecam", {"combination": "multiply"}, "combination"),
        ("featurecam", {"base": "featurecam"}, "base"),
        ("featurecam", {"edges": "laplace"}, "edges"),
        ("featurecam", {"base": "sidu", "base_params": {"tau": 0.5}}, "tau"),
        ("featurecam", {"base": "rise", "base_params": {"p1": 0}}, "p1"),
        ("featurecam", {"base_params": [1, 2]}, "base_params"),
    ],
)
def test_invalid_parameters_raise(explainer, image, method, params, name):
    with pytest.raises(explainrt.InvalidInputError, match=name):
        explainer.explain(image, method, **params)


@pytest.mark.parametrize("target", [5, -1, [0, 7], [], 1.5, True])
def test_invalid_target_raises(explainer, image, target):
    with pytest.raises(explainrt.InvalidInputError, match="target"):
        explainer.explain(image, "fem", target=target)
