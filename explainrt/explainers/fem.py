"""FEM: Feature Explanation Method (seed 002). One forward pass, no masked passes."""
from __future__ import annotations

from .base import Context, Method, check_range, minmax
from .registry import register


@register
class FemExplainer(Method):
    """R = Σ_k μ_k · [A_k ≥ μ_k + k·σ_k], min–max to [0, 1], upsampled.

    ``k`` = 1 as the seed says the authors set it (public ports default to 2). Class-agnostic:
    the map is the same for every target.
    """

    name = "fem"
    normalised = True

    def __init__(self, *, k: float = 1.0):
        self.k = check_range("k", k)

    def weigh(self, ctx: Context, plan, table):
        xp = ctx.xp
        binary, mu = ctx.ops.ksigma_binarize(ctx.base.activations, self.k)
        low = (mu[:, None, None] * binary).sum(axis=0)[None]  # (1, h, w)
        low = minmax(low, xp)
        up = ctx.ops.weighted_mask_sum(xp.ones((1, 1), dtype=xp.float32), low, ctx.input_hw, border="clamp")
        return xp.repeat(xp.clip(up, 0.0, 1.0), len(ctx.targets), axis=0)
