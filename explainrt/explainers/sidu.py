"""SIDU: Similarity Difference and Uniqueness (seed 000; reference code SIDU_XAI_CODE)."""
from __future__ import annotations

from .base import Context, MaskPlan, Method, ScoreTable, check_range
from .registry import register


def pairwise_distance_sums(xp, probs, counts):
    """U_u = Σ_v counts[v] · ‖P_u − P_v‖₂ over distinct rows (multiplicities count)."""
    p = probs.astype(xp.float64)
    sq = (p * p).sum(axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (p @ p.T)
    dist = xp.sqrt(xp.maximum(d2, 0.0))
    return dist @ counts.astype(xp.float64)


@register
class SiduExplainer(Method):
    """Masks = binarised activation channels; weight = similarity difference × uniqueness.

    ``threshold`` τ binarises raw activations (reference code 0.5; a later revision uses 0.1);
    ``sigma`` is the Gaussian kernel width of the similarity difference.
    """

    name = "sidu"

    def __init__(self, *, threshold: float = 0.5, sigma: float = 0.25):
        self.threshold = check_range("threshold", threshold)
        self.sigma = check_range("sigma", sigma, low=0, low_open=True)

    def plan(self, ctx: Context) -> MaskPlan:
        masks = ctx.ops.threshold_masks(ctx.base.activations, self.threshold)
        return MaskPlan(masks=masks, border="reflect", binary=True)

    def weigh(self, ctx: Context, plan: MaskPlan, table: ScoreTable):
        xp = ctx.xp
        counts = xp.asarray(table.counts)
        n = plan.count
        p_org = ctx.base.probs.astype(xp.float64)[ctx.targets]  # (T,)
        p_masks = table.probs.astype(xp.float64)  # (U, K)
        sd = xp.exp(-((p_org[None, :] - p_masks[:, ctx.targets]) ** 2) / (2.0 * self.sigma ** 2))  # (U, T)
        uniq = pairwise_distance_sums(xp, table.probs, counts)
        span = uniq.max() - uniq.min()
        uniq = (uniq - uniq.min()) / (span if span > 0 else 1.0)
        weights = sd * uniq[:, None] * counts[:, None] / n  # (U, T): multiplicity folds duplicates
        return ctx.ops.weighted_mask_sum(weights, plan.masks[table.first], ctx.input_hw, border="reflect")
