"""The NumPy kernel ops (explainrt.kernels.reference) against cv2, torch, skimage and formulas.

These ops are the references the CUDA kernels are tested against, so they are checked here
against resamplers written by others: cv2.resize(INTER_LINEAR) and torch's
interpolate(bilinear, align_corners=False) for the edge-clamped border, and
skimage.transform.resize(order=1, mode='reflect') — what the SIDU and RISE reference code
call — for the mirrored border.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
sk_resize = pytest.importorskip("skimage.transform").resize

from explainrt.kernels import get_ops, reference as ops

# (h, w) → (H, W): the real upsampling 7→224, small ones, non-square, single row/column, a downsample
SIZES = [
    ((7, 7), (224, 224)),
    ((5, 5), (32, 32)),
    ((3, 5), (17, 40)),
    ((6, 4), (30, 9)),
    ((1, 6), (4, 20)),
    ((5, 1), (23, 3)),
    ((10, 12), (7, 5)),
]


def random_maps(n, hw, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *hw)).astype(np.float32)


def cv2_up(m, out_hw):
    return cv2.resize(m.astype(np.float32), (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)


def torch_up(maps, out_hw):
    t = torch.from_numpy(np.asarray(maps, np.float64))[:, None]
    return F.interpolate(t, size=tuple(out_hw), mode="bilinear", align_corners=False)[:, 0].numpy()


def skimage_up(m, out_hw):
    return sk_resize(np.asarray(m, np.float64), out_hw, order=1, mode="reflect", anti_aliasing=False)


def test_get_ops_numpy_is_reference():
    assert get_ops(np) is ops


@pytest.mark.parametrize("in_hw, out_hw", SIZES)
def test_upsample_clamp_matches_cv2_and_torch(in_hw, out_hw):
    maps = random_maps(3, in_hw)
    got = ops.upsample_bilinear(maps, out_hw, border="clamp")
    assert got.shape == (3, *out_hw) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_up(maps, out_hw), atol=2e-6)
    for i in range(3):
        np.testing.assert_allclose(got[i], cv2_up(maps[i], out_hw), atol=2e-5)


@pytest.mark.parametrize("in_hw, out_hw", SIZES)
def test_upsample_reflect_matches_skimage(in_hw, out_hw):
    maps = random_maps(3, in_hw, seed=1)
    got = ops.upsample_bilinear(maps, out_hw, border="reflect")
    for i in range(3):
        np.testing.assert_allclose(got[i], skimage_up(maps[i], out_hw), atol=2e-6)


def test_clamp_and_reflect_differ_only_at_the_border():
    maps = random_maps(1, (4, 4), seed=2)
    clamp = ops.upsample_bilinear(maps, (16, 16), border="clamp")[0]
    refl = ops.upsample_bilinear(maps, (16, 16), border="reflect")[0]
    # half-pixel centres of a 4× upsample: rows/cols 0, 1 and 14, 15 lie outside the outer centres
    np.testing.assert_allclose(clamp[2:14, 2:14], refl[2:14, 2:14], atol=1e-6)
    assert np.abs(clamp - refl).max() > 1e-2


def test_upsample_rejects_unknown_border():
    with pytest.raises(ValueError, match="border"):
        ops.upsample_bilinear(random_maps(1, (3, 3)), (6, 6), border="wrap")


@pytest.mark.parametrize("hw, s", [((32, 32), 4), ((30, 45), 4), ((224, 224), 7), ((20, 13), 3)])
def test_rise_crop_matches_reference_code(hw, s):
    """full_hw + offsets == skimage resize to (s+1)·cell, then [dy:dy+H, dx:dx+W] (RISE's code)."""
    rng = np.random.default_rng(3)
    H, W = hw
    cell_h, cell_w = -(-H // s), -(-W // s)
    full = ((s + 1) * cell_h, (s + 1) * cell_w)
    n = 6
    grids = (rng.random((n, s, s)) < 0.5).astype(np.float32)
    offsets = np.stack([rng.integers(0, cell_h, n), rng.integers(0, cell_w, n)], axis=1).astype(np.int32)
    offsets[0] = (cell_h - 1, 0)  # the extreme shifts
    offsets[1] = (0, cell_w - 1)
    got = ops.upsample_bilinear(grids, hw, border="reflect", full_hw=full, offsets=offsets)
    for i in range(n):
        dy, dx = offsets[i]
        want = skimage_up(grids[i], full)[dy:dy + H, dx:dx + W]
        np.testing.assert_allclose(got[i], want, atol=2e-6)


def test_crop_outside_the_resized_mask_is_rejected():
    with pytest.raises(ValueError, match="outside"):
        ops.upsample_bilinear(np.ones((1, 4, 4), np.float32), (32, 32), border="reflect", full_hw=(40, 40),
                              offsets=np.array([[9, 0]], np.int32))


def test_masked_batch_with_shift_and_scale_matches_formula():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 3, 24, 20)).astype(np.float32)
    masks = rng.random((5, 6, 5)).astype(np.float32)
    shift = rng.normal(size=5).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    out = np.full((5, 3, 24, 20), np.nan, np.float32)
    got = ops.masked_batch(x, masks, out=out, border="clamp", shift=shift, scale=scale)
    assert got is out
    for i in range(5):
        up = cv2_up(masks[i], (24, 20)).astype(np.float64)
        want = x[0].astype(np.float64) * ((up + shift[i]) * scale[i])[None]
        np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_masked_batch_plain_and_cropped():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 30, 45)).astype(np.float32)  # (C, H, W) is accepted too
    grids = (rng.random((4, 4, 4)) < 0.5).astype(np.float32)
    offsets = np.array([[0, 0], [7, 11], [3, 5], [7, 0]], np.int32)
    got = ops.masked_batch(x, grids, border="reflect", full_hw=(40, 60), offsets=offsets)
    assert got.shape == (4, 3, 30, 45)
    for i in range(4):
        dy, dx = offsets[i]
        m = skimage_up(grids[i], (40, 60))[dy:dy + 30, dx:dx + 45]
        np.testing.assert_allclose(got[i], x.astype(np.float64) * m[None], atol=1e-5)
    plain = ops.masked_batch(x, grids, border="reflect")
    for i in range(4):
        np.testing.assert_allclose(plain[i], x * skimage_up(grids[i], (30, 45))[None], atol=1e-5)


