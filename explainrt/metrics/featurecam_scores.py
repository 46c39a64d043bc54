"""Feature CAM's evaluation (seed 001): classify the "explanation map" of a saliency map.

The map is thresholded at its 80th percentile; pixels strictly above it keep the original
input, every other pixel is 0 in normalised space (the dataset mean colour, as masking does
everywhere in explainrt). "Strictly above" is binary thresholding's convention
(cv2.THRESH_BINARY), and it keeps a map with many equal low values (ReLU zeros) from passing
everything. The seed reports the percentage of right classifications (top-1 of the map =
top-1 of the original), the confidence of the original class on the map, and the percentage
of images whose confidence increased over the original's.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import InvalidInputError
from ..imaging import ImageLike
from ..kernels import to_host
from .base import ModelLike, batch_size_of, check_map, engine_input, engine_of

DEFAULT_PERCENTILE = 80.0


@dataclasses.dataclass
class ExplanationMapScore:
    """How the model sees one explanation map, against the original image."""

    original_class: int
    original_prob: float  # p(x)_c
    map_class: int  # top-1 on the explanation map
    map_prob: float  # p(map)_c, c the original class
    kept_fraction: float  # pixels kept

    @property
    def right(self) -> bool:
        return self.map_class == self.original_class

    @property
    def increase(self) -> bool:
        return self.map_prob > self.original_prob

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "right": self.right, "increase": self.increase}


def explanation_mask(saliency: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> np.ndarray:
    """Boolean (H, W): saliency strictly above its ``percentile``-th percentile (linear interpolation)."""
    if not 0.0 <= float(percentile) < 100.0:
        raise InvalidInputError(f"percentile must be in [0, 100), got {percentile}")
    sal = np.asarray(saliency, dtype=np.float64)
    return sal > np.percentile(sal, float(percentile))


def explanation_map(x, saliency: np.ndarray, percentile: float = DEFAULT_PERCENTILE, xp=np):
    """The explanation map of input x (1, C, H, W): x where the mask holds, 0 elsewhere."""
    return _keep(x, explanation_mask(saliency, percentile), xp)


def _keep(x, mask: np.ndarray, xp):
    return x * xp.asarray(mask.astype(np.float32))[None, None]


def explanation_map_scores(model: ModelLike, image: ImageLike, saliency: Union[np.ndarray, Mapping, Sequence],
                           percentile: float = DEFAULT_PERCENTILE, batch_size: Optional[int] = None):
    """Score the explanation map of one or several saliency maps of ``image``.

    Returns one ``ExplanationMapScore`` for a single (H, W) map, else ``{name: score}`` for a
    mapping / list of maps (all classified in shared batches).
    """
    engine = engine_of(model)
    bs = batch_size_of(model, engine, batch_size)
    xp = engine.xp
    single = hasattr(saliency, "shape") and not isinstance(saliency, Mapping)
    named = {None: saliency} if single else (dict(saliency) if isinstance(saliency, Mapping)
                                            else dict(enumerate(saliency)))
    if not named:
        raise InvalidInputError("no saliency map given")
    x = engine_input(engine, image)
    hw = tuple(x.shape[2:])
    masks = {name: explanation_mask(check_map(m, hw), percentile) for name, m in named.items()}
    stack = xp.concatenate([x] + [_keep(x, m, xp) for m in masks.values()])
    name = engine.metadata.probs_output
    probs = to_host(xp, engine.infer_batches(stack, [name], bs)[name]).astype(np.float64)
    original = int(np.argmax(probs[0]))
    scores = {}
    for row, (name, mask) in enumerate(masks.items(), start=1):
        scores[name] = ExplanationMapScore(original, float(probs[0, original]), int(np.argmax(probs[row])),
                                           float(probs[row, original]), float(mask.mean()))
    return scores[None] if single else scores


def summarise_explanation_maps(scores: Sequence[ExplanationMapScore]) -> dict:
    """The seed's numbers over images: right-classification %, mean confidence, % increase."""
    if not scores:
        raise InvalidInputError("no explanation-map scores to summarise")
    return {
        "images": len(scores),
        "right_classification_pct": 100.0 * float(np.mean([s.right for s in scores])),
        "mean_confidence": float(np.mean([s.map_prob for s in scores])),
        "mean_original_confidence": float(np.mean([s.original_prob for s in scores])),
        "confidence_increase_pct": 100.0 * float(np.mean([s.increase for s in scores])),
    }
