"""Expose an intermediate tensor of an existing ONNX classifier as an extra output."""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from ..errors import InvalidInputError, ModelError
from .finalize import write_checked
from .layout import ActivationView, classify, has_positions, user_view
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


def _pooled_tensor(model) -> Optional[str]:
    """Name of the last 4-D tensor that feeds global pooling (GlobalAveragePool, ReduceMean over h,w…), if any."""
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
    return candidate


def _tensor_shapes(model, input_name: str, input_size) -> dict:
    """Shapes (batch axis dropped) of every float tensor a node makes, in node order.

    From shape inference where it knows them; the rest (shapes computed at run time, e.g. a
    ViT's token reshapes under a dynamic batch) from one ONNX Runtime run on a zero image.
    """
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    info = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output)}
    shapes, unknown = {}, []
    for node in model.graph.node:
        for out in node.output:
            vi = info.get(out)
            if vi is not None and vi.type.tensor_type.elem_type not in floats:
                continue
            dims = _static_dims(vi)[1:] if vi is not None and vi.type.tensor_type.HasField("shape") else None
            if dims is None or any(d is None for d in dims):
                unknown.append(out)
            shapes[out] = dims
    if unknown:
        probe = type(model)()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in unknown)
        try:
            sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            values = sess.run(unknown, {input_name: np.zeros((1, 3, *input_size), np.float32)})
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot run the model on a (1, 3, {input_size[0]}, {input_size[1]}) "
                             f"zero image to read its tensor shapes: {exc}") from exc
        for name, value in zip(unknown, values):
            shapes[name] = list(value.shape[1:]) if value.dtype.kind == "f" and value.ndim else None
    return {name: dims for name, dims in shapes.items() if dims is not None}


def find_explained_tensor(model, input_name: str, input_size) -> tuple[str, ActivationView]:
    """The tensor to explain and its layout: the last tensor that reads as a feature grid.

    A CNN keeps the last 4-D tensor feeding global pooling; a later NHWC map (Swin-like) or token
    sequence (ViT/DeiT: class/register tokens before the patch tokens) wins over it, so a ViT's
    patch embedding is never explained. A tensor with positions after the chosen one that reads as
    none of these makes it refuse (name one with --activation) instead of guessing.
    """
    shapes = _tensor_shapes(model, input_name, input_size)
    pooled = _pooled_tensor(model)
    views, grids, unread = [], [], []
    for name, dims in shapes.items():
        view = classify(dims, input_size, grids)
        if view is not None:
            views.append((name, view))
            if view.layout != "tokens":
                grids.insert(0, view.nchw_shape[1:])
        elif has_positions(dims):
            unread.append((len(views), f"{name} {tuple(dims)}"))
    if not views:
        raise ModelError("could not find a feature map (N, C, h, w), (N, h, w, C) or patch tokens (N, tokens, C) "
                         "to explain; name one with --activation (and --grid/--prefix-tokens for tokens)")
    order = [name for name, _ in views]
    chosen = len(views) - 1
    if pooled in order:
        at = order.index(pooled)
        if views[at][1].layout == "NCHW" and all(v.layout == "NCHW" for _, v in views[at + 1:]):
            chosen = at
    later = [text for position, text in unread if position > chosen]
    name, view = views[chosen]
    if later:
        raise ModelError(f"after {name} ({view.describe()}) the model has tensors that are not a feature grid "
                         f"explainrt can read: {', '.join(later[:3])}; name the tensor to explain with --activation "
                         "(and --grid/--prefix-tokens for tokens)")
    return name, view