@pytest.mark.parametrize("border", ["clamp", "reflect"])
def test_weighted_mask_sum_is_sum_of_upsampled_masks(border):
    rng = np.random.default_rng(6)
    masks = rng.normal(size=(9, 7, 5)).astype(np.float32)
    weights = rng.normal(size=(9, 3))
    got = ops.weighted_mask_sum(weights, masks, (28, 23), border=border)
    up = torch_up if border == "clamp" else (lambda m, hw: np.stack([skimage_up(a, hw) for a in m]))
    ups = up(masks, (28, 23))
    want = np.zeros((3, 28, 23))
    for i in range(9):
        for t in range(3):
            want[t] += weights[i, t] * ups[i]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_weighted_crop_sum_matches_loop():
    rng = np.random.default_rng(7)
    H, W, s = 30, 45, 4
    full = (40, 60)
    grids = (rng.random((11, s, s)) < 0.4).astype(np.float32)
    offsets = np.stack([rng.integers(0, 8, 11), rng.integers(0, 12, 11)], axis=1).astype(np.int32)
    weights = rng.random((11, 2)).astype(np.float32)
    got = ops.weighted_crop_sum(weights, grids, offsets, (H, W), full, border="reflect", chunk=4)
    want = np.zeros((2, H, W))
    for i in range(11):
        m = skimage_up(grids[i], full)[offsets[i, 0]:offsets[i, 0] + H, offsets[i, 1]:offsets[i, 1] + W]
        for t in range(2):
            want[t] += float(weights[i, t]) * m
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("border", ["clamp", "reflect"])
def test_upsampled_minmax_matches_explicit_upsample(border):
    rng = np.random.default_rng(8)
    masks = rng.normal(size=(8, 5, 6)).astype(np.float32)
    masks[3] = 0.7  # a constant map: min == max
    lo, hi = ops.upsampled_minmax(masks, (19, 33), border=border, chunk=3)
    up = torch_up(masks, (19, 33)) if border == "clamp" else np.stack([skimage_up(m, (19, 33)) for m in masks])
    np.testing.assert_allclose(lo, up.min(axis=(1, 2)), atol=2e-6)
    np.testing.assert_allclose(hi, up.max(axis=(1, 2)), atol=2e-6)
    # a constant map stays constant up to float32 rounding of the interpolation weights (see the
    # Score-CAM constant-channel test in tests/explainers for why that rounding matters)
    assert abs(float(hi[3]) - float(lo[3])) <= 1e-6
    assert np.all(hi[np.arange(8) != 3] > lo[np.arange(8) != 3])


