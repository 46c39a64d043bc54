"""Mask operations, one dispatch point: NumPy references on CPU, CUDA kernels on GPU.

``get_ops(xp)`` returns a namespace exposing ``masked_batch``, ``upsampled_minmax``,
``weighted_mask_sum``, ``weighted_crop_sum``, ``threshold_masks``, ``ksigma_binarize`` for the
array module ``xp`` an engine speaks. Both implementations share names and signatures.
"""
from __future__ import annotations

from types import ModuleType

import numpy as np

from . import reference


def to_host(xp, arr) -> np.ndarray:
    """``arr`` as a NumPy array (one device→host copy when ``xp`` is CuPy)."""
    return xp.asnumpy(arr) if xp is not np else np.asarray(arr)


def get_ops(xp) -> ModuleType:
    """The mask-operation implementation for array module ``xp`` (numpy or cupy)."""
    if xp is np:
        return reference
    from . import cuda  # lazy: needs cupy

    return cuda


__all__ = ["get_ops", "reference", "to_host"]
