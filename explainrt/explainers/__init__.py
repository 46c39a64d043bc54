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

__all__ = ["METHODS", "Context", "MaskPlan", "Method", "ScoreTable", "FemExplainer", "FeatureCamExplainer",
           "FgvisExplainer", "GradCamExplainer", "GradCamPlusPlusExplainer", "LayerCamExplainer", "RiseExplainer",
           "ScoreCamExplainer", "SiduExplainer", "XGradCamExplainer"]
