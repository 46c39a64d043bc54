"""Public API: ``Explainer(model).explain(image, method) -> Explanation``."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ._repr import CompactRepr
from .errors import InvalidInputError, ModelError
from .explainers import METHODS, check_applicable
from .explainers.base import Context, check_range, minmax
from .explainers.driver import run_masked_passes
from .imaging import ImageLike, PreparedImage, denormalise, overlay, prepare_image
from .kernels import get_ops, to_host
from .runtime import Engine, load_engine

log = logging.getLogger(__name__)

Target = Union[None, int, Sequence[int]]
ProgressFn = Callable[[int, int], None]


def target_indices(target: Target, num_classes: Optional[int] = None) -> list[int]:
    """``target`` (a class index or a non-empty sequence of them) as a list of ints, validated.

    Without ``num_classes`` (a client that does not know the model) only the type and sign are checked.
    """
    items = [target] if np.ndim(target) == 0 else list(target)
    items = [t.item() if isinstance(t, np.ndarray) else t for t in items]
    if not items:
        raise InvalidInputError("target list is empty")
    high = num_classes if num_classes is not None else 2**31
    out = []
    for t in items:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise InvalidInputError(f"target must be a class index (int), got {t!r}")
        if not 0 <= int(t) < high:
            raise InvalidInputError(f"target class {t} is out of range: the model has {num_classes} classes "
                                    f"(0..{num_classes - 1})" if num_classes is not None else
                                    f"target class {t} is out of range: class indices are >= 0")
        out.append(int(t))
    return out


class ConstantMapWarning(UserWarning):
    """An explanation's map is constant: the method found no evidence for the class."""


class FirstTargetView(CompactRepr):
    """``saliency``/``target``/``label`` of the first requested class, for single-target use."""

    saliency_maps: np.ndarray
    targets: list
    labels: list

    @property
    def saliency(self) -> np.ndarray:
        return self.saliency_maps[0]

    @property
    def target(self) -> int:
        return self.targets[0]

    @property
    def label(self) -> str:
        return self.labels[0]


@dataclasses.dataclass(repr=False)
class Explanation(FirstTargetView):
    """The result of one explanation.

    ``saliency_maps`` holds one [0,1] float32 map (H, W at model input size) per target;
    ``saliency``/``target`` are the first. ``forward_passes`` counts every image sent through
    the engine, the base pass included. ``timings`` are seconds per stage.
    """

    method: str
    targets: list[int]
    saliency_maps: np.ndarray  # (T, H, W) float32 in [0, 1]
    raw_maps: np.ndarray  # (T, H, W) before normalisation
    probs: np.ndarray  # (K,) class probabilities of the original input
    forward_passes: int
    timings: dict
    params: dict
    labels: list[str]
    image: Optional[np.ndarray] = None  # original RGB uint8 when the input was an image
    visualization: Optional[np.ndarray] = None  # Feature CAM's RGB visualisation (H, W, 3)
    base_saliency_maps: Optional[np.ndarray] = None  # Feature CAM's base map per target (T, H, W) in [0, 1]
    masks: Optional[np.ndarray] = None  # FGVis's optimised masks per target (T, 1 or 3, H, W) in [0, 1]
    explanations: Optional[np.ndarray] = None  # FGVis's explanation images per target (T, H, W, 3) RGB uint8
    extras: dict = dataclasses.field(default_factory=dict)

    def top_k(self, k: int = 5) -> list[tuple[int, float]]:
        """The k most probable classes of the original input as (class, probability)."""
        k = check_range("k", k, low=0, kind=int)
        order = np.argsort(-self.probs)[:k]
        return [(int(i), float(self.probs[i])) for i in order]

    def overlay(self, alpha: float = 0.5) -> np.ndarray:
        """Heatmap over the original image at its original size (RGB uint8)."""
        if self.image is None:
            raise InvalidInputError("no original image to overlay on (the input was a preprocessed array)")
        return overlay(self.image, self.saliency, check_range("alpha", alpha, low=0.0, high=1.0))

    @property
    def constant_targets(self) -> list[int]:
        """The targets whose map is constant: the method found no evidence for them (e.g. nothing above
        SIDU's threshold, no positive weight); such a map says nothing."""
        return [t for t, m in zip(self.targets, self.saliency_maps) if float(m.max()) == float(m.min())]

    def save(self, directory: str, name: str = "image", plain: bool = False) -> dict:
        """Write what `explainrt explain` writes for this result into ``directory``:
        ``<name>.<method>.npy`` (the map) and, when the input was an image, ``<name>.<method>.png``
        (the overlay with its caption and colour bar; ``plain``: the bare overlay), plus Feature CAM's
        ``.vis.png``; with several targets ``<name>.<method>.<target>.*``. Returns the paths by kind,
        per target."""
        from .outputs import prepare_output_dir, write_targets

        prepare_output_dir(directory)
        files = write_targets(directory, name, self.method, self.targets, self.labels,
                              [self.probs[t] for t in self.targets], self.saliency_maps, self.image,
                              self.visualization, self.forward_passes, plain)
        return dict(zip(self.targets, files))


