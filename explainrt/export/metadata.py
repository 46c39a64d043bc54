"""Model metadata stored inside the exported ONNX file (``metadata_props``).

Everything a later stage needs to interpret the model (input size and layout, mean/std,
labels, which outputs are logits, probabilities and activations) travels with the file, so
no step after export needs flags.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional, Sequence

from ..errors import InvalidInputError, ModelError

METADATA_KEY = "explainrt"
FORMAT_VERSION = 1


def check_normalisation(mean, std, channels: int = 3) -> tuple[tuple, tuple]:
    """Validate per-channel mean/std (finite, std > 0) and return them as float tuples."""
    out = []
    for key, values in (("mean", mean), ("std", std)):
        values = tuple(values)
        if len(values) != channels or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ModelError(f"{key} must be {channels} finite numbers (RGB, 0-255 scale), got {values}")
        out.append(tuple(float(v) for v in values))
    if min(out[1]) <= 0:
        raise ModelError(f"std must be positive for every channel, got {out[1]}")
    return out[0], out[1]


@dataclasses.dataclass
class ModelMetadata:
    """What explainrt knows about an exported classifier.

    ``mean``/``std`` are per-channel in pixel units (0–255, RGB order): the engine input is
    ``(rgb - mean) / std`` in NCHW layout.
    """

    input_name: str
    input_size: tuple[int, int]  # (H, W)
    logits_output: Optional[str]
    probs_output: str
    activation_output: str
    activation_shape: tuple[int, int, int]  # (C, h, w)
    num_classes: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (255.0, 255.0, 255.0)
    layout: str = "NCHW"
    channels: int = 3
    labels: Optional[list[str]] = None
    activation_layer: Optional[str] = None
    name: Optional[str] = None
    source: Optional[str] = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.mean, self.std = check_normalisation(self.mean, self.std, self.channels)

    def label(self, index: int) -> str:
        """Human-readable name of class ``index`` (its number when no labels are known)."""
        if self.labels and 0 <= index < len(self.labels):
            return self.labels[index]
        return f"class {index}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ModelMetadata":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"the model's explainrt metadata is not valid JSON ({exc}); re-export it") from exc
        known = {f.name for f in dataclasses.fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        for key in ("input_size", "activation_shape", "mean", "std"):
            if key in raw and raw[key] is not None:
                raw[key] = tuple(raw[key])
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ModelError(f"the model's explainrt metadata is incomplete ({exc}); re-export it") from exc


def load_onnx(path: str, what: str = "ONNX model"):
    """``onnx.load`` with the project's errors: a missing or unreadable file is a ModelError."""
    import os

    import onnx

    if not os.path.isfile(path):
        raise ModelError(f"{what} not found: {path}")
    try:
        return onnx.load(path)
    except Exception as exc:
        raise ModelError(f"{path} is not a readable ONNX model: {exc}") from exc


def write_metadata(model, meta: ModelMetadata) -> None:
    """Store ``meta`` in an ``onnx.ModelProto``'s metadata_props (replacing an older copy)."""
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = meta.to_json()


def read_metadata_props(props: dict, path: str = "the model") -> ModelMetadata:
    """Parse explainrt metadata from a ``{key: value}`` mapping of metadata_props."""
    if METADATA_KEY not in props:
        raise ModelError(
            f"{path} has no explainrt metadata, so explainrt does not know which output holds the "
            "activations. Export it with `explainrt export` (from torch, or `--onnx in.onnx` to "
            "expose an activation tensor of an existing ONNX model)."
        )
    return ModelMetadata.from_json(props[METADATA_KEY])


def load_labels(path: str) -> list[str]:
    """Read class labels, one per line (blank lines at the end ignored)."""
    try:
        with open(path, encoding="utf-8") as fh:
            labels = [line.rstrip("\n") for line in fh]
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"could not read the labels file {path}: {exc}") from exc
    while labels and not labels[-1].strip():
        labels.pop()
    return labels


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names shipped with explainrt."""
    import os

    return load_labels(os.path.join(os.path.dirname(__file__), "imagenet_labels.txt"))


def check_labels(labels: Optional[Sequence[str]], num_classes: int) -> Optional[list[str]]:
    if labels is None:
        return None
    labels = list(labels)
    if len(labels) != num_classes:
        raise ModelError(f"{len(labels)} labels given but the model has {num_classes} classes")
    return labels
