"""What a method is: masks from the base pass, weights from the masked-pass scores.

A method holds only its math. The batched loop, dedupe, chunking, the device and the kernels
belong to the shared driver (``driver.py``).
"""
from __future__ import annotations

import dataclasses
import math
import inspect
from typing import Any, Callable, ClassVar, Optional

import numpy as np

from ..errors import InvalidInputError
from ..runtime.base import BasePass, Engine


@dataclasses.dataclass
class MaskPlan:
    """Low-resolution masks to run through the engine, and how each becomes full size.

    The full-resolution mask i is ``(up(masks[i]) + shift[i]) · scale[i]``, where ``up`` resizes
    to the input (or to ``full_hw`` then crops at ``offsets[i]``). ``binary`` masks are deduped
    by the driver: each distinct mask runs once.
    """

    masks: Any  # (N, h, w) float32, array module of the engine
    border: str = "clamp"
    shift: Optional[Any] = None  # (N,)
    scale: Optional[Any] = None  # (N,)
    full_hw: Optional[tuple[int, int]] = None
    offsets: Optional[Any] = None  # (N, 2) int32 (dy, dx)
    binary: bool = False

    @property
    def count(self) -> int:
        return int(self.masks.shape[0])


@dataclasses.dataclass
class ScoreTable:
    """Engine outputs of the masked passes, one row per *distinct* mask.

    ``inverse[i]`` is the row of mask i; ``counts[u]`` how many masks share row u (the
    multiplicity used by SIDU); ``first[u]`` the index of the first mask of row u.
    """

    probs: Any  # (U, K)
    logits: Optional[Any]  # (U, K) or None
    inverse: Any  # (N,)
    counts: Any  # (U,)
    first: Any  # (U,)

    def expanded(self, field: str = "probs"):
        """Rows for every mask (N, K), duplicates repeated."""
        return getattr(self, field)[self.inverse]


@dataclasses.dataclass
class Context:
    """Everything a method may read while it runs one explanation."""

    engine: Engine
    ops: Any  # kernels namespace for the engine's array module
    xp: Any  # numpy or cupy
    x: Any  # (1, C, H, W) engine input, on the engine's device
    base: BasePass
    targets: list[int]
    input_hw: tuple[int, int]
    rgb: np.ndarray  # (H, W, 3) uint8 at model input size (host), for descriptors
    batch_size: int
    forward_passes: int = 1  # the base pass
    run_passes: Optional[Callable] = None  # driver entry, set by the Explainer
    progress: Optional[Callable] = None  # progress(done, total) of methods that iterate (FGVis)
    cancel: Any = None  # threading.Event: methods that iterate stop between iterations when set
    extras: dict = dataclasses.field(default_factory=dict)

    def score_rows(self, table: ScoreTable, score: str = "prob"):
        """(N, T) scores of every mask for the targets, ``score`` 'prob' or 'logit'."""
        field = "probs" if score == "prob" else "logits"
        if field == "logits" and table.logits is None:
            raise InvalidInputError("score='logit' needs a model exported with a logits output")
        return getattr(table, field)[:, self.targets][table.inverse]


class Method:
    """Base class of explanation methods. Subclasses set ``name`` and define ``plan``/``weigh``.

    Constructor keyword arguments are the method's parameters; an unknown one is an error that
    lists the known ones.
    """

    name: ClassVar[str] = "?"
    #: True when ``weigh`` already returns maps in [0, 1]
    normalised: ClassVar[bool] = False
    #: False for methods that need only class scores (they run on black-box models too)
    needs_activation: ClassVar[bool] = True
    #: True for methods that differentiate the model (they run on the torch engine only)
    needs_gradients: ClassVar[bool] = False

    def gradients_needed(self, meta) -> bool:
        """Whether this call differentiates the model (``meta``: the model's metadata)."""
        return self.needs_gradients

    def check_model(self, meta) -> None:
        """Raise ``InvalidInputError`` when this method cannot explain a model with ``meta`` (beyond a
        missing activation, which ``explainers.check_applicable`` checks for every method)."""

    def plan(self, ctx: Context) -> Optional[MaskPlan]:
        """Masks to run through the engine, or None when the method needs no masked passes."""
        return None

    def weigh(self, ctx: Context, plan: Optional[MaskPlan], table: Optional[ScoreTable]):
        """Raw saliency maps (T, H, W) for ``ctx.targets`` on the engine's device."""
        raise NotImplementedError

    def explain(self, ctx: Context) -> dict:
        """Run the method through the shared driver; returns {'raw': maps, ...extras}."""
        plan = self.plan(ctx)
        table = ctx.run_passes(ctx, plan) if plan is not None else None
        return {"raw": self.weigh(ctx, plan, table)}

    @classmethod
    def parameters(cls) -> dict:
        """Parameter names and defaults, from the constructor's signature."""
        sig = inspect.signature(cls.__init__)
        return {n: p.default for n, p in sig.parameters.items() if n != "self" and p.kind == p.KEYWORD_ONLY}

    @classmethod
    def create(cls, **params) -> "Method":
        known = cls.parameters()
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise InvalidInputError(
                f"unknown parameter(s) {', '.join(unknown)} for method '{cls.name}'; "
                f"it takes: {', '.join(f'{k}={v!r}' for k, v in known.items()) or 'no parameters'}"
            )
        return cls(**params)


INT_PARAM_LIMIT = 2**31 - 1  # counts and seeds: anything larger is a typo, not a request


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def check_range(name: str, value, low=None, high=None, low_open=False, kind=float):
    """Validate a numeric parameter and return it converted to ``kind``."""
    if isinstance(value, (bool, np.bool_)) or (kind is int and isinstance(value, (float, np.floating))
                                               and not float(value).is_integer()):
        raise InvalidInputError(f"parameter {name} must be a{'n' if kind is int else ''} {kind.__name__}, got {_short(value)}")
    try:
        value = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(f"parameter {name} must be a{'n' if kind is int else ''} {kind.__name__}, got {_short(value)}") from None
    if kind is int and abs(value) > INT_PARAM_LIMIT:
        raise InvalidInputError(f"parameter {name}={_short(value)} is out of range (|{name}| <= {INT_PARAM_LIMIT})")
    if kind is not int and not math.isfinite(value):
        raise InvalidInputError(f"parameter {name} must be finite, got {_short(value)}")
    if low is not None and (value <= low if low_open else value < low):
        raise InvalidInputError(f"parameter {name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise InvalidInputError(f"parameter {name} must be <= {high}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """Validate a boolean parameter (True/False only, not truthy strings)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidInputError(f"parameter {name} must be true or false, got {value!r}")
    return bool(value)


def check_choice(name: str, value, choices):
    if value not in choices:
        raise InvalidInputError(f"parameter {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def minmax(maps, xp=np, eps: float = 0.0):
    """Scale each map of (T, H, W) to [0, 1]; a constant map becomes all zeros."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(axis=1, keepdims=True)
    hi = flat.max(axis=1, keepdims=True)
    span = hi - lo
    safe = xp.where(span > 0, span + eps, 1.0)
    return ((flat - lo) / safe * (span > 0)).reshape(maps.shape).astype(xp.float32)
