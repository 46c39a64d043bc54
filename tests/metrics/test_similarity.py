"""Map similarity against formulas and scipy on small arrays; reference maps from PNG and .npy."""
import numpy as np
import pytest

from explainrt import InvalidInputError
from explainrt.imaging import write_png
from explainrt.metrics import compare_maps, kl_divergence, load_reference_map, pearson, rankdata, sim, spearman

stats = pytest.importorskip("scipy.stats")


def test_pearson_and_spearman_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.random((6, 7)), rng.random((6, 7))
    b = a * 0.3 + b
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a.ravel(), b.ravel())[0], abs=1e-12)
    ties_a, ties_b = np.round(a * 3), np.round(b * 2)
    assert spearman(ties_a, ties_b) == pytest.approx(stats.spearmanr(ties_a.ravel(), ties_b.ravel())[0], abs=1e-12)
    np.testing.assert_array_equal(rankdata(ties_a), stats.rankdata(ties_a.ravel()))
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert np.isnan(pearson(a, np.ones_like(a)))


def test_sim_by_hand():
    a = np.array([[1.0, 0.0], [1.0, 2.0]])  # /4 → .25 0 .25 .5
    b = np.array([[0.0, 1.0], [1.0, 2.0]])  # /4 → 0 .25 .25 .5
    assert sim(a, b) == pytest.approx(0.75)
    assert sim(a, 3 * a) == pytest.approx(1.0)
    assert sim(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 0.0
    with pytest.raises(InvalidInputError, match="negative"):
        sim(a - 1, b)
    with pytest.raises(InvalidInputError, match="same shape"):
        sim(a, b.ravel())


def test_kl_direction_and_value():
    s = np.array([0.1, 0.2, 0.3, 0.4])
    r = np.array([0.4, 0.3, 0.2, 0.1]) * 2  # scaled: normalised inside
    assert kl_divergence(s, r) == pytest.approx(stats.entropy(r, s), rel=1e-9)  # D_KL(reference ‖ saliency)
    assert kl_divergence(s, r) != pytest.approx(kl_divergence(r, s) + 0.01)
    assert kl_divergence(s, s) == pytest.approx(0.0, abs=1e-12)
    # Saliency with zeros where the reference has mass: large but finite (epsilon).
    big = kl_divergence(np.array([1.0, 0.0]), np.array([0.5, 0.5]))
    assert np.isfinite(big) and big > 10


def test_reference_maps_from_png_and_npy(tmp_path):
    ref = np.zeros((20, 30), np.uint8)
    ref[5:15, 10:20] = 200
    write_png(tmp_path / "ref.png", np.repeat(ref[:, :, None], 3, axis=2))
    np.save(tmp_path / "ref.npy", ref.astype(np.float32)[None])
    from_png = load_reference_map(tmp_path / "ref.png")
    from_npy = load_reference_map(tmp_path / "ref.npy")
    np.testing.assert_allclose(from_png, ref)
    np.testing.assert_allclose(from_npy, ref)
    assert load_reference_map(tmp_path / "ref.png", (10, 15)).shape == (10, 15)
    sal = np.zeros((10, 15))
    sal[2:8, 5:10] = 1.0
    scores = compare_maps(sal, from_png)  # reference resized to the saliency's size
    assert scores["pearson"] > 0.9 and scores["sim"] > 0.7 and scores["kl"] < 0.5
    with pytest.raises(InvalidInputError, match="not found"):
        load_reference_map(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InvalidInputError, match="could not read"):
        load_reference_map(tmp_path / "bad.png")
