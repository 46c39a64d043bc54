"""Per-axis bilinear tap tables for the CUDA kernels, derived from the NumPy reference.

The CUDA resampling kernels do not compute sampling positions themselves: for every position
of the (virtual) resized axis they read two taps (source index, weight) from a table built
here from ``reference._full_matrix``, so the GPU samples exactly where the reference does —
half-pixel centres, the "clamp"/"reflect" border and the one-pixel axis included. This
module needs only NumPy, so the CPU tests check the tables against the reference.
"""
from __future__ import annotations

import functools

import numpy as np

from .reference import _full_matrix


@functools.lru_cache(maxsize=256)
def bilinear_taps(in_len: int, border: str, full_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx, wt), each (full_len, 2): position j of the resized axis is Σ_k wt[j,k]·v[idx[j,k]].

    The weights are the float32 entries of the reference's interpolation matrix (at most two
    non-zeros per row); an unused second tap has weight 0 and repeats the first index, so it
    never reads out of bounds.
    """
    mat = _full_matrix(in_len, border, full_len)
    if in_len == 1:
        idx = np.zeros((full_len, 2), np.int32)
        wt = np.stack([mat[:, 0], np.zeros(full_len)], axis=1)
    else:
        nonzero_first = np.argsort(mat == 0, axis=1, kind="stable")[:, :2]  # non-zero columns, in column order
        wt = np.take_along_axis(mat, nonzero_first, axis=1)
        idx = np.where(wt != 0, nonzero_first, nonzero_first[:, :1]).astype(np.int32)
    idx = np.ascontiguousarray(idx, dtype=np.int32)
    wt = np.ascontiguousarray(wt, dtype=np.float32)
    idx.setflags(write=False)
    wt.setflags(write=False)
    return idx, wt

