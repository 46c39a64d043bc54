"""Model metadata stored inside the exported ONNX file (``metadata_props``).

Everything a later stage needs to interpret the model (input size and layout, mean/std,
labels, which outputs are logits, probabilities and activations) travels with the file, so
no step after export needs flags.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Optional, Sequence

from ..errors import InvalidInputError, ModelError
from .cam_head import check as check_cam_head
from .layout import LAYOUTS

METADATA_KEY = "explainrt"
FORMAT_VERSION = 1


def check_input_size(size) -> tuple[int, int]:
    """Validate a model input size (H, W): two positive integers."""
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidInputError(f"input size must be two integers (H, W), got {size!r}") from None
    if h < 1 or w < 1:
        raise InvalidInputError(f"input size must be positive, got {h}x{w}")
    return h, w


def check_normalisation(mean, std, channels: int = 3) -> tuple[tuple, tuple]:
    """Validate per-channel mean/std (finite, std > 0) and return them as float tuples."""
    out = []
    for key, values in (("mean", mean), ("std", std)):
        values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
        if len(values) != channels or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
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

    ``activation_output`` is always NCHW (C, h, w) = ``activation_shape``; when the explained
    tensor was not (``activation_layout`` 'NHWC', or 'tokens' of a vision transformer), export
    built the view inside the graph and records the tensor's own shape (``explained_shape``),
    the ``dropped_tokens`` (class, register tokens) and the ``token_grid`` (h, w). A black-box
    model has no activation (``activation_output`` and ``activation_shape`` None): only the
    score-based methods (RISE) and the metrics apply.
    """

    input_name: str
    input_size: tuple[int, int]  # (H, W)
    logits_output: Optional[str]
    probs_output: str
    activation_output: Optional[str]  # None: a black-box model (no activation)
    activation_shape: Optional[tuple[int, int, int]]  # (C, h, w)
    num_classes: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (255.0, 255.0, 255.0)
    layout: str = "NCHW"
    channels: int = 3
    labels: Optional[list[str]] = None
    activation_layer: Optional[str] = None
    activation_layout: Optional[str] = "NCHW"  # of the explained tensor: NCHW, NHWC or tokens
    explained_shape: Optional[tuple] = None  # the explained tensor's shape without the batch axis
    dropped_tokens: list = dataclasses.field(default_factory=list)
    token_grid: Optional[tuple[int, int]] = None
    name: Optional[str] = None
    source: Optional[str] = None
    #: the batch every engine call must have (the graph hard-codes it); None: any batch up to max_batch
    fixed_batch: Optional[int] = None
    #: what export did to a fixed batch axis (``export.batch_rewrite``): status, rewrites or reason
    batch_rewrite: Optional[dict] = None
    cam_head: Optional[dict] = None  # GAP + one linear layer after the activation (export/cam_head.py)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.mean, self.std = check_normalisation(self.mean, self.std, self.channels)

    def validate(self) -> "ModelMetadata":
        """Check every field's type and range (metadata read from a file may be anything); returns self."""
        def positive_ints(key, value, n):
            if not (isinstance(value, (tuple, list)) and len(value) == n
                    and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
                raise ModelError(f"metadata '{key}' must be {n} positive integers, got {value!r}; re-export the model")
            return tuple(value)

        for key in ("input_name", "probs_output"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ModelError(f"metadata '{key}' must name a tensor, got {getattr(self, key)!r}; re-export the model")
        for key in ("logits_output", "activation_output"):
            if getattr(self, key) is not None and (not isinstance(getattr(self, key), str) or not getattr(self, key)):
                raise ModelError(f"metadata '{key}' must name a tensor or be null, got {getattr(self, key)!r}")
        self.input_size = positive_ints("input_size", self.input_size, 2)
        if self.activation_output is None:
            if self.activation_shape is not None or self.activation_layout is not None:
                raise ModelError("metadata without an activation output must have activation_shape and "
                                 "activation_layout null; re-export the model")
        else:
            self.activation_shape = positive_ints("activation_shape", self.activation_shape, 3)
            if self.activation_layout not in LAYOUTS:
                raise ModelError(f"metadata 'activation_layout' must be one of {LAYOUTS}, got "
                                 f"{self.activation_layout!r}; re-export the model")
        if self.explained_shape is not None:
            self.explained_shape = positive_ints("explained_shape", self.explained_shape, len(self.explained_shape))
        if not (isinstance(self.dropped_tokens, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                                              and v >= 0 for v in self.dropped_tokens)):
            raise ModelError(f"metadata 'dropped_tokens' must be a list of token indices, got {self.dropped_tokens!r}")
        if self.token_grid is not None:
            self.token_grid = positive_ints("token_grid", self.token_grid, 2)
        (self.num_classes,) = positive_ints("num_classes", (self.num_classes,), 1)
        self.cam_head = check_cam_head(self.cam_head)
        if self.layout != "NCHW" or self.channels != 3:
            raise ModelError(f"explainrt explains RGB NCHW models; the metadata says layout={self.layout!r}, "
                             f"channels={self.channels!r}")
        if self.fixed_batch is not None:
            (self.fixed_batch,) = positive_ints("fixed_batch", (self.fixed_batch,), 1)
        if self.batch_rewrite is not None and not isinstance(self.batch_rewrite, dict):
            raise ModelError(f"metadata 'batch_rewrite' must be an object or null, got {self.batch_rewrite!r}")
        if self.labels is not None and not (isinstance(self.labels, list)
                                            and all(isinstance(v, str) for v in self.labels)):
            raise ModelError("metadata 'labels' must be a list of strings or null; re-export the model")
        return self

    @property
    def has_activation(self) -> bool:
        """False for a black-box model (exported without an activation output)."""
        return self.activation_output is not None

    def engine_outputs(self) -> list[tuple[str, str]]:
        """(role, tensor name) of the outputs an engine must have: probabilities, and the activation if any."""
        return [("probabilities", self.probs_output)] + \
            ([("activation", self.activation_output)] if self.has_activation else [])

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
        if not isinstance(raw, dict):
            raise ModelError(f"the model's explainrt metadata must be a JSON object, got {type(raw).__name__}; "
                             "re-export it")
        known = {f.name for f in dataclasses.fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        for key in ("input_size", "activation_shape", "mean", "std", "explained_shape", "token_grid"):
            if isinstance(raw.get(key), list):
                raw[key] = tuple(raw[key])
        try:
            return cls(**raw).validate()
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
