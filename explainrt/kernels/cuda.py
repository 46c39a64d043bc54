"""CUDA twins of ``kernels/reference.py``: same names, same signatures, CuPy arrays in and out.

The kernels live in ``resample.cu`` and ``binarize.cu`` beside this file and are compiled at
run time by CuPy (``cupy.RawModule``, NVRTC), once per device; CuPy itself is imported on
first use. Every launch goes on CuPy's current stream and nothing here synchronises with the
host (except one upload of each small constant table), so a chunk loop built from these
calls never waits on the GPU. Needs compute capability 6.0+ (float64 atomics).

Sampling positions come from ``taps.bilinear_taps`` (derived from the reference's
interpolation matrices), so the GPU samples where the NumPy reference does.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import numpy as np

from ..errors import InvalidInputError, require
from .reference import BORDERS, interp_matrix, rise_grids  # noqa: F401  (grids are drawn on the host)
from .taps import bilinear_taps

log = logging.getLogger(__name__)

_KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
_COMPILE_OPTIONS = ("-std=c++17",)
# kernel name → source file
_SOURCES = {
    "masked_batch_f32": "resample.cu",
    "masked_batch_f16": "resample.cu",
    "upsample_bilinear_f32": "resample.cu",
    "upsampled_minmax_f32": "resample.cu",
    "weighted_crop_sum_f32": "resample.cu",
    "threshold_masks_f32": "binarize.cu",
    "ksigma_binarize_f32": "binarize.cu",
}
_BLOCK = 256
_MAX_GRID = 65535 * 16  # grid-stride loops cover the rest
_MAX_TARGETS_PER_PASS = 8  # MAX_TARGETS_PER_PASS in resample.cu
# option bits of resample.cu
_OPT_SHIFT, _OPT_SCALE, _OPT_OFFSETS = 1, 2, 4

_lock = threading.Lock()
_modules: dict = {}  # (source file, device id) → cupy.RawModule
_functions: dict = {}  # (kernel name, device id) → cupy.RawKernel
_device_tables: dict = {}  # (in_len, border, full_len, device id) → (idx, wt) on the device
_dummies: dict = {}  # (dtype, device id) → a 2-element device array standing in for an unused pointer


def _cupy():
    """CuPy, imported on first use (this module imports without it)."""
    return require("cupy", "gpu", "the CUDA mask kernels")


def _kernel(name: str):
    """The compiled kernel ``name`` for the current device (compiled on first use)."""
    cp = _cupy()
    dev = cp.cuda.Device().id
    key = (name, dev)
    fn = _functions.get(key)
    if fn is None:
        with _lock:
            source = _SOURCES[name]
            module = _modules.get((source, dev))
            if module is None:
                with open(os.path.join(_KERNEL_DIR, source), encoding="utf-8") as fh:
                    module = cp.RawModule(code=fh.read(), options=_COMPILE_OPTIONS)
                _modules[(source, dev)] = module
                log.debug("compiling %s for device %d", source, dev)
            fn = _functions[key] = module.get_function(name)
    return fn


def _launch(name: str, total: int, args: tuple, block: int = _BLOCK, grid: Optional[tuple] = None) -> None:
    """Launch ``name`` on the current stream; by default one thread per item of ``total`` (grid-stride)."""
    if total <= 0:
        return
    grid = grid if grid is not None else (min(_MAX_GRID, -(-total // block)),)
    _kernel(name)(tuple(max(1, g) for g in grid), (block,), args)


def _upload_once(cache: dict, key, make):
    """A small constant device array, uploaded once per device and kept.

    The upload is synchronised once so the array is valid on every stream afterwards.
    """
    cp = _cupy()
    value = cache.get(key)
    if value is None:
        value = make()
        cp.cuda.get_current_stream().synchronize()
        cache[key] = value
    return value


def _taps(in_len: int, border: str, full_len: int):
    cp = _cupy()
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    key = (int(in_len), border, int(full_len), cp.cuda.Device().id)
    return _upload_once(_device_tables, key,
                        lambda: tuple(cp.asarray(a) for a in bilinear_taps(int(in_len), border, int(full_len))))


def _dummy(dtype):
    cp = _cupy()
    key = (np.dtype(dtype).str, cp.cuda.Device().id)
    return _upload_once(_dummies, key, lambda: cp.zeros(2, dtype=dtype))


def _f32(a):
    cp = _cupy()
    return cp.ascontiguousarray(cp.asarray(a, dtype=cp.float32))


def _per_mask(values, n: int, dtype, what: str):
    cp = _cupy()
    arr = cp.ascontiguousarray(cp.asarray(values, dtype=dtype))
    if arr.shape[0] != n:
        raise InvalidInputError(f"{what} has {arr.shape[0]} rows for {n} masks")
    return arr


def _geometry(masks, out_hw, full_hw, offsets):
    n, h, w = (int(d) for d in masks.shape)
    H, W = (int(d) for d in out_hw)
    fh, fw = (int(d) for d in (full_hw or out_hw))
    if fh < H or fw < W:
        raise ValueError(f"the resized size {fh}x{fw} is smaller than the crop {H}x{W}")
    return n, h, w, H, W, fh, fw


def upsample_bilinear(masks, out_hw, border: str = "clamp", full_hw=None, offsets=None):
    """Resize (N, h, w) masks bilinearly to (N, H, W), optionally cropping a resized ``full_hw``."""
    cp = _cupy()
    masks = _f32(masks)
    n, h, w, H, W, fh, fw = _geometry(masks, out_hw, full_hw, offsets)
    out = cp.empty((n, H, W), dtype=cp.float32)
    (ty_idx, ty_wt), (tx_idx, tx_wt) = _taps(h, border, fh), _taps(w, border, fw)
    options = 0
    offs = _dummy(np.int32)
    if offsets is not None:
        offs = _per_mask(offsets, n, cp.int32, "offsets")
        options |= _OPT_OFFSETS
    _launch("upsample_bilinear_f32", n * H * W,
            (masks, offs, np.int32(options), ty_idx, ty_wt, tx_idx, tx_wt, out,
             np.int32(n), np.int32(h), np.int32(w), np.int32(H), np.int32(W), np.int32(fh), np.int32(fw)))
    return out


def masked_batch(x, masks, out=None, border: str = "clamp", shift=None, scale=None, full_hw=None, offsets=None):
    """out[i] = x ⊙ ((up(masks[i]) + shift[i]) · scale[i]): the engine input for a chunk of masks.

    ``x`` is (1, C, H, W) or (C, H, W); ``out`` (N, C, H, W), float32 or float16 and
    C-contiguous (the engine's input buffer), is written in place when given.
    """
    cp = _cupy()
    x = _f32(x)
    if x.ndim == 4:
        x = x[0]
    c, H, W = (int(d) for d in x.shape)
    masks = _f32(masks)
    n, h, w, H, W, fh, fw = _geometry(masks, (H, W), full_hw, offsets)
    if out is None:
        out = cp.empty((n, c, H, W), dtype=cp.float32)
    if tuple(out.shape) != (n, c, H, W) or out.dtype not in (cp.float32, cp.float16) or not out.flags.c_contiguous:
        raise InvalidInputError(
            f"masked_batch output must be a C-contiguous float32/float16 array of shape {(n, c, H, W)}, "
            f"got {out.dtype} {tuple(out.shape)}")
    (ty_idx, ty_wt), (tx_idx, tx_wt) = _taps(h, border, fh), _taps(w, border, fw)
    options = 0
    shift_arr = scale_arr = _dummy(np.float32)
    offs = _dummy(np.int32)
    if shift is not None:
        shift_arr = _per_mask(shift, n, cp.float32, "shift")
        options |= _OPT_SHIFT
    if scale is not None:
        scale_arr = _per_mask(scale, n, cp.float32, "scale")
        options |= _OPT_SCALE
    if offsets is not None:
        offs = _per_mask(offsets, n, cp.int32, "offsets")
        options |= _OPT_OFFSETS
    name = "masked_batch_f32" if out.dtype == cp.float32 else "masked_batch_f16"
    _launch(name, n * H * W,
            (x, masks, shift_arr, scale_arr, offs, np.int32(options), ty_idx, ty_wt, tx_idx, tx_wt, out,
             np.int32(n), np.int32(c), np.int32(h), np.int32(w), np.int32(H), np.int32(W), np.int32(fh),
             np.int32(fw)))
    return out


def upsampled_minmax(masks, out_hw, border: str = "clamp", chunk: int = 64):
    """Per-mask minimum and maximum of up(masks[i]), one block per mask, nothing materialised.

    ``chunk`` exists for signature parity with the reference and is not needed here.
    """
    cp = _cupy()
    masks = _f32(masks)
    n, h, w = (int(d) for d in masks.shape)
    H, W = (int(d) for d in out_hw)
    lo = cp.empty(n, dtype=cp.float32)
    hi = cp.empty(n, dtype=cp.float32)
    (ty_idx, ty_wt), (tx_idx, tx_wt) = _taps(h, border, H), _taps(w, border, W)
    _launch("upsampled_minmax_f32", n,
            (masks, ty_idx, ty_wt, tx_idx, tx_wt, lo, hi,
             np.int32(n), np.int32(h), np.int32(w), np.int32(H), np.int32(W)),
            grid=(min(n, _MAX_GRID),))
    return lo, hi


def weighted_mask_sum(weights, masks, out_hw, border: str = "clamp"):
    """S[t] = up(Σ_i weights[i, t] · masks[i]) for (N, T) weights and (N, h, w) masks → (T, H, W).

    The low-resolution sum is one GEMM (cuBLAS through CuPy, float64 like the reference),
    then one upsampling kernel.
    """
    cp = _cupy()
    weights = cp.asarray(weights, dtype=cp.float64)
    n, h, w = (int(d) for d in masks.shape)
    low = (weights.T @ cp.asarray(masks, dtype=cp.float64).reshape(n, h * w)).reshape(-1, h, w)
    return upsample_bilinear(low.astype(cp.float32), out_hw, border)


def weighted_crop_sum(weights, masks, offsets, out_hw, full_hw, border: str = "reflect", chunk: int = 64):
    """S[t] = Σ_i weights[i, t] · crop_i(up(masks[i])): RISE's weighting, masks regenerated in the kernel.

    ``chunk`` exists for signature parity with the reference: the kernel never holds a
    full-resolution mask. The masks are split over ``_crop_sum_splits`` block rows whose
    float64 partial sums are added atomically.
    """
    cp = _cupy()
    weights = _f32(weights)
    masks = _f32(masks)
    n, h, w, H, W, fh, fw = _geometry(masks, out_hw, full_hw, offsets)
    targets = int(weights.shape[1])
    if weights.shape[0] != n:
        raise InvalidInputError(f"weights have {weights.shape[0]} rows for {n} masks")
    offs = _per_mask(offsets, n, cp.int32, "offsets")
    acc = cp.zeros((targets, H, W), dtype=cp.float64)
    (ty_idx, ty_wt), (tx_idx, tx_wt) = _taps(h, border, fh), _taps(w, border, fw)
    pixel_blocks = min(_MAX_GRID, -(-(H * W) // _BLOCK))
    splits = _crop_sum_splits(n, pixel_blocks)
    for t0 in range(0, targets, _MAX_TARGETS_PER_PASS):
        tn = min(_MAX_TARGETS_PER_PASS, targets - t0)
        _launch("weighted_crop_sum_f32", H * W,
                (masks, offs, weights, ty_idx, ty_wt, tx_idx, tx_wt, acc,
                 np.int32(n), np.int32(targets), np.int32(t0), np.int32(tn), np.int32(h), np.int32(w),
                 np.int32(H), np.int32(W), np.int32(fh), np.int32(fw)),
                grid=(pixel_blocks, splits))
    return acc.astype(cp.float32)


def _crop_sum_splits(n: int, pixel_blocks: int, target_blocks: int = 4096, min_masks: int = 64) -> int:
    """Block rows for the RISE sum: enough blocks to fill a large GPU, >= ``min_masks`` masks each."""
    return max(1, min(-(-target_blocks // max(pixel_blocks, 1)), n // min_masks, 65535))


def threshold_masks(activations, threshold: float):
    """SIDU's binary masks: [A_i > τ] as float32 (C, h, w)."""
    cp = _cupy()
    a = _f32(activations)
    out = cp.empty(a.shape, dtype=cp.float32)
    _launch("threshold_masks_f32", int(a.size), (a, out, np.int64(a.size), np.float32(threshold)))
    return out


def ksigma_binarize(activations, k: float):
    """FEM: per channel mean μ and [A_k ≥ μ_k + k·σ_k] (population std). Returns (binary, μ)."""
    cp = _cupy()
    a = _f32(activations)
    c = int(a.shape[0])
    hw = int(a.size // max(c, 1))
    binary = cp.empty(a.shape, dtype=cp.float32)
    mu = cp.empty(c, dtype=cp.float32)
    _launch("ksigma_binarize_f32", c, (a, binary, mu, np.int32(c), np.int32(hw), np.float64(k)),
            grid=(min(c, _MAX_GRID),))
    return binary, mu
