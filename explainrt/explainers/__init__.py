"""Explanation methods (method math only) and the shared driver that runs them."""
from __future__ import annotations

from .base import Context, MaskPlan, Method, ScoreTable
from .fem import FemExplainer
from .rise import RiseExplainer
from .scorecam import ScoreCamExplainer
from .sidu import SiduExplainer

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (SiduExplainer, ScoreCamExplainer, RiseExplainer, FemExplainer)
}

from .featurecam import FeatureCamExplainer  # noqa: E402  (needs METHODS for its base map)

METHODS[FeatureCamExplainer.name] = FeatureCamExplainer


def check_applicable(method: str, algo: Method, metadata) -> None:
    """Refuse ``algo`` (the method ``method``, created) on a model it cannot explain: the methods that
    read a feature layer's activations on a black-box model (exported without one)."""
    from ..errors import InvalidInputError

    if algo.needs_activation and not metadata.has_activation:
        usable = ", ".join(name for name, cls in METHODS.items() if not cls.needs_activation)
        model = f"model {metadata.name!r}" if metadata.name else "the model"
        raise InvalidInputError(
            f"method {method!r} needs the activations of a feature layer, but {model} was exported without one "
            f"(a black-box model: scores only); use {usable} (or featurecam with base='rise'), or re-export "
            "with an activation")

__all__ = ["METHODS", "check_applicable", "Context", "MaskPlan", "Method", "ScoreTable", "FemExplainer", "FeatureCamExplainer",
           "RiseExplainer", "ScoreCamExplainer", "SiduExplainer"]
