"""Explanation methods (method math only) and the shared driver that runs them.

Each method's file registers its class (``registry.register``); importing them here, in this
order, fills ``METHODS`` (the order of listings and error messages).
"""
from __future__ import annotations

from .base import Context, MaskPlan, Method, ScoreTable
from .sidu import SiduExplainer
from .scorecam import ScoreCamExplainer
from .rise import RiseExplainer
from .fem import FemExplainer
from .fgvis import FgvisExplainer
from .gradcam import GradCamExplainer, GradCamPlusPlusExplainer, LayerCamExplainer, XGradCamExplainer
from .featurecam import FeatureCamExplainer
from .registry import METHODS


def check_applicable(method: str, algo: Method, metadata) -> None:
    """Refuse ``algo`` (the method ``method``, created) on a model it cannot explain: the methods that
    read a feature layer's activations on a black-box model (exported without one), and what the
    method's own ``check_model`` refuses (gradient CAMs on token or NHWC layers)."""
    from ..errors import InvalidInputError

    if algo.needs_activation and not metadata.has_activation:
        usable = ", ".join(name + (" (backend torch)" if cls.needs_gradients else "")
                           for name, cls in METHODS.items() if not cls.needs_activation)
        model = f"model {metadata.name!r}" if metadata.name else "the model"
        raise InvalidInputError(
            f"method {method!r} needs the activations of a feature layer, but {model} was exported without one "
            f"(a black-box model: scores only); use {usable} (or featurecam with base='rise'), or re-export "
            "with an activation")
    algo.check_model(metadata)



__all__ = ["METHODS", "check_applicable", "Context", "MaskPlan", "Method", "ScoreTable", "FemExplainer",
           "FeatureCamExplainer", "FgvisExplainer", "GradCamExplainer", "GradCamPlusPlusExplainer", "LayerCamExplainer",
           "RiseExplainer", "ScoreCamExplainer", "SiduExplainer", "XGradCamExplainer"]
