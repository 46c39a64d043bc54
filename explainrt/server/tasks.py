"""ExplainRequest → validated ``ExplainTask`` (cheap, on the RPC thread) → ExplainResponse (on a worker).

Validation that costs little happens before a request takes a queue slot: model, method,
parameters, tensor dtype/shape/byte count, output options, and the size of the response the
options imply (refused at once when over the send limit). Decoding the image and everything
after it run on a worker, where a corrupt image or a NaN still becomes InvalidInputError.
``estimate_cost``/``estimate_memory`` give the scheduler each request's forward passes and
memory before it runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from typing import Callable, Optional, Union

import numpy as np

from ..api import Explanation, check_gradients
from ..cli import parse_params
from ..errors import ExplainRTError, InvalidInputError
from ..explainers import METHODS, check_applicable
from ..explainers.base import Method
from ..explainers.featurecam import BUILTIN_EDGES
from ..export.metadata import ModelMetadata
from ..imaging import as_rgb_uint8, check_preprocessed, overlay_png, peek_image_size, png_size_bound, resize_map
from ..proto.explainrt.v1 import explainrt_pb2 as pb
from ..proto.codec import DTYPE_NAMES, DTYPES, dtype_name, fill_tensor, tensor_to_array
from .models import LoadedModel, ModelRepository

DEFAULT_TOP_K = 5
MIB = 2**20
MAP_SIZES = {pb.MAP_SIZE_MODEL_INPUT: "MAP_SIZE_MODEL_INPUT", pb.MAP_SIZE_ORIGINAL: "MAP_SIZE_ORIGINAL"}


class ResponseTooLarge(ExplainRTError):
    """The response would exceed the server's message size limit (→ RESOURCE_EXHAUSTED)."""


@dataclasses.dataclass
class ExplainTask:
    """A validated explanation request, ready for a worker.

    ``cost_passes`` (forward passes, an upper bound) and ``memory_bytes`` (what the request holds
    while it runs, an upper-bound estimate) come from ``estimate_cost``/``estimate_memory``.
    """

    request_id: str
    model: LoadedModel
    image: Union[bytes, np.ndarray]
    method: str
    targets: Optional[list[int]]
    params: dict
    saliency_dtype: int = pb.FLOAT32
    original_size: bool = False
    overlay: bool = False
    top_k: int = DEFAULT_TOP_K
    cost_passes: int = 1
    memory_bytes: int = 0
    response_bytes: int = 0  # upper bound of the response message (``response_size(...).total``)


@dataclasses.dataclass
class RequestLimits:
    """Per-request bounds, so that one request cannot take the whole server's memory or time.

    ``max_response_bytes``: the largest response the server sends (its gRPC send limit); a request
    whose options imply more is refused before any work (None: unchecked up front).
    """

    max_masks: int = 20000  # RISE n_masks (the papers use 4000-8000)
    max_targets: int = 16  # classes explained in one request
    max_pixels: int = 64_000_000  # decoded image size (a 4K image is 8.3 M)
    max_response_bytes: Optional[int] = 256 * MIB  # ServerConfig.max_send_mib's default

    def check(self, method, targets, image) -> Optional[tuple[int, int]]:
        """Check masks, targets and image size; returns the image's (H, W) when known (None for a float tensor).

        ``method``: the validated method object (a Feature CAM's RISE base counts too).
        """
        n_masks = max(getattr(m, "n_masks", 0) for m in (method, getattr(method, "base", None)))
        if n_masks > self.max_masks:
            raise InvalidInputError(f"n_masks={n_masks} is over this server's limit of {self.max_masks}")
        iterations = getattr(method, "iterations", 0)  # FGVis: a forward and a backward per iteration
        if iterations > self.max_masks:
            raise InvalidInputError(f"iterations={iterations} is over this server's limit of {self.max_masks} "
                                    "(--max-masks bounds FGVis's iterations too)")
        if len(targets) > self.max_targets:
            raise InvalidInputError(f"{len(targets)} targets requested; this server explains at most "
                                    f"{self.max_targets} classes per request")
        if isinstance(image, np.ndarray):
            size = image.shape[:2] if image.dtype == np.uint8 else None
        else:
            size = peek_image_size(image)
            if size is None:  # other formats (TIFF, WebP, ...) would have to be decoded to learn their size
                raise InvalidInputError("could not decode the image bytes as PNG or JPEG (the server takes only these, "
                                        "as it checks an image's size before decoding it); convert the image, or "
                                        "send a uint8 H×W×3 tensor")
        if size is not None and size[0] * size[1] > self.max_pixels:
            raise InvalidInputError(f"the image is {size[1]}x{size[0]} pixels, over this server's limit of "
                                    f"{self.max_pixels / 1e6:.0f} megapixels")
        return None if size is None else (int(size[0]), int(size[1]))

    def check_response(self, size: "ResponseSize") -> None:
        """Refuse (ResponseTooLarge → RESOURCE_EXHAUSTED) a response bound over ``max_response_bytes``."""
        if self.max_response_bytes is not None and size.total > self.max_response_bytes:
            raise ResponseTooLarge(
                f"the response would be up to {size.describe()}; the server sends at most "
                f"{format_bytes(self.max_response_bytes)}: ask for FLOAT16, MAP_SIZE_MODEL_INPUT, fewer targets "
                "or no overlay (or use a server started with a larger --max-message-mib)")


