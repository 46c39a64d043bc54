"""What every metric needs: an engine from a model argument, the prepared input, chunked passes."""
from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from ..errors import InvalidInputError
from ..imaging import ImageLike, prepare_image, resize_map
from ..runtime import Engine

ModelLike = Union[str, Engine, Any]  # a path to an exported .onnx, an Engine, or an Explainer


def engine_of(model: ModelLike) -> Engine:
    """The engine behind ``model``: an ``Engine``, an ``Explainer`` (its engine) or a path (opened on CPU)."""
    if isinstance(model, Engine):
        return model
    engine = getattr(model, "engine", None)
    if isinstance(engine, Engine):
        return engine
    if isinstance(model, str):
        from ..runtime import load_engine

        return load_engine(model)
    raise InvalidInputError(
        f"model must be an Engine, an Explainer or a path to an exported .onnx file, got {type(model).__name__}"
    )


def batch_size_of(model: ModelLike, engine: Engine, batch_size: Optional[int]) -> int:
    """``batch_size`` if given, else the Explainer's, else the engine's ``max_batch`` (capped by it)."""
    if batch_size is None:
        batch_size = getattr(model, "batch_size", None) or engine.max_batch
    if int(batch_size) < 1:
        raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
    return max(1, min(int(batch_size), engine.max_batch))


def engine_input(engine: Engine, image: ImageLike):
    """The normalised (1, C, H, W) input of ``image`` on the engine's device."""
    return engine.xp.asarray(prepare_image(image, engine.metadata).x)


def check_map(saliency, input_hw: tuple[int, int], name: str = "saliency") -> np.ndarray:
    """A finite 2-D float map at the model's input size (bilinearly resized when it is not)."""
    arr = np.asarray(saliency)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D map (H, W), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{name} must hold finite numbers")
    return resize_map(arr.astype(np.float32), tuple(input_hw))


def format_rows(header: list, rows: list) -> str:
    """A plain-text table: columns padded to their widest cell, a dashed line under the header."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
