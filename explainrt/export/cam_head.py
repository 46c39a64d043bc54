"""CAM heads: the graph after the explained layer is global average pooling and one linear layer.

There the gradient of class c's logit at the activation is ``α·W[c, k] / (h·w)`` at every
position, so every gradient CAM (Grad-CAM = CAM, Grad-CAM++, XGrad-CAM, LayerCAM) follows from
the activation and the class weights alone: forward-only, on any engine (ONNX Runtime,
TensorRT, torch). ``detect`` runs at export time (``finalize.probe_and_store``) and its result
is stored in the metadata as ``cam_head``: where the weights are in the ONNX file
(``{"weight": initializer name, "layout": "KC" or "CK", "alpha": float}``); ``class_weights``
reads them back.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Optional

import numpy as np

from ..errors import ModelError
from .onnx_tensors import node_attr

_PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Identity", "Dropout")
_cache: dict = {}
_lock = threading.Lock()


def detect(model, meta) -> Optional[dict]:
    """The ``cam_head`` of ``model`` (onnx.ModelProto) with explainrt metadata ``meta``, or None.

    Recognised: activation → GlobalAveragePool | ReduceMean(spatial axes) → [Flatten | Reshape |
    Squeeze | Identity | Dropout]* → Gemm(transA=0) | MatMul [→ Add] → the logits output, each
    tensor on the way used once, the weight an initializer. Anything else: None (gradients).
    """
    from onnx import numpy_helper

    if meta.activation_output is None or meta.activation_layout != "NCHW" or meta.logits_output is None:
        return None
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 else None

    node = only_consumer(meta.activation_output)
    if node is None:
        return None
    if node.op_type == "ReduceMean":
        axes = node_attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1] in inits:
            axes = numpy_helper.to_array(inits[node.input[1]]).tolist()
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            return None
    elif node.op_type != "GlobalAveragePool":
        return None
    tensor = node.output[0]
    node = only_consumer(tensor)
    while node is not None and node.op_type in _PASS_THROUGH:
        tensor = node.output[0]
        node = only_consumer(tensor)
    if node is None:
        return None
    if node.op_type == "Gemm" and node.input[0] == tensor and node.input[1] in inits and not node_attr(node, "transA", 0):
        head = {"weight": node.input[1], "layout": "KC" if node_attr(node, "transB", 0) else "CK",
                "alpha": float(node_attr(node, "alpha", 1.0))}
        out = node.output[0]
    elif node.op_type == "MatMul" and node.input[0] == tensor and node.input[1] in inits:
        head = {"weight": node.input[1], "layout": "CK", "alpha": 1.0}
        out = node.output[0]
        add = only_consumer(out)
        if add is not None and add.op_type == "Add" and out != meta.logits_output:
            out = add.output[0]
    else:
        return None
    while out != meta.logits_output:  # e.g. an Identity naming the logits
        nxt = only_consumer(out)
        if nxt is None or nxt.op_type != "Identity":
            return None
        out = nxt.output[0]
    weight = numpy_helper.to_array(inits[head["weight"]])
    channels = meta.activation_shape[0]
    if weight.ndim != 2 or weight.shape[1 if head["layout"] == "KC" else 0] != channels:
        return None
    return head


def check(head) -> Optional[dict]:
    """Validate a ``cam_head`` read from a file (None passes)."""
    if head is None:
        return None
    if not (isinstance(head, dict) and isinstance(head.get("weight"), str) and head.get("layout") in ("KC", "CK")
            and isinstance(head.get("alpha"), (int, float)) and not isinstance(head.get("alpha"), bool)):
        raise ModelError(f"metadata 'cam_head' must be {{weight, layout KC|CK, alpha}} or null, got {head!r}; "
                         "re-export the model")
    return head


def onnx_source(engine) -> str:
    """The ONNX file an engine runs (a TensorRT plan records the file it was built from)."""
    while getattr(engine, "engine", None) is not None and not hasattr(engine, "path"):
        engine = engine.engine  # the server's batching wrapper
    path = getattr(engine, "path", None)
    if path is None:
        raise ModelError("this engine does not say which ONNX file it runs, so the CAM weights cannot be read")
    if path.endswith(".onnx"):
        return path
    from ..runtime.tensorrt_build import plan_info_path

    with open(plan_info_path(path)) as fh:
        return json.load(fh)["build"]["source"]


def class_weights(engine, head: dict) -> np.ndarray:
    """(K, C) float32 class weights × alpha of the CAM head, read once per file."""
    import onnx
    from onnx import numpy_helper

    path = onnx_source(engine)
    if not os.path.isfile(path):
        raise ModelError(f"the CAM head's class weights are read from the ONNX file the model was built from, {path}, "
                         "which is not there: put it at that path beside the plan (or rebuild the plan where it is), "
                         "or use backend='torch'")
    key = (os.path.abspath(path), os.path.getmtime(path), head["weight"])
    with _lock:
        found = _cache.get(key)
    if found is not None:
        return found
    model = onnx.load(path)
    init = next((t for t in model.graph.initializer if t.name == head["weight"]), None)
    if init is None:
        raise ModelError(f"{path} has no initializer {head['weight']!r} named by its cam_head metadata; re-export it")
    w = numpy_helper.to_array(init).astype(np.float32)
    w = (w if head["layout"] == "KC" else w.T) * np.float32(head["alpha"])
    w = np.ascontiguousarray(w)
    with _lock:
        _cache[key] = w
    return w
