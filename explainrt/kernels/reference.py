"""NumPy reference implementations of the fused mask operations.

Each function here has a CUDA twin of the same name (``kernels/*.cu`` through
``kernels/cuda.py``); these are the references in the tests and the CPU path.

Bilinear resampling follows half-pixel centres (align_corners=False). ``border`` picks what
happens past the outermost pixel centre: ``"clamp"`` repeats the edge value (cv2.resize,
torch.nn.functional.interpolate) and ``"reflect"`` mirrors about it (skimage.transform.resize
with mode='reflect', used by the SIDU and RISE reference code).

A "virtual" resampling target ``full_hw`` with per-mask ``offsets`` (dy, dx) gives RISE's
upsample-then-crop in one step: the output is rows dy..dy+H, columns dx..dx+W of the mask
resized to ``full_hw``.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np

BORDERS = ("clamp", "reflect")


@functools.lru_cache(maxsize=256)
def _full_matrix(in_len: int, border: str, full_len: int) -> np.ndarray:
    """(full_len × in_len) bilinear interpolation weights for one axis."""
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    pos = (np.arange(full_len, dtype=np.float64) + 0.5) * (in_len / full_len) - 0.5
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    i1 = i0 + 1
    if in_len == 1:
        i0[:] = 0
        i1[:] = 0
    elif border == "clamp":
        i0 = np.clip(i0, 0, in_len - 1)
        i1 = np.clip(i1, 0, in_len - 1)
    else:  # mirror about the first and last pixel centres
        i0 = np.where(i0 < 0, -i0, np.where(i0 > in_len - 1, 2 * (in_len - 1) - i0, i0))
        i1 = np.where(i1 < 0, -i1, np.where(i1 > in_len - 1, 2 * (in_len - 1) - i1, i1))
    mat = np.zeros((full_len, in_len), dtype=np.float64)
    rows = np.arange(full_len)
    np.add.at(mat, (rows, i0), 1.0 - frac)
    np.add.at(mat, (rows, i1), frac)
    mat.setflags(write=False)
    return mat


@functools.lru_cache(maxsize=256)
def _full_matrix_f32(in_len: int, border: str, full_len: int) -> np.ndarray:
    mat = _full_matrix(in_len, border, full_len).astype(np.float32)
    mat.setflags(write=False)
    return mat


def interp_matrix(out_len: int, in_len: int, border: str = "clamp", full_len: Optional[int] = None,
                  offset: int = 0, dtype=np.float32) -> np.ndarray:
    """(out_len × in_len) matrix R with up(v) = R @ v along one axis (read-only for float32)."""
    return crop_matrices(out_len, in_len, border, full_len, np.array([offset]), dtype)[0]


def crop_matrices(out_len: int, in_len: int, border: str, full_len: Optional[int], offsets: np.ndarray,
                  dtype=np.float32) -> np.ndarray:
    """(N, out_len, in_len): rows offsets[i] … offsets[i]+out_len of the resize-to-``full_len`` matrix."""
    full = full_len or out_len
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.size and (offsets.min() < 0 or offsets.max() + out_len > full):
        raise ValueError(f"crop {offsets.min()}..{offsets.max() + out_len} is outside the resized length {full}")
    mat = _full_matrix_f32(in_len, border, full) if dtype == np.float32 else \
        _full_matrix(in_len, border, full).astype(dtype)
    if offsets.size == 1:  # a view, no copy
        return mat[None, int(offsets[0]):int(offsets[0]) + out_len]
    return mat[offsets[:, None] + np.arange(out_len)]


def upsample_bilinear(masks: np.ndarray, out_hw: tuple[int, int], border: str = "clamp",
                      full_hw: Optional[tuple[int, int]] = None, offsets: Optional[np.ndarray] = None) -> np.ndarray:
    """Resize (N, h, w) masks bilinearly to (N, H, W), optionally cropping a resized ``full_hw``."""
    masks = np.asarray(masks, dtype=np.float32)
    n, h, w = masks.shape
    H, W = out_hw
    fh, fw = full_hw or out_hw
    if offsets is None:
        ry = interp_matrix(H, h, border, fh)
        rx = interp_matrix(W, w, border, fw)
        return np.matmul(np.matmul(ry, masks), rx.T)
    ry = crop_matrices(H, h, border, fh, offsets[:, 0])  # (N, H, h): each mask its own crop
    rx = crop_matrices(W, w, border, fw, offsets[:, 1])  # (N, W, w)
    return np.matmul(np.matmul(ry, masks), rx.transpose(0, 2, 1))


def masked_batch(x: np.ndarray, masks: np.ndarray, out: Optional[np.ndarray] = None, border: str = "clamp",
                 shift: Optional[np.ndarray] = None, scale: Optional[np.ndarray] = None,
                 full_hw: Optional[tuple[int, int]] = None, offsets: Optional[np.ndarray] = None) -> np.ndarray:
    """out[i] = x ⊙ ((up(masks[i]) + shift[i]) · scale[i]): the engine input for a chunk of masks.

    ``x`` is (1, C, H, W) or (C, H, W); ``out`` (N, C, H, W) is written in place when given
    (the engine's input buffer), so no full-resolution masks outlive the call.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 4:
        x = x[0]
    c, H, W = x.shape
    up = upsample_bilinear(masks, (H, W), border, full_hw, offsets)
    if shift is not None:
        up += np.asarray(shift, np.float32)[:, None, None]
    if scale is not None:
        up *= np.asarray(scale, np.float32)[:, None, None]
    if out is None:
        out = np.empty((up.shape[0], c, H, W), dtype=np.float32)
    np.multiply(x[None], up[:, None], out=out)
    return out


def upsampled_minmax(masks: np.ndarray, out_hw: tuple[int, int], border: str = "clamp",
                     chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per-mask minimum and maximum of up(masks[i]) without holding all of them at full size."""
    n = masks.shape[0]
    lo = np.empty(n, np.float32)
    hi = np.empty(n, np.float32)
    for i in range(0, n, chunk):
        up = upsample_bilinear(masks[i:i + chunk], out_hw, border)
        lo[i:i + chunk] = up.min(axis=(1, 2))
        hi[i:i + chunk] = up.max(axis=(1, 2))
    return lo, hi


def weighted_mask_sum(weights: np.ndarray, masks: np.ndarray, out_hw: tuple[int, int],
                      border: str = "clamp") -> np.ndarray:
    """S[t] = up(Σ_i weights[i, t] · masks[i]) for (N, T) weights and (N, h, w) masks → (T, H, W).

    Bilinear resampling is linear, so the sum is taken at mask resolution and upsampled once.
    """
    weights = np.asarray(weights, dtype=np.float64)
    n, h, w = masks.shape
    low = (weights.T @ np.asarray(masks, np.float64).reshape(n, h * w)).reshape(-1, h, w)
    return upsample_bilinear(low.astype(np.float32), out_hw, border)


def weighted_crop_sum(weights: np.ndarray, masks: np.ndarray, offsets: np.ndarray, out_hw: tuple[int, int],
                      full_hw: tuple[int, int], border: str = "reflect", chunk: int = 64) -> np.ndarray:
    """S[t] = Σ_i weights[i, t] · crop_i(up(masks[i])): RISE's weighting, masks made chunk by chunk."""
    weights = np.asarray(weights, dtype=np.float32)
    n = masks.shape[0]
    H, W = out_hw
    acc = np.zeros((weights.shape[1], H * W), dtype=np.float64)
    for i in range(0, n, chunk):
        up = upsample_bilinear(masks[i:i + chunk], out_hw, border, full_hw, offsets[i:i + chunk])
        acc += weights[i:i + chunk].T.astype(np.float64) @ up.reshape(up.shape[0], -1)
    return acc.reshape(-1, H, W).astype(np.float32)


def threshold_masks(activations: np.ndarray, threshold: float) -> np.ndarray:
    """SIDU's binary masks: [A_i > τ] as float32 (C, h, w)."""
    return (np.asarray(activations) > threshold).astype(np.float32)


def ksigma_binarize(activations: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray]:
    """FEM: per channel mean μ and [A_k ≥ μ_k + k·σ_k] (population std). Returns (binary, μ)."""
    a = np.asarray(activations, dtype=np.float64)
    c = a.shape[0]
    flat = a.reshape(c, -1)
    mu = flat.mean(axis=1)
    sigma = flat.std(axis=1)
    binary = (flat >= (mu + k * sigma)[:, None]).reshape(a.shape).astype(np.float32)
    return binary, mu.astype(np.float32)


def rise_grids(n: int, grid_size: int, p1: float, input_hw: tuple[int, int], seed: Optional[int]):
    """Draw RISE's random grids and shifts on the host (same seed → same masks on every backend).

    Returns grids (n, s, s) float32 in {0,1}, offsets (n, 2) int32 (dy, dx) in [0, cell), and the
    resized size (s+1)·cell for each axis.
    """
    rng = np.random.default_rng(seed)
    H, W = input_hw
    cell_h, cell_w = -(-H // grid_size), -(-W // grid_size)
    grids = (rng.random((n, grid_size, grid_size)) < p1).astype(np.float32)
    offsets = np.stack([rng.integers(0, cell_h, n), rng.integers(0, cell_w, n)], axis=1).astype(np.int32)
    full_hw = ((grid_size + 1) * cell_h, (grid_size + 1) * cell_w)
    return grids, offsets, full_hw
