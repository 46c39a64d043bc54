"""Score-CAM (seed 003; reference: the official Score-CAM code and pytorch-grad-cam's ScoreCAM)."""
from __future__ import annotations

from .base import Context, MaskPlan, Method, ScoreTable, check_bool, check_choice
from .registry import register
from .driver import run_inputs


@register
class ScoreCamExplainer(Method):
    """Weights each upsampled activation channel by the class score of the input it masks.

    ``score``: 'prob' (softmax, the paper) or 'logit'. ``channel_softmax``: softmax of the scores
    over channels (pytorch-grad-cam's weighting is ``score="logit", channel_softmax=True``). ``baseline``: subtract the score of the all-zero input
    (the paper's "increase of confidence"). Constant channels are skipped (exact).
    """

    name = "scorecam"

    def __init__(self, *, score: str = "prob", channel_softmax: bool = False, baseline: bool = False):
        self.score = check_choice("score", score, ("prob", "logit"))
        self.channel_softmax = check_bool("channel_softmax", channel_softmax)
        self.baseline = check_bool("baseline", baseline)

    def plan(self, ctx: Context) -> MaskPlan:
        xp = ctx.xp
        acts = ctx.base.activations.astype(xp.float32)
        # Constant iff constant at activation resolution: exact, cheaper than upsampling, and not
        # fooled by float32 bilinear weights that turn a constant c into c ± 1 ulp.
        flat = acts.reshape(acts.shape[0], -1)
        keep = xp.flatnonzero(flat.max(axis=1) > flat.min(axis=1))
        ctx.extras["channels_skipped"] = int(acts.shape[0] - keep.size)
        masks = acts[keep]
        lo, hi = ctx.ops.upsampled_minmax(masks, ctx.input_hw, "clamp")  # normalisation of kept channels only
        span = hi - lo  # > 0 whenever the input is upsampled; guard layers larger than the input
        return MaskPlan(masks=masks, border="clamp", shift=-lo, scale=1.0 / xp.where(span > 0, span, 1.0))

    def weigh(self, ctx: Context, plan: MaskPlan, table: ScoreTable):
        xp = ctx.xp
        if plan.count == 0:
            return xp.zeros((len(ctx.targets), *ctx.input_hw), dtype=xp.float32)
        scores = ctx.score_rows(table, self.score).astype(xp.float64)  # (N, T)
        if self.baseline:
            zero = xp.zeros_like(ctx.x)
            out = run_inputs(ctx, zero)
            field = ctx.engine.metadata.probs_output if self.score == "prob" else ctx.engine.metadata.logits_output
            scores = scores - out[field][0, ctx.targets].astype(xp.float64)[None, :]
        if self.channel_softmax:
            scores = scores - scores.max(axis=0, keepdims=True)
            scores = xp.exp(scores)
            scores = scores / scores.sum(axis=0, keepdims=True)
        cam = ctx.ops.weighted_mask_sum(scores, plan.masks, ctx.input_hw, border="clamp")
        return xp.maximum(cam, 0.0)
