"""Feature CAM (seed 001), forward-only: an edge descriptor blended into a saliency map.

The paper blends HED edges F with a Grad-CAM map M. Here M is any forward-only map (default
Score-CAM, the paper's own future work) and F is a built-in classical edge descriptor or a
user-supplied HED ONNX model. Inputs: 'edges' (F alone), 'blend21' (image:F 2:1), 'blend11'
(1:1). Combinations: 'add' (Experiment 1, k·F_in + M) and 'complement' (Experiment 3,
(1 − F_in) ⊙ M). The paper's top five: add with all three inputs, complement with blend11
and edges. The RGB visualisation applies the same combination to M drawn as the paper's figures
draw it: the JET heatmap blended half and half over the photograph.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import cv2
import numpy as np

from ..errors import InvalidInputError
from ..imaging import colormap
from ..kernels import to_host
from .base import Context, Method, check_choice, check_range, minmax
from .registry import METHODS, register

FEATURE_INPUTS = ("edges", "blend21", "blend11")
COMBINATIONS = ("add", "complement")
BUILTIN_EDGES = ("sobel", "canny")
# HED's Caffe preprocessing: BGR minus the BSDS mean.
_HED_MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434], np.float32)


def sobel_edges(rgb: np.ndarray) -> np.ndarray:
    """Soft edges in [0,1]: gradient magnitude of the blurred grey image, robustly scaled."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    grey = cv2.GaussianBlur(grey, (0, 0), 1.0)
    mag = cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3))
    top = float(np.percentile(mag, 99.0))
    return np.clip(mag / top, 0.0, 1.0) if top > 0 else np.zeros_like(mag)


def canny_edges(rgb: np.ndarray) -> np.ndarray:
    """Binary Canny edges (thresholds from the median intensity), lightly softened."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    med = float(np.median(grey))
    edges = cv2.Canny(grey, int(max(0, 0.66 * med)), int(min(255, 1.33 * med) or 1)).astype(np.float32) / 255.0
    return np.clip(cv2.GaussianBlur(edges, (3, 3), 0) * 1.5, 0.0, 1.0)


@functools.lru_cache(maxsize=4)
def _hed_session(path: str):
    """An ONNX Runtime session of the edge model, its I/O checked: (1, 3, H, W) in, an edge map out."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InvalidInputError(f"could not load the HED edge model {path}: {exc}") from exc
    inputs, out = sess.get_inputs(), sess.get_outputs()[-1]
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] not in (3, None) and \
            not isinstance(inputs[0].shape[1], str):
        raise InvalidInputError(f"{path} is not an edge model: it takes {[(i.name, i.shape) for i in inputs]}, "
                                "an HED model takes one (1, 3, H, W) BGR image")
    if len(out.shape) not in (3, 4) or (len(out.shape) == 4 and out.shape[1] not in (1, None)
                                        and not isinstance(out.shape[1], str)):
        raise InvalidInputError(f"{path} is not an edge model: its last output '{out.name}' has shape {out.shape}, "
                                "an HED model outputs a (1, 1, H, W) edge map")
    return sess