@pytest.mark.parametrize("k", [0.0, 1.0, 2.0, -0.5])
def test_ksigma_binarize_matches_formula(k):
    rng = np.random.default_rng(9)
    a = np.maximum(rng.normal(size=(6, 7, 9)), 0).astype(np.float32)
    a[2] = 0.25  # constant channel: σ = 0, every pixel ≥ μ
    a[4] = 0.0
    binary, mu = ops.ksigma_binarize(a, k)
    assert binary.dtype == np.float32 and binary.shape == a.shape
    for c in range(6):
        v = a[c].astype(np.float64)
        m = v.sum() / v.size
        sd = np.sqrt(((v - m) ** 2).sum() / v.size)  # population std
        np.testing.assert_allclose(mu[c], m, rtol=1e-6)
        np.testing.assert_array_equal(binary[c], (v >= m + k * sd).astype(np.float32))
    assert binary[2].all() and binary[4].all()


def test_ksigma_uses_population_std():
    a = np.array([[[0.0, 0.0, 0.0, 4.0]]], np.float32)  # μ = 1, population σ = √3 ≈ 1.732, sample σ = 2
    assert ops.ksigma_binarize(a, 1.6)[0].sum() == 1  # 4 ≥ 1 + 1.6·√3 = 3.77 (sample σ: 4.2, no pixel)
    assert ops.ksigma_binarize(a, 1.8)[0].sum() == 0  # 4 < 1 + 1.8·√3 = 4.12


@pytest.mark.parametrize("tau", [0.5, 0.1, 0.0, -1.0])
def test_threshold_masks_is_strict_greater(tau):
    rng = np.random.default_rng(10)
    a = rng.normal(size=(4, 6, 6)).astype(np.float32)
    a[0, 0, 0] = np.float32(tau)  # exactly on the threshold: not in the mask
    got = ops.threshold_masks(a, tau)
    assert got.dtype == np.float32
    want = np.array([[[1.0 if v > tau else 0.0 for v in row] for row in ch] for ch in a], np.float32)
    np.testing.assert_array_equal(got, want)
    assert got[0, 0, 0] == 0.0


def test_rise_grids_follow_the_documented_generator_sequence():
    n, s, p1, hw, seed = 40, 5, 0.3, (30, 47), 123
    grids, offsets, full_hw = ops.rise_grids(n, s, p1, hw, seed)
    cell_h, cell_w = int(np.ceil(30 / 5)), int(np.ceil(47 / 5))
    assert full_hw == ((s + 1) * cell_h, (s + 1) * cell_w)
    rng = np.random.default_rng(seed)
    np.testing.assert_array_equal(grids, (rng.random((n, s, s)) < p1).astype(np.float32))
    np.testing.assert_array_equal(offsets[:, 0], rng.integers(0, cell_h, n))
    np.testing.assert_array_equal(offsets[:, 1], rng.integers(0, cell_w, n))
    assert grids.dtype == np.float32 and offsets.dtype == np.int32
    again = ops.rise_grids(n, s, p1, hw, seed)
    np.testing.assert_array_equal(again[0], grids)
    np.testing.assert_array_equal(again[1], offsets)
    other = ops.rise_grids(n, s, p1, hw, seed + 1)
    assert not np.array_equal(other[0], grids)
