"""ExplainRequest → validated ``ExplainTask`` (cheap, on the RPC thread) → ExplainResponse (on a worker).

Validation that costs little happens before a request takes a queue slot: model, method,
parameters, tensor dtype/shape/byte count, output options. Decoding the image and everything
after it run on a worker, where a corrupt image or a NaN still becomes InvalidInputError.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from typing import Callable, Optional, Union

import numpy as np

from ..api import Explanation
from ..cli import parse_params
from ..errors import ExplainRTError, InvalidInputError
from ..explainers import METHODS
from ..explainers.featurecam import BUILTIN_EDGES
from ..imaging import as_rgb_uint8, check_preprocessed, encode_png, peek_image_size, resize_map
from ..proto.explainrt.v1 import explainrt_pb2 as pb
from ..proto.codec import DTYPE_NAMES, array_to_tensor, dtype_name, tensor_to_array
from .models import LoadedModel, ModelRepository

DEFAULT_TOP_K = 5


class ResponseTooLarge(ExplainRTError):
    """The response would exceed the server's message size limit (→ RESOURCE_EXHAUSTED)."""


@dataclasses.dataclass
class ExplainTask:
    """A validated explanation request, ready for a worker."""

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


@dataclasses.dataclass
class RequestLimits:
    """Per-request bounds, so that one request cannot take the whole server's memory or time."""

    max_masks: int = 20000  # RISE n_masks (the papers use 4000-8000)
    max_targets: int = 16  # classes explained in one request
    max_pixels: int = 64_000_000  # decoded image size (a 4K image is 8.3 M)

    def check(self, method, targets, image) -> None:
        """``method``: the validated method object (a Feature CAM's RISE base counts too)."""
        n_masks = max(getattr(m, "n_masks", 0) for m in (method, getattr(method, "base", None)))
        if n_masks > self.max_masks:
            raise InvalidInputError(f"n_masks={n_masks} is over this server's limit of {self.max_masks}")
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


def parse_request(request: pb.ExplainRequest, models: ModelRepository,
                  limits: Optional[RequestLimits] = None) -> ExplainTask:
    """Validate ``request`` against the server's models; raises InvalidInputError / ModelNotFound."""
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

    kind = request.WhichOneof("image")
    if kind is None:
        raise InvalidInputError("the request has no image: set `encoded` (PNG/JPEG bytes) or `tensor`")
    preprocessed = False
    if kind == "encoded":
        if not request.encoded:
            raise InvalidInputError("the encoded image is empty (0 bytes)")
        image: Union[bytes, np.ndarray] = request.encoded
    else:
        image = tensor_to_array(request.tensor, "image tensor", allowed=(pb.UINT8, pb.FLOAT32))
        if image.dtype == np.float32:
            preprocessed = True
            check_preprocessed(image, meta, "image tensor")  # shape and NaN/Inf, before queueing
        else:
            as_rgb_uint8(image, "image tensor")

    out = request.output
    if out.saliency_dtype not in (pb.DATA_TYPE_UNSPECIFIED, pb.FLOAT32, pb.FLOAT16):
        raise InvalidInputError(
            f"output.saliency_dtype must be FLOAT32 or FLOAT16, got {dtype_name(out.saliency_dtype)}")
    original = out.map_size == pb.MAP_SIZE_ORIGINAL
    if preprocessed and (original or out.overlay_png):
        raise InvalidInputError(
            "a preprocessed float32 tensor has no original image: ask for MAP_SIZE_MODEL_INPUT without an "
            "overlay, or send the image itself (encoded bytes or a uint8 H×W×3 tensor)")
    (limits or RequestLimits()).check(method_obj, list(request.targets), image)
    top_k = out.top_k if out.HasField("top_k") else DEFAULT_TOP_K
    if top_k < 0:
        raise InvalidInputError(f"output.top_k must be >= 0, got {top_k}")
    return ExplainTask(
        request_id=request.request_id, model=model, image=image, method=method,
        targets=list(request.targets) or None, params=params,
        saliency_dtype=out.saliency_dtype or pb.FLOAT32, original_size=original, overlay=out.overlay_png,
        top_k=min(top_k, meta.num_classes),
    )


def run_task(task: ExplainTask, progress: Optional[Callable[[int, int], None]] = None,
             cancel: Optional[threading.Event] = None, max_response_bytes: Optional[int] = None) -> pb.ExplainResponse:
    """Explain on the calling (worker) thread and build the response; timings.queue_s/total_s are left to the caller."""
    lock = task.model.lock or contextlib.nullcontext()
    with lock:
        result = task.model.explainer.explain(task.image, task.method, target=task.targets, progress=progress,
                                              cancel=cancel, **task.params)
    t0 = time.perf_counter()
    response = build_response(task, result)
    response.timings.postprocess_s = time.perf_counter() - t0
    size = response.ByteSize() if max_response_bytes is not None else 0
    if max_response_bytes is not None and size > max_response_bytes:
        raise ResponseTooLarge(
            f"the response would be {size / 2**20:.1f} MiB, over the server's limit of "
            f"{max_response_bytes / 2**20:.0f} MiB: ask for FLOAT16 maps, MAP_SIZE_MODEL_INPUT, fewer targets or "
            "no overlay, or raise the server's --max-message-mib")
    return response


def build_response(task: ExplainTask, result: Explanation) -> pb.ExplainResponse:
    """Saliency maps (one per target), top-k predictions, overlay and timings of ``result``."""
    response = pb.ExplainResponse(request_id=task.request_id, model=task.model.name, method=result.method,
                                  forward_passes=int(result.forward_passes))
    size = result.image.shape[:2] if (task.original_size and result.image is not None) else None
    for target, label, saliency in zip(result.targets, result.labels, result.saliency_maps):
        if size is not None:
            saliency = resize_map(saliency, size)
        response.maps.add(target=target, label=label, probability=float(result.probs[target]),
                          saliency=array_to_tensor(saliency, task.saliency_dtype))
    for index, prob in result.top_k(task.top_k) if task.top_k else []:
        response.predictions.add(class_index=index, label=task.model.metadata.label(index), probability=prob)
    for key, value in result.params.items():
        response.params[key] = json.dumps(value, default=str)
    if result.image is not None:
        response.original_size.extend(int(d) for d in result.image.shape[:2])
    if task.overlay:
        response.overlay_png = encode_png(result.overlay())
    if result.visualization is not None:
        response.visualization.CopyFrom(array_to_tensor(result.visualization, pb.UINT8))
    timings = result.timings
    response.timings.preprocess_s = timings["preprocess_s"]
    response.timings.base_pass_s = timings["base_pass_s"]
    response.timings.explain_s = timings["explain_s"]
    return response


def describe(task: ExplainTask) -> dict:
    """Fields for the request's log line."""
    return {"model": task.model.name, "method": task.method, "request_id": task.request_id or None,
            "dtype": DTYPE_NAMES[task.saliency_dtype]}
