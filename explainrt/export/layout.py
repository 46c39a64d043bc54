"""How an explained tensor becomes the (N, C, h, w) activation every method reads.

CNNs give NCHW feature maps. Swin-like models keep NHWC ones (a permute). ViT/DeiT-like models
give token sequences (N, prefix + h·w, C): their class/distillation/register tokens are dropped
and the patch tokens reshaped to C × h × w (what pytorch-grad-cam asks users to write by hand as
a ``reshape_transform``). Export applies the view *inside the exported graph*, so every engine
keeps one contract (an NCHW activation output); the metadata records what was done.

The same shape rules pick the explained tensor in ``export_torch`` (module outputs) and in
``export --onnx`` (graph tensors): the last tensor that reads as a grid of features wins, so a
ViT's patch embedding (the last 4-D tensor) is never explained in place of its encoder output.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional, Sequence

from ..errors import InvalidInputError

#: at most this many leading tokens (class, distillation, registers) are dropped by detection
MAX_PREFIX_TOKENS = 16
LAYOUTS = ("NCHW", "NHWC", "tokens")


@dataclasses.dataclass(frozen=True)
class ActivationView:
    """Layout of one explained tensor (shape without the batch axis) and its NCHW view."""

    layout: str  # "NCHW", "NHWC" or "tokens"
    shape: tuple  # the explained tensor's shape, batch axis dropped
    prefix_tokens: int = 0  # tokens: leading tokens dropped (class, registers…)
    grid: Optional[tuple] = None  # tokens: (h, w) of the patch grid

    @property
    def nchw_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the activation the methods read."""
        if self.layout == "NCHW":
            return tuple(self.shape)
        if self.layout == "NHWC":
            h, w, c = self.shape
            return c, h, w
        return self.shape[1], self.grid[0], self.grid[1]

    @property
    def dropped_tokens(self) -> list[int]:
        """Token indices not in the grid: the prefix, and any tokens after the h·w patch tokens."""
        if self.layout != "tokens":
            return []
        used = self.prefix_tokens + self.grid[0] * self.grid[1]
        return list(range(self.prefix_tokens)) + list(range(used, self.shape[0]))

    def metadata(self) -> dict:
        """The fields stored in ``ModelMetadata`` (see there)."""
        return {"activation_layout": self.layout, "explained_shape": tuple(int(d) for d in self.shape),
                "dropped_tokens": self.dropped_tokens,
                "token_grid": tuple(self.grid) if self.layout == "tokens" else None}

    def describe(self) -> str:
        shape = "x".join(map(str, self.shape))
        if self.layout == "tokens":
            return (f"tokens {shape} → {'x'.join(map(str, self.nchw_shape))} "
                    f"(dropped tokens {self.dropped_tokens}, grid {self.grid[0]}x{self.grid[1]})")
        return f"{self.layout} {shape}"


def _strides_agree(h: int, w: int, input_hw: Sequence[int]) -> bool:
    """A feature grid h × w of an H × W input: both axes subsampled by about the same stride."""
    H, W = input_hw
    if not (1 <= h <= H and 1 <= w <= W) or h * w < 2:
        return False
    sh, sw = H / h, W / w
    return abs(sh - sw) <= 0.25 * min(sh, sw)


