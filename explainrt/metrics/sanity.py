"""Sanity check (seed 003 §4.1; Adebayo et al.): cascading model-parameter randomisation.

The torch model is re-exported with its layers randomised top-down, cumulatively (step k
re-initialises the first k layers of ``layers``), every method re-explains the same image
for the class the trained model predicts, and each map is compared with the trained model's
by Spearman rank correlation. A method that depends on what the model learned gives maps
whose correlation drops once layers are randomised.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
from typing import Optional, Sequence

import numpy as np

from .._repr import CompactRepr
from ..errors import InvalidInputError, require
from ..imaging import ImageLike
from .similarity import spearman

log = logging.getLogger(__name__)


@dataclasses.dataclass(repr=False)
class SanityResult(CompactRepr):
    """``correlations[method][k]``: Spearman ρ of the map after randomising ``steps[k]`` vs the original."""

    steps: list[str]  # "original", then the layer randomised at each step (cumulative)
    target: int
    correlations: dict
    maps: dict  # method -> (len(steps), H, W) float32

    def to_dict(self) -> dict:
        return {"steps": self.steps, "target": self.target,
                "spearman": {m: [float(v) for v in c] for m, c in self.correlations.items()}}


def parameter_layers(model) -> list[str]:
    """Names of the modules that hold parameters themselves, last first (a top-down order)."""
    names = [name for name, mod in model.named_modules()
             if name and any(True for _ in mod.parameters(recurse=False))]
    return names[::-1]


def randomise_layer(module, generator) -> None:
    """Re-initialise a module's own parameters: ``reset_parameters`` when it has one, else N(0, 0.02)."""
    torch = require("torch", "export", "the sanity check")
    with torch.no_grad():
        if hasattr(module, "reset_parameters"):
            state = torch.random.get_rng_state()
            torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator)))
            try:
                module.reset_parameters()
            finally:
                torch.random.set_rng_state(state)
            if hasattr(module, "weight") and isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.affine:
                # BatchNorm's reset gives weight 1, bias 0: an identity, not a randomisation.
                module.weight.normal_(1.0, 0.5, generator=generator)
                module.bias.normal_(0.0, 0.5, generator=generator)
        else:
            for p in module.parameters(recurse=False):
                p.normal_(0.0, 0.02, generator=generator)


def cascading_randomization(model, image: ImageLike, methods: Sequence[str], layers: Optional[Sequence[str]] = None,
                            params: Optional[dict] = None, seed: int = 0, batch_size: Optional[int] = None,
                            workdir: Optional[str] = None, **export_options) -> SanityResult:
    """Run the cascading randomisation test of ``methods`` on a torch ``model`` and one image.

    ``layers``: module names in the order to randomise (default ``parameter_layers(model)``:
    top-down). ``params``: ``{method: {param: value}}``. ``export_options`` go to
    ``export_torch`` (``input_size``, ``layer``, ``mean``, ``std`` …); the explained layer is
    pinned to the trained model's so every step explains the same tensor.
    """
    require("torch", "export", "the sanity check")
    from ..api import Explainer
    from ..export.torch_export import export_torch

    modules = dict(model.named_modules())
    layers = list(layers) if layers is not None else parameter_layers(model)
    missing = [n for n in layers if n not in modules]
    if missing:
        raise InvalidInputError(f"the model has no module(s) {missing}; see model.named_modules()")
    if not methods:
        raise InvalidInputError("give at least one method to check")
    params = params or {}
    import torch

    generator = torch.Generator().manual_seed(int(seed))
    current = copy.deepcopy(model).eval()
    steps = ["original"] + list(layers)
    maps = {m: [] for m in methods}
    target = None
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for k, step in enumerate(steps):
            if k > 0:
                randomise_layer(dict(current.named_modules())[step], generator)
            path = os.path.join(tmp, f"step{k}.onnx")
            meta = export_torch(current, path, **export_options)
            if k == 0 and meta.activation_layer:
                export_options.setdefault("layer", meta.activation_layer.split("#")[0])
            with Explainer(path, batch_size=batch_size) as explainer:
                if target is None:
                    target = int(np.argmax(explainer.predict(image)))
                for method in methods:
                    result = explainer.explain(image, method, target=target, **params.get(method, {}))
                    maps[method].append(result.saliency)
            log.info("sanity step %d/%d (%s) done", k, len(steps) - 1, step)
    stacked = {m: np.stack(v) for m, v in maps.items()}
    correlations = {m: [spearman(v[0], v[k]) for k in range(len(steps))] for m, v in stacked.items()}
    return SanityResult(steps, target, correlations, stacked)