def format_bytes(n: int) -> str:
    """``n`` bytes for people: '3.8 GiB', '183 MiB', '12 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} B"


@dataclasses.dataclass
class ResponseSize:
    """Upper bounds (bytes) of the parts of one response, known before any work."""

    n_maps: int
    map_hw: tuple[int, int]
    dtype: int
    maps: int  # the saliency tensors' data
    overlay: int  # PNG bound, 0 without an overlay
    visualization: int  # Feature CAM's uint8 visualisation, else 0
    other: int  # labels, predictions, params, timings, protobuf framing

    @property
    def total(self) -> int:
        return self.maps + self.overlay + self.visualization + self.other

    def describe(self) -> str:
        """E.g. '16 maps of 8000×8000 float32 = 3.8 GiB + overlay ≤ 183 MiB'."""
        h, w = self.map_hw
        text = (f"{self.n_maps} map{'s' if self.n_maps != 1 else ''} of {w}×{h} {DTYPE_NAMES[self.dtype]} = "
                f"{format_bytes(self.maps)}")
        if self.overlay:
            text += f" + overlay ≤ {format_bytes(self.overlay)}"
        if self.visualization:
            text += f" + visualisation {format_bytes(self.visualization)}"
        return text


def response_size(meta: ModelMetadata, n_targets: int, dtype: int, map_hw: tuple[int, int],
                  overlay_hw: Optional[tuple[int, int]], visualization: bool, top_k: int) -> ResponseSize:
    """Bound the response of a request: ``n_targets`` maps of ``map_hw`` in ``dtype``, the overlay PNG of
    an ``overlay_hw`` image (None: no overlay; bound from ``png_size_bound``), Feature CAM's
    visualisation (model input × 3 uint8) and a margin for everything else."""
    h, w = map_hw
    label = max((len(meta.label(i).encode()) for i in range(meta.num_classes)), default=0) \
        if meta.num_classes <= 100_000 else 256
    return ResponseSize(
        n_maps=n_targets, map_hw=(int(h), int(w)), dtype=dtype,
        maps=n_targets * h * w * DTYPES[dtype].itemsize,
        overlay=png_size_bound(*overlay_hw) if overlay_hw else 0,
        visualization=3 * meta.input_size[0] * meta.input_size[1] if visualization else 0,
        other=64 * 1024 + (n_targets + top_k) * (label + 64),
    )


def _passes(method: Method, meta: ModelMetadata, n_targets: int = 1) -> int:
    """Masked forward passes of ``method`` (the base pass not included), an upper bound; a backward
    counts as two passes, and the gradient methods run one row per target."""
    name = method.name
    t = max(1, int(n_targets))
    if name == "featurecam":
        return _passes(method.base, meta, t)  # built-in edges run no engine passes
    if name == "fgvis":
        return 3 * method.iterations * t + 2  # a forward and a backward per iteration and target; bounds, final
    if method.needs_gradients:  # gradient CAMs: one forward and backward per target (nothing more: a CAM head)
        return 3 * t if method.gradients_needed(meta) else 0
    channels = (meta.activation_shape or (0,))[0]  # a black-box model has none (RISE needs none)
    if name == "fem":
        return 0
    if name == "sidu":
        return channels  # distinct masks only after dedupe: at most C
    if name == "scorecam":
        return channels + (1 if method.baseline else 0)  # constant channels skipped; the zero input
    if name == "rise":
        return method.n_masks
    raise InvalidInputError(f"no cost model for method {name!r}")


def estimate_cost(method: Method, meta: ModelMetadata, n_targets: int = 1) -> int:
    """Forward passes ``method`` makes on a model with ``meta``, the base pass included (an upper bound).

    FEM 1; SIDU 1 + C; Score-CAM 1 + C (+1 with baseline=True); RISE 1 + n_masks; Feature CAM
    its base method's (sobel/canny edges need no engine); FGVis 3 + 3·iterations·T, autograd
    Grad-CAMs 1 + 3·T (a backward counted as two passes; T targets). C is the activation's channel count;
    SIDU dedupes masks and Score-CAM skips constant channels, so they may run fewer.
    """
    return 1 + _passes(method, meta, n_targets)


def estimate_memory(method: Method, meta: ModelMetadata, batch_size: int, n_targets: int,
                    image_hw: Optional[tuple[int, int]], input_bytes: int, response: ResponseSize) -> int:
    """An upper-bound estimate (bytes) of the memory one request holds at its peak while it runs.

    Counted: the request's image bytes (``input_bytes``, encoded or tensor) and the decoded image
    (H×W×3 uint8, kept for the response); the model-size input and its preprocessing; the engine
    input buffer (min(batch_size, passes) × 3 × h × w float32) with the masking work of one chunk
    and the engine's outputs; the masks (SIDU/Score-CAM: C × h_a × w_a float32, a few copies and
    SIDU's C × C distances; RISE: its grids and offsets as drawn, float64 first); the score table
    (passes × classes, probabilities and logits); the per-target maps at model size (a few float32
    copies); Feature CAM's float images; the response (twice: the message and its serialised copy)
    plus one map at a time at response size (``response.map_hw``); and, when ``response`` has an
    overlay, its work (a float32 map, then uint8 images). Not counted: the engine's own working memory (ONNX Runtime's arena, held per session).
    """
    c, ha, wa = meta.activation_shape or (0, 0, 0)
    h, w = meta.input_size
    k = meta.num_classes
    t = max(1, n_targets)
    f32, f64 = 4, 8
    masked = _passes(method, meta, t)
    chunk = max(1, min(batch_size, masked)) if masked else 0
    img = 3 * h * w  # model-size pixels × channels

    total = input_bytes
    if image_hw is not None:
        total += 3 * image_hw[0] * image_hw[1]  # the decoded RGB (decoded in place, kept for the overlay)
    total += img * (1 + 3 * f32) + img * f32  # resized uint8, normalised float32 copies; the engine input x
    total += c * ha * wa * f32 + 2 * k * f32  # base pass: activations, probabilities, logits
    total += h * w * 3 * 2  # denormalised RGB for descriptors (and its float intermediate, in uint8 units)
    if chunk:
        total += chunk * img * f32  # the engine input buffer
        total += 2 * chunk * h * w * f32  # one chunk's upsampled masks (and the resampling intermediate)
        total += 2 * chunk * k * f32  # one chunk's outputs
        total += (masked + 1) * (2 * k * f32 + 3 * t * f64)  # score table (probs + logits); (N, T) scores
    total += _method_memory(method, meta, t, masked)
    total += 6 * t * h * w * f32  # raw, normalised and output maps at model size
    total += 2 * response.total  # the message and gRPC's serialised copy
    map_h, map_w = response.map_hw
    total += map_h * map_w * (f32 + 3 * DTYPES[response.dtype].itemsize)  # one map: resized, converted, bytes
    if response.overlay and image_hw is not None:
        pixels = image_hw[0] * image_hw[1]
        total += pixels * (f32 + 1 + 3 + 3) + response.overlay  # float map, uint8 map, heat + image, PNG buffer
    return int(total)


def _method_memory(method: Method, meta: ModelMetadata, t: int, masked: int) -> int:
    """The masks and weighting work of ``method`` (bytes), beyond what every method needs."""
    c, ha, wa = meta.activation_shape or (0, 0, 0)
    h, w = meta.input_size
    f32, f64 = 4, 8
    acts = c * ha * wa
    name = method.name
    if name == "fem":
        return acts * (f64 + 2 * f32 + 1)  # float64 activations, binary masks, comparisons
    if name == "sidu":
        # threshold masks, the deduped copy, packed/bool host copies; C×C distances (3 float64 arrays)
        return acts * (3 * f32 + 2) + 3 * c * c * f64 + 4 * c * t * f64
    if name == "scorecam":
        # float32 activations, kept masks, float64 masks for the weighted sum; min/max chunk work
        return acts * (2 * f32 + f64) + 2 * 64 * h * w * f32 + t * acts // c * f64 + 3 * h * w * f32
    if name == "rise":
        s = method.grid_size
        n = method.n_masks
        # grids drawn as float64 then bool then float32; offsets int64 then int32; weighted sum accumulator
        # (T, h·w) float64 and one 64-mask chunk of upsampled crops (and its intermediate)
        return n * s * s * (f64 + 1 + f32) + n * 2 * (f64 + 4) + t * h * w * f64 + 2 * 64 * h * w * f32
    if name == "featurecam":
        # the base's work; edges (a few h×w float32), F_in and blends (h×w×3 float32 ×4), per-target
        # visuals (float32 and the uint8 stack) and maps
        return (_method_memory(method.base, meta, t, masked) + 8 * h * w * f32 + 4 * 3 * h * w * f32
                + t * 3 * h * w * (2 * f32 + 1) + 2 * t * h * w * f32)
    if name == "fgvis":
        # per target row: the mask, Adam's two moments, the explanation and its gradient, the
        # explanation image; the graph's saved tensors for backward (rough: 64 image-sized maps)
        return t * 3 * h * w * (8 * f32 + 1) + t * 64 * h * w * f32
    return 0


def parse_request(request: pb.ExplainRequest, models: ModelRepository,
                  limits: Optional[RequestLimits] = None) -> ExplainTask:
    """Validate ``request`` against the server's models; raises InvalidInputError / ModelNotFound, or
    ResponseTooLarge when the response its options imply is over ``limits.max_response_bytes``."""
    limits = limits or RequestLimits()
    model = models.get(request.model)
    meta = model.metadata
    method = request.method
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    params = parse_params(f"{key}={value}" for key, value in request.params.items())
    if method == "featurecam" and params.get("edges", "sobel") not in BUILTIN_EDGES:
        raise InvalidInputError(
            f"parameter edges={params['edges']!r} is not offered by the server: use one of "
            f"{', '.join(BUILTIN_EDGES)} (the server does not load edge models named by clients)")
    try:
        method_obj = METHODS[method].create(**params)  # bad parameters fail here, before queueing
    except (TypeError, ValueError) as exc:  # e.g. a JSON list where a mapping belongs
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(f"invalid parameters for method '{method}': {exc}; see GetModelMetadata") from None
    check_applicable(method, method_obj, meta)  # a black-box model: before the cost model, which reads C
    if method_obj.gradients_needed(meta):
        check_gradients(model.explainer.engine, method)
    for part in (method_obj, getattr(method_obj, "base", None)):  # RISE, also as Feature CAM's base
        if hasattr(part, "check_input"):
            part.check_input(meta.input_size)  # before the memory estimate, which grows with the grid

    kind = request.WhichOneof("image")
    if kind is None:
        raise InvalidInputError("the request has no image: set `encoded` (PNG/JPEG bytes) or `tensor`")
    preprocessed = False
    if kind == "encoded":
        if not request.encoded:
            raise InvalidInputError("the encoded image is empty (0 bytes)")
        image: Union[bytes, np.ndarray] = request.encoded
        input_bytes = len(request.encoded)
    else:
        image = tensor_to_array(request.tensor, "image tensor", allowed=(pb.UINT8, pb.FLOAT32))
        input_bytes = image.nbytes
        if image.dtype == np.float32:
            preprocessed = True
            check_preprocessed(image, meta, "image tensor")  # shape and NaN/Inf, before queueing
        else:
            as_rgb_uint8(image, "image tensor")

    out = request.output
    if out.saliency_dtype not in (pb.DATA_TYPE_UNSPECIFIED, pb.FLOAT32, pb.FLOAT16):
        raise InvalidInputError(
            f"output.saliency_dtype must be FLOAT32 or FLOAT16, got {dtype_name(out.saliency_dtype)}")
    if out.map_size not in MAP_SIZES:
        raise InvalidInputError(f"output.map_size must be {' or '.join(MAP_SIZES.values())}, got {out.map_size}")
    original = out.map_size == pb.MAP_SIZE_ORIGINAL
    if preprocessed and (original or out.overlay_png):
        raise InvalidInputError(
            "a preprocessed float32 tensor has no original image: ask for MAP_SIZE_MODEL_INPUT without an "
            "overlay, or send the image itself (encoded bytes or a uint8 H×W×3 tensor)")
    image_hw = limits.check(method_obj, list(request.targets), image)
    top_k = out.top_k if out.HasField("top_k") else DEFAULT_TOP_K
    if top_k < 0:
        raise InvalidInputError(f"output.top_k must be >= 0, got {top_k}")
    top_k = min(top_k, meta.num_classes)
    dtype = out.saliency_dtype or pb.FLOAT32
    n_targets = len(request.targets) or 1  # none: the top-1 class
    size = response_size(meta, n_targets, dtype, image_hw if original else tuple(meta.input_size),
                         image_hw if out.overlay_png else None, method in ("featurecam", "fgvis"), top_k)
    limits.check_response(size)  # before any work: nothing is decoded or allocated for a refused request
    return ExplainTask(
        request_id=request.request_id, model=model, image=image, method=method,
        targets=list(request.targets) or None, params=params,
        saliency_dtype=dtype, original_size=original, overlay=out.overlay_png, top_k=top_k,
        cost_passes=estimate_cost(method_obj, meta, n_targets),
        memory_bytes=estimate_memory(method_obj, meta, model.explainer.batch_size, n_targets, image_hw,
                                     input_bytes, size),
        response_bytes=size.total,
    )


def run_task(task: ExplainTask, progress: Optional[Callable[[int, int], None]] = None,
             cancel: Optional[threading.Event] = None) -> pb.ExplainResponse:
    """Explain on the calling (worker) thread and build the response; timings.queue_s/total_s are left to the caller.

    The caller checks the serialised size (``check_built_size``): serialising once, not once to
    measure and again to send, matters for responses of hundreds of MiB.
    """
    lock = task.model.lock or contextlib.nullcontext()
    with lock:
        result = task.model.explainer.explain(task.image, task.method, target=task.targets, progress=progress,
                                              cancel=cancel, **task.params)
    t0 = time.perf_counter()
    response = build_response(task, result)
    response.timings.postprocess_s = time.perf_counter() - t0
    return response


def check_built_size(size: int, max_response_bytes: Optional[int]) -> None:
    """The safety net behind ``parse_request``'s bound: refuse a serialised response over the limit."""
    if max_response_bytes is not None and size > max_response_bytes:
        raise ResponseTooLarge(
            f"the response would be {size / 2**20:.1f} MiB, over the server's limit of "
            f"{max_response_bytes / 2**20:.0f} MiB: ask for FLOAT16 maps, MAP_SIZE_MODEL_INPUT, fewer targets or "
            "no overlay, or raise the server's --max-message-mib")