def hed_edges(rgb: np.ndarray, model_path: str) -> np.ndarray:
    """Edges from a Holistically-Nested Edge Detection ONNX model (BGR − mean in, the last output's map)."""
    sess = _hed_session(model_path)
    bgr = rgb[:, :, ::-1].astype(np.float32) - _HED_MEAN_BGR
    x = np.ascontiguousarray(bgr.transpose(2, 0, 1)[None])
    try:
        out = sess.run(None, {sess.get_inputs()[0].name: x})[-1]
    except Exception as exc:  # e.g. a fixed input size other than the image's
        raise InvalidInputError(f"the HED edge model {model_path} failed on a {rgb.shape[1]}x{rgb.shape[0]} image: "
                                f"{exc}") from None
    edge = np.asarray(out, np.float32).reshape(-1, *out.shape[-2:])[0]
    edge = cv2.resize(edge, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(edge, 0.0, 1.0)


def edge_descriptor(rgb: np.ndarray, edges: str) -> np.ndarray:
    """F in [0,1] (H, W) for ``edges`` = 'sobel', 'canny' or a path to an HED .onnx file."""
    if edges == "sobel":
        return sobel_edges(rgb)
    if edges == "canny":
        return canny_edges(rgb)
    if isinstance(edges, str) and edges.endswith(".onnx"):
        if not os.path.isfile(edges):
            raise InvalidInputError(f"HED edge model not found: {edges}")
        return hed_edges(rgb, edges)
    raise InvalidInputError(f"parameter edges must be one of {BUILTIN_EDGES} or a path to an HED .onnx model, got {edges!r}")


def feature_input(rgb: np.ndarray, edges_map: np.ndarray, kind: str) -> np.ndarray:
    """F_in as float RGB in [0,1]: edges alone, or image:edges blended 2:1 or 1:1."""
    f = np.repeat(edges_map[:, :, None], 3, axis=2)
    img = rgb.astype(np.float32) / 255.0
    if kind == "edges":
        return f
    if kind == "blend21":
        return (2.0 * img + f) / 3.0
    return (img + f) / 2.0


def combine(f_in: np.ndarray, m: np.ndarray, combination: str, k: float) -> np.ndarray:
    """Experiment 1 (k·F_in + M, clipped) or Experiment 3 ((1 − F_in) ⊙ M) on float arrays."""
    if combination == "add":
        return np.clip(k * f_in + m, 0.0, 1.0)
    return (1.0 - f_in) * m


@register
class FeatureCamExplainer(Method):
    """Feature CAM over a forward-only base map; returns the blended map and an RGB visualisation."""

    name = "featurecam"
    normalised = True  # both combinations already lie in [0, 1]; keep the formula's values

    def __init__(self, *, base: str = "scorecam", edges: str = "sobel", feature_input: str = "blend21",
                 combination: str = "add", k: float = 0.25, base_params: Optional[dict] = None):
        self.base_name = check_choice("base", base, tuple(m for m in METHODS if m != "featurecam"))
        if base_params is not None and not isinstance(base_params, dict):
            raise InvalidInputError(f"parameter base_params must be a mapping of {base}'s parameters, got {base_params!r}")
        self.base = METHODS[base].create(**(base_params or {}))
        self.needs_activation = self.base.needs_activation
        self.needs_gradients = self.base.needs_gradients
        if edges not in BUILTIN_EDGES and not (isinstance(edges, str) and edges.endswith(".onnx")):
            raise InvalidInputError(f"parameter edges must be one of {BUILTIN_EDGES} or a path to an HED .onnx model, got {edges!r}")
        self.edges = edges
        self.feature_input = check_choice("feature_input", feature_input, FEATURE_INPUTS)
        self.combination = check_choice("combination", combination, COMBINATIONS)
        self.k = check_range("k", k, low=0, high=1)

    def gradients_needed(self, meta) -> bool:
        return self.base.gradients_needed(meta)

    def check_model(self, meta) -> None:
        self.base.check_model(meta)

    def explain(self, ctx: Context) -> dict:
        xp = ctx.xp
        base_raw = self.base.explain(ctx)["raw"]
        base_maps = base_raw if self.base.normalised else minmax(base_raw, xp)
        base_maps = to_host(xp, base_maps)
        f_in = feature_input(ctx.rgb, edge_descriptor(ctx.rgb, self.edges), self.feature_input)
        f_grey = f_in.mean(axis=2)
        maps, visuals = [], []
        photo = ctx.rgb.astype(np.float32) / 255.0
        for m in base_maps:
            maps.append(combine(f_grey, m, self.combination, self.k))
            # The paper's M in a figure is the CAM heatmap over the photo (Grad-CAM's usual picture),
            # so the edges add detail to an image one can still recognise; a bare JET map saturates.
            heat_over_photo = 0.5 * photo + 0.5 * colormap(m).astype(np.float32) / 255.0
            visuals.append(combine(f_in, heat_over_photo, self.combination, self.k))
        visual = np.clip(np.rint(np.stack(visuals) * 255.0), 0, 255).astype(np.uint8)
        return {"raw": xp.asarray(np.stack(maps).astype(np.float32)), "visualization": visual,
                "base_saliency": base_maps}