class Explainer:
    """Explains an exported model through an engine, with every masked pass batched.

    ``model`` is a path to an exported ONNX file (or an ``Engine``); ``batch_size`` is how many
    masked images go through the engine at once (None: the engine's ``max_batch``).
    """

    def __init__(self, model: Union[str, Engine], batch_size: Optional[int] = None, backend: str = "onnxruntime",
                 device: str = "cpu", max_batch: Optional[int] = None, **engine_options: Any):
        for name, value in (("batch_size", batch_size), ("max_batch", max_batch),
                            ("threads", engine_options.get("threads"))):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise InvalidInputError(f"{name} must be an integer >= 1 (or None), got {value!r}")
        if isinstance(model, Engine):
            self.engine = model
        else:
            self.engine = load_engine(str(model), backend=backend, device=device,
                                      max_batch=max_batch or batch_size or 64, **engine_options)
        self.batch_size = int(batch_size or self.engine.max_batch)
        self.metadata = self.engine.metadata
        self.xp = self.engine.xp
        self.ops = get_ops(self.xp)

    @staticmethod
    def methods() -> dict:
        """Method names and their parameters with defaults."""
        return {name: cls.parameters() for name, cls in METHODS.items()}

    def prepare(self, image: ImageLike, name: Optional[str] = None) -> PreparedImage:
        """Decode/resize/normalise ``image`` with the model's metadata."""
        return prepare_image(image, self.metadata, name)

    def predict(self, image: ImageLike) -> np.ndarray:
        """Class probabilities (K,) of one image."""
        prep = self.prepare(image)
        base = self.engine.base_pass(self.xp.asarray(prep.x))
        return to_host(self.xp, base.probs)

    def _targets(self, target: Target, probs: np.ndarray) -> list[int]:
        if target is None:
            return [int(np.argmax(probs))]
        return target_indices(target, probs.shape[0])

    def explain(self, image: ImageLike, method: str = "sidu", target: Target = None,
                progress: Optional[ProgressFn] = None, cancel: Optional[threading.Event] = None,
                **params: Any) -> Explanation:
        """Explain ``image`` with ``method`` for ``target`` (default: the top-1 class).

        ``params`` are the method's parameters (see ``Explainer.methods()``); ``progress`` is
        called as ``progress(done, total)`` over masked passes (FGVis: over iterations); setting
        ``cancel`` stops the work between two chunks (FGVis: two iterations).
        """
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise InvalidInputError(f"cancel must be a threading.Event (or None), got {type(cancel).__name__}")
        if progress is not None and not callable(progress):
            raise InvalidInputError(f"progress must be a callable(done, total) (or None), got {type(progress).__name__}")
        if not isinstance(method, str) or method not in METHODS:
            raise InvalidInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)} (one name)")
        algo = METHODS[method].create(**params)
        check_applicable(method, algo, self.metadata)
        if algo.gradients_needed(self.metadata):
            check_gradients(self.engine, method)
        t0 = time.perf_counter()
        prep = self.prepare(image)
        t1 = time.perf_counter()
        xp = self.xp
        x = xp.asarray(prep.x)
        base = self.engine.base_pass(x)
        probs = to_host(xp, base.probs)
        if not np.all(np.isfinite(probs)):
            raise ModelError("the model returned NaN/Inf probabilities for this input; check the model and the "
                             f"mean/std in its metadata (mean={self.metadata.mean}, std={self.metadata.std})")
        t2 = time.perf_counter()
        targets = self._targets(target, probs)
        rgb = denormalise(prep.x, self.metadata)
        ctx = Context(engine=self.engine, ops=self.ops, xp=xp, x=x, base=base, targets=targets,
                      input_hw=tuple(self.metadata.input_size), rgb=rgb, batch_size=self.batch_size,
                      progress=progress, cancel=cancel)
        ctx.run_passes = lambda c, plan: run_masked_passes(c, plan, progress=progress, cancel=cancel)
        result = algo.explain(ctx)
        raw = result.pop("raw")
        maps = raw if algo.normalised else minmax(raw, xp)
        maps, raw = to_host(xp, maps), to_host(xp, raw)
        t3 = time.perf_counter()
        extras = {k: v for k, v in ctx.extras.items() if isinstance(v, (int, float, str))}
        for t, m in zip(targets, maps):
            if float(m.max()) == float(m.min()):
                warnings.warn(f"{method} found no evidence for class {t} in {prep.name}: its map is constant (e.g. "
                              "no activation above SIDU's threshold or no positive weight); try another method or "
                              "its parameters (Explanation.constant_targets lists such classes)",
                              ConstantMapWarning, stacklevel=2)
        masks, explanations = result.get("masks"), result.get("explanations")
        if explanations is not None:  # FGVis: e in normalised space → RGB, shown as the visualisation
            explanations = np.stack([denormalise(e[None], self.metadata) for e in to_host(xp, explanations)])
            result["visualization"] = explanations
        return Explanation(
            method=method, targets=targets, saliency_maps=maps.astype(np.float32), raw_maps=raw.astype(np.float32),
            probs=probs.astype(np.float32), forward_passes=ctx.forward_passes,
            timings={"preprocess_s": t1 - t0, "base_pass_s": t2 - t1, "explain_s": t3 - t2, "total_s": t3 - t0},
            params={**algo.parameters(), **params}, labels=[self.metadata.label(t) for t in targets],
            image=prep.original, visualization=_first(result.get("visualization")),
            base_saliency_maps=result.get("base_saliency"), extras=extras,
            masks=None if masks is None else to_host(xp, masks).astype(np.float32), explanations=explanations,
        )

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_gradients(engine: Engine, method: str) -> None:
    """A clear error when ``method`` needs gradients and ``engine`` cannot give them."""
    if engine.backend != "torch":
        raise InvalidInputError(
            f"method {method!r} differentiates the model, which only the torch engine does; this model runs on "
            f"{engine.backend!r}: open it with backend='torch' (CLI and server: --backend torch)")


def _first(visual):
    return None if visual is None else visual[0]