def _patch_grid(h: int, w: int, input_hw: Sequence[int]) -> bool:
    """(h, w) is what one integer patch size p makes of the input (floor or ceil of H/p, W/p)."""
    H, W = input_hw
    return any(h in (H // p, -(-H // p)) and w in (W // p, -(-W // p)) for p in range(1, max(H, W) + 1))


def _token_grid(n: int, input_hw: Sequence[int]) -> Optional[tuple]:
    """An (h, w) patch grid of ``n`` tokens for the input, closest to its aspect."""
    best = None
    for h in range(1, math.isqrt(n) + 1):
        if n % h:
            continue
        for gh, gw in ((h, n // h), (n // h, h)):
            if _strides_agree(gh, gw, input_hw) and _patch_grid(gh, gw, input_hw):
                score = abs(math.log((input_hw[0] / gh) / (input_hw[1] / gw)))
                if best is None or score < best[0]:
                    best = (score, (gh, gw))
    return None if best is None else best[1]


def classify(shape: Sequence, input_hw: Sequence[int], grids: Iterable[tuple] = ()) -> Optional[ActivationView]:
    """The view of a tensor of ``shape`` (batch axis dropped) as a feature grid, or None.

    3 dims: NCHW when (h, w) subsample the input evenly, else NHWC when (h, w, ·) do. 2 dims
    (tokens × channels): the fewest leading tokens (≤ ``MAX_PREFIX_TOKENS``) whose removal leaves
    a grid — one of ``grids`` (e.g. the patch embedding's) or one matching the input's aspect.
    """
    if any(not isinstance(d, int) or d < 1 for d in shape):
        return None
    shape = tuple(int(d) for d in shape)
    grids = list(grids)
    if len(shape) == 3:
        if _strides_agree(shape[1], shape[2], input_hw):
            return ActivationView("NCHW", shape)
        if _strides_agree(shape[0], shape[1], input_hw):
            return ActivationView("NHWC", shape)
        return None
    if len(shape) == 2:
        length = shape[0]
        prefixes = range(0, min(MAX_PREFIX_TOKENS, length - 2) + 1)
        for grid in grids:  # a grid the model made earlier (its patch embedding) first
            for prefix in prefixes:
                if grid[0] * grid[1] == length - prefix:
                    return ActivationView("tokens", shape, prefix, tuple(grid))
        for prefix in prefixes:
            grid = _token_grid(length - prefix, input_hw)
            if grid is not None:
                return ActivationView("tokens", shape, prefix, grid)
    return None


def has_positions(shape: Sequence) -> bool:
    """A tensor (batch axis dropped) with 2+ dims and more than one position: a feature grid or tokens
    that explainrt would need to read (used to refuse a guess when such a tensor is not understood)."""
    if len(shape) not in (2, 3) or any(not isinstance(d, int) for d in shape):
        return False
    return math.prod(shape[:-1]) > 1 and (len(shape) == 2 or shape[1] * shape[2] > 1)


def user_view(shape: Sequence, input_hw: Sequence[int], grid: Optional[Sequence[int]],
              prefix_tokens: Optional[int], what: str) -> ActivationView:
    """The view of a tensor the user named (shape without batch), with the grid / prefix they gave.

    A named 4-D tensor is NCHW unless only NHWC reads as a grid; a token tensor needs no grid or
    prefix when they can be detected.
    """
    shape = tuple(int(d) for d in shape)
    if prefix_tokens is not None and (isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int)
                                      or prefix_tokens < 0):
        raise InvalidInputError(f"prefix_tokens must be an integer >= 0, got {prefix_tokens!r}")
    if grid is not None:
        try:
            grid = tuple(int(v) for v in grid)
        except (TypeError, ValueError):
            raise InvalidInputError(f"grid must be two integers (h, w), got {grid!r}") from None
        if len(grid) != 2 or min(grid) < 1:
            raise InvalidInputError(f"grid must be two positive integers (h, w), got {grid!r}")
    described = f"{what} has shape (N, {', '.join(map(str, shape))})"
    if len(shape) == 3 and grid is None and prefix_tokens is None:
        return classify(shape, input_hw) or ActivationView("NCHW", shape)
    if len(shape) != 2:
        raise InvalidInputError(f"{described}; explainrt explains a 4-D (N, C, h, w) / (N, h, w, C) tensor or "
                                "patch tokens (N, tokens, C)" + (" (grid/prefix_tokens apply to tokens only)"
                                                                 if grid or prefix_tokens is not None else ""))
    length = shape[0]
    if grid is None:
        prefixes = range(0, min(MAX_PREFIX_TOKENS, length - 2) + 1) if prefix_tokens is None else [prefix_tokens]
        for prefix in prefixes:
            found = _token_grid(length - prefix, input_hw) if length - prefix >= 2 else None
            if found is not None:
                return ActivationView("tokens", shape, prefix, found)
        raise InvalidInputError(f"{described}: no patch grid found for a {input_hw[0]}x{input_hw[1]} input"
                                + (f" after {prefix_tokens} dropped tokens" if prefix_tokens is not None else "")
                                + "; give grid=(h, w) and prefix_tokens")
    prefix = length - grid[0] * grid[1] if prefix_tokens is None else prefix_tokens
    if prefix < 0 or prefix + grid[0] * grid[1] > length:
        raise InvalidInputError(f"{described}: {length} tokens do not hold a {grid[0]}x{grid[1]} grid after "
                                f"{prefix} dropped tokens")
    return ActivationView("tokens", shape, prefix, grid)
