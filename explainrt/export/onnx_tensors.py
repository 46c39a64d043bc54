"""Which tensor of an ONNX classifier to explain, and the nodes that give its NCHW view.

The ONNX twin of ``torch_export.find_activation_layer``: graph tensors in node order, their
shapes from shape inference (or one ONNX Runtime run where it cannot tell), read with the
shape rules of ``layout``.
"""
from __future__ import annotations

from typing import Optional

from ..errors import ModelError
from .layout import ActivationView, classify, has_positions


def static_dims(value_info) -> list:
    """Dims of a value_info (``None`` for a dynamic one)."""
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else None)
    return dims


_POOLS = ("GlobalAveragePool", "GlobalMaxPool")


def node_attr(node, name: str, default=None):
    """The value of attribute ``name`` of an ONNX node (``default`` when it has none)."""
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _reduce_axes(node, graph) -> Optional[list]:
    from onnx import numpy_helper

    axes = node_attr(node, "axes")
    if axes is not None:
        return list(axes)
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
    shapes = {vi.name: static_dims(vi) for vi in list(graph.value_info) + list(graph.output) + list(graph.input)}
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


def tensor_shapes(model, input_name: str, input_size) -> dict:
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
            dims = static_dims(vi)[1:] if vi is not None and vi.type.tensor_type.HasField("shape") else None
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
    shapes = tensor_shapes(model, input_name, input_size)
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
                         "to explain; name one with --activation (and --grid/--prefix-tokens for tokens), or "
                         "export it as a black box with --no-activation (RISE and the metrics only)")
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


def append_nchw_view(graph, tensor: str, view: ActivationView) -> str:
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
