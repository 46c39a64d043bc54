"""Expose an intermediate tensor of an existing ONNX classifier as an extra output."""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from ..errors import InvalidInputError, ModelError
from .batch_rewrite import settle_batch_axis
from .finalize import write_checked
from .metadata import ModelMetadata, check_input_size, check_normalisation, load_onnx

log = logging.getLogger(__name__)

_POOLS = ("GlobalAveragePool", "GlobalMaxPool")


def _static_dims(value_info) -> list:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else None)
    return dims


def _reduce_axes(node, graph) -> Optional[list]:
    import onnx
    from onnx import numpy_helper

    for attr in node.attribute:
        if attr.name == "axes":
            return list(onnx.helper.get_attribute_value(attr))
    if len(node.input) > 1 and node.input[1]:
        for init in graph.initializer:
            if init.name == node.input[1]:
                return numpy_helper.to_array(init).tolist()
        for other in graph.node:
            if other.op_type == "Constant" and node.input[1] in other.output:
                return numpy_helper.to_array(other.attribute[0].t).tolist()
    return None


def find_pooled_activation(model) -> str:
    """Name of the last 4-D tensor that feeds global pooling (GlobalAveragePool, ReduceMean over h,w…)."""
    graph = model.graph
    shapes = {vi.name: _static_dims(vi) for vi in list(graph.value_info) + list(graph.output) + list(graph.input)}
    candidate = None
    for node in graph.node:
        src = node.input[0] if node.input else None
        if node.op_type in _POOLS:
            candidate = src
        elif node.op_type in ("ReduceMean", "ReduceMax"):
            axes = _reduce_axes(node, graph)
            if axes is not None and sorted(a % 4 for a in axes) == [2, 3]:
                candidate = src
        elif node.op_type == "AveragePool":
            dims = shapes.get(src)
            kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
            if dims and len(dims) == 4 and kernel == dims[2:]:
                candidate = src
    if candidate is None:  # fall back to the last 4-D tensor with a spatial extent
        for node in graph.node:
            for out in node.output:
                dims = shapes.get(out)
                if dims and len(dims) == 4 and (dims[2] or 2) * (dims[3] or 2) > 1:
                    candidate = out
    if candidate is None:
        raise ModelError("could not find a convolutional activation feeding global pooling; name one with --activation")
    return candidate


def expose_activation(src: str, dst: str, activation: Optional[str] = None,
                      input_size: Optional[Sequence[int]] = None,
                      mean: Sequence[float] = (0.485 * 255, 0.456 * 255, 0.406 * 255),
                      std: Sequence[float] = (0.229 * 255, 0.224 * 255, 0.225 * 255),
                      labels: Optional[Sequence[str]] = None, name: Optional[str] = None,
                      rewrite_batch: bool = True) -> ModelMetadata:
    """Write ``dst``: ``src`` plus the activation tensor as an output, softmax added if it ends in logits.

    The batch axis is made dynamic, the model validated with the ONNX checker and shape
    inference, and explainrt metadata stored in it. A source with a fixed batch has the shape
    constants that hard-code it rewritten, and the rewrite proven; where it cannot be (or
    ``rewrite_batch`` is False) the model keeps its fixed batch (``export.batch_rewrite``).
    """
    import onnx
    from onnx import helper, shape_inference

    check_normalisation(mean, std)
    model = load_onnx(src)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{src} has {len(inputs)} inputs; explainrt explains single-input image classifiers")
    inp = inputs[0]
    dims = _static_dims(inp)
    if len(dims) != 4:
        raise ModelError(f"{src}: input '{inp.name}' has {len(dims)} dimensions; expected an NCHW image batch")
    if dims[1] != 3 and dims[3] == 3:
        raise ModelError(f"{src}: input '{inp.name}' looks NHWC {dims}; explainrt needs NCHW (N, 3, H, W)")
    if dims[1] not in (3, None):
        raise ModelError(f"{src}: input '{inp.name}' has {dims[1]} channels; explainrt explains RGB models (N, 3, H, W)")
    if input_size is None:
        if dims[2] is None or dims[3] is None:
            raise ModelError(f"{src}: the input's height/width are dynamic; give --input-size H W")
        input_size = (dims[2], dims[3])
    input_size = check_input_size(input_size)
    fixed_batch = dims[0]
    # Dynamic batch on the input and every output.
    for vi in [inp, *graph.output]:
        shape = vi.type.tensor_type.shape
        if len(shape.dim):
            shape.dim[0].ClearField("dim_value")
            shape.dim[0].dim_param = "batch"
    del graph.value_info[:]
    try:
        model = shape_inference.infer_shapes(model)
    except Exception as exc:
        raise ModelError(f"ONNX shape inference failed on {src}: {exc}") from exc
    graph = model.graph
    produced = {out: node for node in graph.node for out in node.output}
    if activation is None:
        activation = find_pooled_activation(model)
    elif activation in {i.name for i in graph.input}:
        raise InvalidInputError(f"{activation!r} is the model's input, not an activation: name a 4-D tensor a "
                                "convolution produces (the last one before global pooling is the usual choice)")
    elif activation not in produced:
        raise InvalidInputError(f"{src} has no tensor named {activation!r}")
    if len(graph.output) < 1:
        raise ModelError(f"{src} has no outputs")
    head = graph.output[0].name
    head_node = produced.get(head)
    output_names = {o.name for o in graph.output}
    if head_node is not None and head_node.op_type == "Softmax":
        probs, logits = head, head_node.input[0]
        if logits not in output_names:
            graph.output.append(helper.make_empty_tensor_value_info(logits))
    else:
        logits, probs = head, "probs"
        if "probs" in produced:
            probs = "explainrt_probs"
        graph.node.append(helper.make_node("Softmax", [logits], [probs], axis=-1, name="explainrt_softmax"))
        graph.output.append(helper.make_empty_tensor_value_info(probs))
    if activation not in output_names:
        graph.output.append(helper.make_empty_tensor_value_info(activation))
    # Fill output types from shape inference.
    model = shape_inference.infer_shapes(model)
    known = {vi.name: vi for vi in list(model.graph.value_info)}
    for out in model.graph.output:
        if not out.type.HasField("tensor_type") and out.name in known:
            out.CopyFrom(known[out.name])
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"the modified model fails the ONNX checker: {exc}") from exc
    meta = ModelMetadata(
        input_name=inp.name, input_size=input_size, logits_output=logits,
        probs_output=probs, activation_output=activation, activation_shape=(0, 0, 0), num_classes=0,
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        labels=list(labels) if labels is not None else None, activation_layer=activation,
        name=name or os.path.splitext(os.path.basename(src))[0], source="onnx",
    )
    model, meta = settle_batch_axis(model, meta, fixed_batch, rewrite=rewrite_batch)
    return write_checked(dst, meta, lambda tmp: onnx.save(model, tmp))
