"""Gradient CAMs of the deployed model (seed 002's survey; formulas as pytorch-grad-cam 1.5).

From the explained activation A (C, h, w) and the gradient g = ∂y_c/∂A of each target's score:

- Grad-CAM: ReLU(Σ_k mean(g_k) · A_k);
- Grad-CAM++: weights Σ_ij ReLU(g) · g² / (2g² + Σ_ij A_k · g³) (0 where g = 0);
- XGrad-CAM: weights Σ_ij g · A_k / Σ_ij A_k;
- LayerCAM: ReLU(Σ_k ReLU(g_k) ⊙ A_k).

The gradient comes from the torch engine (one forward pass, one backward pass batched over the
targets: ``runtime.autograd``). Where the export found a CAM head (global average pooling and
one linear layer after the activation, ``metadata.cam_head``) and the score is the logit, g is
``W[c] / (h·w)`` at every position: the map follows from the base pass alone, on every engine.
"""
from __future__ import annotations

from typing import ClassVar

from .base import Context, Method, check_choice
from ..errors import InvalidInputError
from .registry import register

EPS = {"gradcam++": 1e-6, "xgradcam": 1e-7}


@register
class GradCamExplainer(Method):
    """Grad-CAM. ``score``: 'logit' (the class's pre-softmax score, as Grad-CAM) or 'prob'."""

    name: ClassVar[str] = "gradcam"
    needs_gradients = True

    def __init__(self, *, score: str = "logit"):
        self.score = check_choice("score", score, ("logit", "prob"))

    def gradients_needed(self, meta) -> bool:
        return not self.forward_only(meta)

    def check_model(self, meta) -> None:
        layout = meta.activation_layout or "NCHW"
        if meta.has_activation and layout != "NCHW":
            raise InvalidInputError(
                f"{self.name} is implemented for NCHW feature layers; this model's explained tensor is {layout} "
                "(a transformer's tokens or an NHWC map): use scorecam, sidu or rise")

    def forward_only(self, meta) -> bool:
        return self.score == "logit" and meta.cam_head is not None

    def combine(self, xp, a, g):
        """(T, h, w) map at activation resolution from A (C, h, w) and g (T, C, h, w)."""
        weights = g.mean(axis=(2, 3))
        return xp.maximum(xp.einsum("tc,chw->thw", weights, a), 0.0)

    def explain(self, ctx: Context) -> dict:
        xp, meta = ctx.xp, ctx.engine.metadata
        if self.forward_only(meta):
            from ..export.cam_head import class_weights

            a = ctx.base.activations.astype(xp.float32)
            c, h, w = a.shape
            rows = xp.asarray(class_weights(ctx.engine, meta.cam_head)[ctx.targets])  # (T, C)
            g = xp.broadcast_to((rows / (h * w))[:, :, None, None], (len(ctx.targets), c, h, w))
            ctx.extras["gradients"] = "cam_head"  # forward-only: the base pass was all
        else:
            from ..runtime.autograd import GradientGraph

            grad = GradientGraph(ctx.engine)
            with grad.stream():
                a_t, g_t = grad.activation_gradients(grad.to_torch(ctx.x), ctx.targets, self.score)
            a, g = grad.from_torch(a_t[0]), grad.from_torch(g_t)
            ctx.forward_passes += len(ctx.targets)  # the head after the layer, once per target (and a backward)
            ctx.extras["gradients"] = "autograd"
        low = self.combine(xp, a.astype(xp.float32), g.astype(xp.float32))
        t = low.shape[0]
        return {"raw": ctx.ops.weighted_mask_sum(xp.eye(t, dtype=xp.float32), low, ctx.input_hw, border="clamp")}


@register
class GradCamPlusPlusExplainer(GradCamExplainer):
    """Grad-CAM++ (pytorch-grad-cam's closed form of the second-order weights)."""

    name = "gradcam++"

    def combine(self, xp, a, g):
        g2 = g * g
        sum_a = a.sum(axis=(1, 2))[None, :, None, None]
        aij = g2 / (2 * g2 + sum_a * g2 * g + EPS["gradcam++"])
        aij = xp.where(g != 0, aij, 0.0)
        weights = (xp.maximum(g, 0.0) * aij).sum(axis=(2, 3))
        return xp.maximum(xp.einsum("tc,chw->thw", weights, a), 0.0)


@register
class XGradCamExplainer(GradCamExplainer):
    """XGrad-CAM: gradients weighted by the normalised activation."""

    name = "xgradcam"

    def combine(self, xp, a, g):
        weights = (g * a[None]).sum(axis=(2, 3)) / (a.sum(axis=(1, 2))[None] + EPS["xgradcam"])
        return xp.maximum(xp.einsum("tc,chw->thw", weights, a), 0.0)


@register
class LayerCamExplainer(GradCamExplainer):
    """LayerCAM: positive gradients as per-position weights."""

    name = "layercam"

    def combine(self, xp, a, g):
        return xp.maximum((xp.maximum(g, 0.0) * a[None]).sum(axis=1), 0.0)
