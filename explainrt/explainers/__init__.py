"""Explanation methods (method math only) and the shared driver that runs them."""
from __future__ import annotations

from .base import Context, MaskPlan, Method, ScoreTable
from .fem import FemExplainer
from .fgvis import FgvisExplainer
from .gradcam import GradCamExplainer, GradCamPlusPlusExplainer, LayerCamExplainer, XGradCamExplainer
from .rise import RiseExplainer
from .scorecam import ScoreCamExplainer
from .sidu import SiduExplainer

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (SiduExplainer, ScoreCamExplainer, RiseExplainer, FemExplainer, FgvisExplainer,
                        GradCamExplainer, GradCamPlusPlusExplainer, XGradCamExplainer, LayerCamExplainer)
}

from .featurecam import FeatureCamExplainer  # noqa: E402  (needs METHODS for its base map)

METHODS[FeatureCamExplainer.name] = FeatureCamExplainer

__all__ = ["METHODS", "Context", "MaskPlan", "Method", "ScoreTable", "FemExplainer", "FeatureCamExplainer",
           "FgvisExplainer", "GradCamExplainer", "GradCamPlusPlusExplainer", "LayerCamExplainer", "RiseExplainer",
           "ScoreCamExplainer", "SiduExplainer", "XGradCamExplainer"]