def _append_nchw_view(graph, tensor: str, view: ActivationView) -> str:
    """Nodes that turn ``tensor`` into its (N, C, h, w) view; returns the view's name (``tensor`` if NCHW)."""
    import numpy as np
    from onnx import helper, numpy_helper

    if view.layout == "NCHW":
        return tensor
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer}
    out = next(n for n in ("explainrt_activation", *(f"explainrt_activation_{i}" for i in range(1, 100)))
               if n not in taken)
    if view.layout == "NHWC":
        graph.node.append(helper.make_node("Transpose", [tensor], [out], perm=[0, 3, 1, 2],
                                           name="explainrt_nhwc_to_nchw"))
        return out
    c, h, w = view.nchw_shape
    consts = {"starts": [view.prefix_tokens], "ends": [view.prefix_tokens + h * w], "axes": [1], "shape": [0, c, h, w]}
    for key, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), f"{out}_{key}"))
    graph.node.extend([
        helper.make_node("Slice", [tensor, f"{out}_starts", f"{out}_ends", f"{out}_axes"], [f"{out}_patches"],
                         name="explainrt_drop_tokens"),
        helper.make_node("Transpose", [f"{out}_patches"], [f"{out}_channels_first"], perm=[0, 2, 1],
                         name="explainrt_tokens_channels_first"),
        helper.make_node("Reshape", [f"{out}_channels_first", f"{out}_shape"], [out], name="explainrt_token_grid"),
    ])
    return out


def expose_activation(src: str, dst: str, activation: Optional[str] = None,
                      input_size: Optional[Sequence[int]] = None,
                      mean: Sequence[float] = (0.485 * 255, 0.456 * 255, 0.406 * 255),
                      std: Sequence[float] = (0.229 * 255, 0.224 * 255, 0.225 * 255),
                      labels: Optional[Sequence[str]] = None, name: Optional[str] = None,
                      grid: Optional[Sequence[int]] = None, prefix_tokens: Optional[int] = None,
                      with_activation: bool = True) -> ModelMetadata:
    """Write ``dst``: ``src`` plus the activation tensor as an output, softmax added if it ends in logits.

    ``activation``: the tensor to explain (default ``find_explained_tensor``). An NHWC map or a
    token tensor (N, L, C) is exposed as its NCHW view, built in the graph: ``prefix_tokens``
    leading tokens dropped, the rest reshaped to ``grid`` (both detected when not given).
    ``with_activation=False`` exposes no activation (a black-box model: RISE and the metrics).
    The batch axis is made dynamic, the model validated with the ONNX checker and shape
    inference, and explainrt metadata stored in it.
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
    view = None
    if not with_activation:
        if activation is not None or grid is not None or prefix_tokens is not None:
            raise InvalidInputError("--no-activation exports scores only: do not name an activation, grid or "
                                    "prefix tokens")
    elif activation is None:
        if grid is not None or prefix_tokens is not None:
            raise InvalidInputError("--grid/--prefix-tokens describe the tensor you name: give --activation too")
        activation, view = find_explained_tensor(model, inp.name, input_size)
    elif activation in {i.name for i in graph.input}:
        raise InvalidInputError(f"{activation!r} is the model's input, not an activation: name a 4-D tensor a "
                                "convolution produces (the last one before global pooling is the usual choice)")
    elif activation not in produced:
        raise InvalidInputError(f"{src} has no tensor named {activation!r}")
    if activation is not None and view is None:
        dims = _tensor_shapes(model, inp.name, input_size).get(activation)
        if dims is None:
            raise InvalidInputError(f"tensor {activation!r} is not a float tensor of {src}; name an activation")
        view = user_view(dims, input_size, grid, prefix_tokens, f"tensor {activation!r}")
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
    exposed = None
    if activation is not None:
        exposed = _append_nchw_view(graph, activation, view)
        if exposed not in output_names:
            graph.output.append(helper.make_empty_tensor_value_info(exposed))
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
        probs_output=probs, activation_output=exposed, activation_shape=(0, 0, 0) if exposed else None,
        num_classes=0, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        labels=list(labels) if labels is not None else None, activation_layer=activation,
        name=name or os.path.splitext(os.path.basename(src))[0], source="onnx",
        **(view.metadata() if view is not None else {"activation_layout": None}),
    )
    return write_checked(dst, meta, lambda tmp: onnx.save(model, tmp))
