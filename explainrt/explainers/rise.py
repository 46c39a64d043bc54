"""RISE: Randomized Input Sampling for Explanation (seed 003; reference: the official RISE code)."""
from __future__ import annotations

from ..errors import InvalidInputError
from ..kernels.reference import rise_grids
from .base import Context, MaskPlan, Method, ScoreTable, check_range
from .registry import register


@register
class RiseExplainer(Method):
    """Random s×s Bernoulli(p1) grids, upsampled with a random shift; weight = class score.

    Never holds N full-resolution masks: they are made chunk by chunk from the grids, once to
    mask the input and once to weigh. Same ``seed`` → same masks on every backend.
    """

    name = "rise"
    needs_activation = False  # class scores only: any classifier, black-box ones included

    def __init__(self, *, n_masks: int = 4000, grid_size: int = 7, p1: float = 0.5, seed: int = 0):
        self.n_masks = check_range("n_masks", n_masks, low=1, kind=int)
        self.grid_size = check_range("grid_size", grid_size, low=1, kind=int)
        self.p1 = check_range("p1", p1, low=0, low_open=True, high=1)
        self.seed = None if seed is None else check_range("seed", seed, low=0, kind=int)

    def check_input(self, input_hw) -> None:
        """Refuse a grid finer than the model input (checked before any work by the server too)."""
        if self.grid_size > min(input_hw):
            raise InvalidInputError(f"parameter grid_size={self.grid_size} is larger than the model input "
                                    f"{input_hw[0]}x{input_hw[1]}; use at most {min(input_hw)}")

    def plan(self, ctx: Context) -> MaskPlan:
        self.check_input(ctx.input_hw)
        grids, offsets, full_hw = rise_grids(self.n_masks, self.grid_size, self.p1, ctx.input_hw, self.seed)
        xp = ctx.xp
        return MaskPlan(masks=xp.asarray(grids), border="reflect", full_hw=full_hw, offsets=xp.asarray(offsets))

    def weigh(self, ctx: Context, plan: MaskPlan, table: ScoreTable):
        scores = ctx.score_rows(table, "prob")  # (N, T)
        sal = ctx.ops.weighted_crop_sum(scores, plan.masks, plan.offsets, ctx.input_hw, plan.full_hw, border="reflect")
        return sal / (plan.count * self.p1)
