"""Insertion and deletion (RISE's causal metrics; seed 000 Table 1, seed 003 §4.5).

Pixels are ordered by saliency, descending (ties in raster order). Deletion starts at the
input x and sets ``step`` pixels per step (every channel) to 0 in normalised space;
insertion starts from a blurred x and puts the original pixels back. The score of each
image is p(·)_c with c the top-1 class of x; a curve has ``ceil(H·W/step) + 1`` points and
its area is the trapezoid rule on [0, 1]. Every step image of every curve goes through the
engine in chunks of ``batch_size``, made chunk by chunk, never all at once.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np

from .._repr import CompactRepr
from ..errors import InvalidInputError
from ..imaging import ImageLike
from ..kernels import to_host
from ..runtime.staging import run_in_chunks
from .base import ModelLike, batch_size_of, check_map, engine_input, engine_of

log = logging.getLogger(__name__)

MODES = ("insertion", "deletion")
DEFAULT_STEP = 224
#: RISE's insertion substrate: an 11×11 Gaussian with σ = 5, per channel, zero padding.
BLUR_SIZE = 11
BLUR_SIGMA = 5.0

ProgressFn = Callable[[int, int], None]


@dataclasses.dataclass(repr=False)
class CausalCurve(CompactRepr):
    """One insertion or deletion curve: ``scores[i]`` is p_c after ``i·step`` pixels moved."""

    mode: str
    target: int
    step: int
    pixels: int  # H·W
    scores: np.ndarray  # (n_steps + 1,) float64

    @property
    def fractions(self) -> np.ndarray:
        """Fraction of pixels deleted (or inserted) at each point, 0 … 1."""
        moved = np.minimum(np.arange(self.scores.size) * self.step, self.pixels)
        return moved / float(self.pixels)

    @property
    def auc(self) -> float:
        return area_under_curve(self.scores)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "target": self.target, "step": self.step, "auc": self.auc,
                "scores": [float(v) for v in self.scores]}


def area_under_curve(scores: Sequence[float]) -> float:
    """Trapezoid area of equally spaced points on [0, 1]: (Σa − a₀/2 − a_last/2) / (len − 1)."""
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 1 or a.size < 2:
        raise InvalidInputError(f"a curve needs at least 2 points, got shape {a.shape}")
    return float((a.sum() - a[0] / 2.0 - a[-1] / 2.0) / (a.size - 1))


def step_count(pixels: int, step: int) -> int:
    """n_steps = ceil(H·W / step); the curve has n_steps + 1 points."""
    return int(math.ceil(pixels / step))


def pixel_order(saliency: np.ndarray) -> np.ndarray:
    """Flat pixel indices by saliency, descending; equal values keep raster order (stable)."""
    return np.argsort(-np.asarray(saliency, dtype=np.float64).reshape(-1), kind="stable")


@functools.lru_cache(maxsize=8)
def rise_blur_kernel(size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """The 1-D factor k of RISE's blur kernel (the 2-D kernel is k ⊗ k; it sums to 1).

    RISE's reference builds it as ``scipy.ndimage.gaussian_filter`` of a size×size delta
    (mode 'reflect', truncate 4): a Gaussian whose tails past the 11 taps are folded back in
    by reflection. Reproduced here without scipy.
    """
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    centre = size // 2
    kernel = np.zeros(size, dtype=np.float64)
    for i in range(size):
        src = np.mod(i + offsets, 2 * size)
        src = np.where(src >= size, 2 * size - 1 - src, src)  # scipy 'reflect': (d c b a | a b c d | d c b a)
        kernel[i] = weights[src == centre].sum()
    kernel.setflags(write=False)
    return kernel


@functools.lru_cache(maxsize=8)
def _blur_matrix(length: int, size: int, sigma: float) -> np.ndarray:
    """(length × length) band matrix applying the 1-D kernel with zero padding."""
    k = rise_blur_kernel(size, sigma)
    half = size // 2
    mat = np.zeros((length, length), dtype=np.float64)
    for d in range(-half, half + 1):
        idx = np.arange(max(0, -d), min(length, length - d))
        mat[idx, idx + d] = k[d + half]
    mat.setflags(write=False)
    return mat


def blur_substrate(x, xp=np, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA):
    """Insertion's start image: x (1, C, H, W) blurred per channel, zero padding (RISE's conv2d)."""
    _, _, h, w = x.shape
    rows = xp.asarray(_blur_matrix(h, size, sigma), dtype=xp.float32)
    cols = xp.asarray(_blur_matrix(w, size, sigma).T, dtype=xp.float32)
    return xp.matmul(xp.matmul(rows, x.astype(xp.float32)), cols)


@dataclasses.dataclass
class _CurveJob:
    name: object
    mode: str
    start: object  # (C, H·W) on the engine's device
    finish: object
    rank: object  # (H·W,) position of each pixel in the order
    n_points: int


def insertion_deletion_curves(model: ModelLike, image: ImageLike, saliency: Union[np.ndarray, Mapping, Sequence],
                       step: int = DEFAULT_STEP, modes: Sequence[str] = MODES, batch_size: Optional[int] = None,
                       target: Optional[int] = None, progress: Optional[ProgressFn] = None) -> dict:
    """Insertion/deletion curves of one image for one or several saliency maps.

    ``model``: an Engine, an Explainer or a path. ``saliency``: one (H, W) map, or a mapping
    ``{name: map}`` / a sequence of maps (resized bilinearly to the input if needed).
    Returns ``{mode: CausalCurve}`` for a single map, else ``{name: {mode: CausalCurve}}``.
    The images of every curve share the engine's batches; ``target`` overrides the class
    scored (default: top-1 on x). ``progress(done, total)`` counts forward passes.
    """
    engine = engine_of(model)
    bs = batch_size_of(model, engine, batch_size)
    xp = engine.xp
    step = int(step)
    if step < 1:
        raise InvalidInputError(f"step must be at least 1 pixel, got {step}")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise InvalidInputError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")
    single = isinstance(saliency, np.ndarray) or (hasattr(saliency, "shape") and not isinstance(saliency, Mapping))
    named = {None: saliency} if single else (dict(saliency) if isinstance(saliency, Mapping)
                                            else dict(enumerate(saliency)))
    if not named:
        raise InvalidInputError("no saliency map given")
    x = engine_input(engine, image)
    _, c, h, w = x.shape
    pixels = h * w
    probs_name = engine.metadata.probs_output
    if target is None:
        target = int(np.argmax(to_host(xp, engine.infer(x, [probs_name])[probs_name][0])))
    elif not 0 <= int(target) < engine.metadata.num_classes:
        raise InvalidInputError(f"target {target} is outside 0..{engine.metadata.num_classes - 1}")
    flat = x.reshape(c, pixels)
    substrates = {"deletion": (flat, xp.zeros_like(flat))}
    if "insertion" in modes:
        substrates["insertion"] = (blur_substrate(x, xp).reshape(c, pixels), flat)
    n_points = step_count(pixels, step) + 1
    jobs = []
    for name, smap in named.items():
        order = pixel_order(check_map(smap, (h, w), "saliency" if name is None else f"saliency {name!r}"))
        rank = np.empty(pixels, dtype=np.int64)
        rank[order] = np.arange(pixels)
        rank = xp.asarray(rank)
        for mode in modes:
            start, finish = substrates[mode]
            jobs.append(_CurveJob(name, mode, start, finish, rank, n_points))
    scores = _run_jobs(engine, jobs, step, (c, h, w), bs, int(target), progress)
    curves = {}
    for job, s in zip(jobs, scores):
        curves.setdefault(job.name, {})[job.mode] = CausalCurve(job.mode, int(target), step, pixels, s)
    return curves[None] if single else curves


def _run_jobs(engine, jobs: list, step: int, chw: tuple, bs: int, target: int,
              progress: Optional[ProgressFn]) -> list:
    """Every (curve, step) image in one stream of engine batches; returns the scores per curve."""
    xp = engine.xp
    c, h, w = chw
    flat_jobs = np.array([(j, i) for j, job in enumerate(jobs) for i in range(job.n_points)], dtype=np.int64)
    total = flat_jobs.shape[0]
    scores = xp.empty(total, dtype=xp.float32)  # stays on the engine's device until the end
    probs_name = engine.metadata.probs_output
    if progress:
        progress(0, total)

    def write(buffer, begin: int, b: int) -> None:
        chunk = flat_jobs[begin:begin + b]
        flat = buffer.reshape(b, c, h * w)
        for j in np.unique(chunk[:, 0]):
            rows = np.flatnonzero(chunk[:, 0] == j)
            job = jobs[j]
            moved = xp.asarray(chunk[rows, 1] * step)  # pixels already moved at these steps
            take_finish = job.rank[None, :] < moved[:, None]  # (r, H·W)
            lo, hi = int(rows[0]), int(rows[-1]) + 1  # rows of one curve are contiguous
            flat[lo:hi] = xp.where(take_finish[:, None, :], job.finish[None], job.start[None])

    def take(begin: int, b: int, out: dict) -> None:
        scores[begin:begin + b] = out[probs_name][:, target]
        if progress:
            progress(begin + b, total)

    # the driver's chunk loop and staging: step images written on a side stream while the engine runs
    run_in_chunks(engine, total, bs, (c, h, w), write, [probs_name], take)
    log.debug("ran %d insertion/deletion passes for %d curves", total, len(jobs))
    scores = to_host(xp, scores).astype(np.float64)  # one copy for every curve
    return np.split(scores, np.cumsum([job.n_points for job in jobs])[:-1])  # flat_jobs is curve-major


def deletion(model: ModelLike, image: ImageLike, saliency: np.ndarray, step: int = DEFAULT_STEP,
             batch_size: Optional[int] = None, target: Optional[int] = None) -> CausalCurve:
    """The deletion curve of one map (lower area: the map found what the model needs)."""
    return insertion_deletion_curves(model, image, saliency, step, ("deletion",), batch_size, target)["deletion"]


def insertion(model: ModelLike, image: ImageLike, saliency: np.ndarray, step: int = DEFAULT_STEP,
              batch_size: Optional[int] = None, target: Optional[int] = None) -> CausalCurve:
    """The insertion curve of one map (higher area: the map found what the model needs)."""
    return insertion_deletion_curves(model, image, saliency, step, ("insertion",), batch_size, target)["insertion"]