def build_response(task: ExplainTask, result: Explanation) -> pb.ExplainResponse:
    """Saliency maps (one per target), top-k predictions, overlay and timings of ``result``.

    Frugal at original size: each map is resized to float32 once, converted and copied into the
    message, and dropped before the next; the overlay is made in uint8 (``imaging.overlay_png``).
    """
    response = pb.ExplainResponse(request_id=task.request_id, model=task.model.name, method=result.method,
                                  forward_passes=int(result.forward_passes))
    size = result.image.shape[:2] if (task.original_size and result.image is not None) else None
    for target, label, saliency in zip(result.targets, result.labels, result.saliency_maps):
        entry = response.maps.add(target=target, label=label, probability=float(result.probs[target]))
        fill_tensor(entry.saliency, resize_map(saliency, size) if size is not None else saliency,
                    task.saliency_dtype)
    for index, prob in result.top_k(task.top_k) if task.top_k else []:
        response.predictions.add(class_index=index, label=task.model.metadata.label(index), probability=prob)
    for key, value in result.params.items():
        response.params[key] = json.dumps(value, default=str)
    if result.image is not None:
        response.original_size.extend(int(d) for d in result.image.shape[:2])
    if task.overlay:
        if result.image is None:
            raise InvalidInputError("no original image to overlay on (the input was a preprocessed array)")
        response.overlay_png = overlay_png(result.image, result.saliency)
    if result.visualization is not None:
        fill_tensor(response.visualization, result.visualization, pb.UINT8)
    timings = result.timings
    response.timings.preprocess_s = timings["preprocess_s"]
    response.timings.base_pass_s = timings["base_pass_s"]
    response.timings.explain_s = timings["explain_s"]
    return response


def describe(task: ExplainTask) -> dict:
    """Fields for the request's log line."""
    return {"model": task.model.name, "method": task.method, "request_id": task.request_id or None,
            "dtype": DTYPE_NAMES[task.saliency_dtype]}
