"""Saliency-map similarity (seed 002): Pearson correlation, SIM, KL divergence, rank correlation.

Conventions follow the MIT saliency benchmark (Bylinskii et al., "What do different
evaluation metrics tell us about saliency models?"): SIM and KL compare the two maps as
distributions (each divided by its sum); KL is D_KL(reference ‖ saliency) =
Σ r · log(ε + r / (s + ε)), i.e. the information lost when the saliency map stands in for
the reference (0 for identical maps; grows when the saliency misses reference mass).
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np

from ..errors import InvalidInputError
from ..imaging import resize_map

#: the benchmark code's epsilon (MATLAB's eps)
KL_EPSILON = float(np.finfo(np.float64).eps)


def _pair(a, b, name: str = "maps") -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InvalidInputError(f"{name} must have the same shape, got {a.shape} and {b.shape} (resize one first)")
    if a.size < 2:
        raise InvalidInputError(f"{name} need at least 2 values")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise InvalidInputError(f"{name} must hold finite numbers")
    return a.reshape(-1), b.reshape(-1)


def _distribution(m: np.ndarray, name: str) -> np.ndarray:
    if m.min() < 0:
        raise InvalidInputError(f"{name} has negative values; SIM and KL compare non-negative maps")
    total = m.sum()
    if total <= 0:
        raise InvalidInputError(f"{name} is all zeros; it cannot be normalised to sum 1")
    return m / total


def pearson(a, b) -> float:
    """Pearson correlation coefficient of two maps (NaN when either is constant)."""
    a, b = _pair(a, b)
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def rankdata(values) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata's 'average')."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 … ends
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (NaN when a map is constant)."""
    a, b = _pair(a, b)
    return pearson(rankdata(a), rankdata(b))


def sim(a, b) -> float:
    """Histogram intersection Σ min(a', b') of the maps normalised to sum 1 (1: identical, 0: disjoint)."""
    a, b = _pair(a, b)
    return float(np.minimum(_distribution(a, "first map"), _distribution(b, "second map")).sum())


def kl_divergence(saliency, reference, eps: float = KL_EPSILON) -> float:
    """D_KL(reference ‖ saliency) = Σ r · log(ε + r / (s + ε)), both normalised to sum 1."""
    s, r = _pair(saliency, reference)
    s = _distribution(s, "saliency map")
    r = _distribution(r, "reference map")
    return float((r * np.log(eps + r / (s + eps))).sum())


def load_reference_map(path: Union[str, os.PathLike], size_hw=None) -> np.ndarray:
    """A reference (e.g. human fixation) map from a grey image or a .npy file, float64, optionally resized.

    Colour images are converted to grey; a .npy may hold (H, W) or (1, H, W).
    """
    import cv2

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InvalidInputError(f"reference map not found: {path}")
    if path.lower().endswith(".npy"):
        try:
            ref = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise InvalidInputError(f"{path} is not a NumPy array file: {exc}") from exc
        ref = np.squeeze(ref)
        if ref.ndim != 2:
            raise InvalidInputError(f"{path}: a reference map must be 2-D (H, W), got shape {ref.shape}")
    else:
        ref = cv2.imread(path, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
        if ref is None:
            raise InvalidInputError(f"could not read the reference map {path}; give a grey PNG/JPEG or a .npy file")
    ref = ref.astype(np.float32)
    if size_hw is not None:
        ref = resize_map(ref, tuple(size_hw))
    return ref.astype(np.float64)


def compare_maps(saliency, reference) -> dict:
    """Pearson, SIM and KL of a saliency map against a reference (resized to the saliency's size)."""
    saliency = np.asarray(saliency, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if reference.shape != saliency.shape:
        reference = resize_map(reference.astype(np.float32), saliency.shape).astype(np.float64)
    return {"pearson": pearson(saliency, reference), "sim": sim(saliency, reference),
            "kl": kl_divergence(saliency, reference)}
