"""A small ONNX → PyTorch interpreter for the exported image classifiers.

The torch engine runs the *exported ONNX file* (the artefact that is deployed), not the
original torch module, so it explains exactly what TensorRT and ONNX Runtime run. The op set
covers what torch.onnx exports for image CNNs (convolutions, normalisation, activations,
pooling, the classifier head, and the shape arithmetic around them) and for vision
transformers (LayerNormalization, Einsum, Mod/Range/ScatterND of shifted windows, boolean
ops); anything else raises ModelError naming the op. It was kept over the onnx2torch
converter after measuring both (benchmarks/torch_engine_backends.py, RESULTS.md).

Nodes whose inputs are all constants (e.g. the padding arithmetic of TF-style "same" convs)
are folded once at load time on the CPU. Integer tensors (shapes, indices) stay on the CPU so
shape arithmetic never synchronises with the GPU; float tensors live on the engine's device
in its compute dtype.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import ModelError

log = logging.getLogger(__name__)

OpFn = Callable[..., list]
_HOST_COPY_MAX = 16  # constants up to this many elements keep a CPU copy for scalar reads
_OPS: dict[str, OpFn] = {}


def op(*names: str):
    """Register an ONNX op implementation ``fn(node, *inputs) -> list of outputs``."""
    def register(fn):
        for name in names:
            _OPS[name] = fn
        return fn
    return register


def supported_ops() -> list[str]:
    """ONNX op types the interpreter runs."""
    return sorted(_OPS)


class Node:
    """One ONNX node: op type, input/output names, decoded attributes, opset version."""

    def __init__(self, proto, opset: int, interp: "TorchGraph"):
        import onnx

        self.op_type = proto.op_type
        self.name = proto.name or f"{proto.op_type}:{proto.output[0]}"
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.opset = opset
        self.interp = interp
        self.host_inputs: dict = {}  # input index → small constant kept on the CPU (see TorchGraph)
        self.attrs = {}
        for a in proto.attribute:
            value = onnx.helper.get_attribute_value(a)
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            self.attrs[a.name] = value

    def attr(self, name: str, default=None):
        return self.attrs.get(name, default)

    def scalar(self, index: int, tensor) -> Optional[float]:
        """A scalar operand (e.g. Clip's bounds) as a float, read from the CPU copy when it is constant."""
        t = self.host_inputs.get(index, tensor)
        return None if t is None or t.numel() == 0 else float(t.reshape(-1)[0])


class TorchGraph:
    """An ONNX graph evaluated with torch ops on ``device`` in float ``dtype``."""

    def __init__(self, model, device: str = "cpu", dtype=None):
        import onnx
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        unknown = sorted({n.op_type for n in graph.node if n.op_type not in _OPS or (n.domain not in ("", "ai.onnx"))})
        if unknown:
            raise ModelError(
                f"the torch engine cannot run ONNX op(s) {', '.join(unknown)} "
                f"(it supports {', '.join(supported_ops())}); "
                "use backend='onnxruntime' or 'tensorrt' for this model")
        initializers = {t.name for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.output_names = [o.name for o in graph.output]
        consts = {t.name: _from_numpy(torch, onnx.numpy_helper.to_array(t)) for t in graph.initializer}
        self.nodes = []
        folding = _Folder(self, consts)
        for proto in graph.node:
            node = Node(proto, self.opset, self)
            if not folding.fold(node):
                self.nodes.append(node)
        # Scalar operands read on the host (Clip bounds, Pad values) keep a CPU copy, so reading
        # them never synchronises with the GPU (nor breaks CUDA graph capture).
        for node in self.nodes:
            node.host_inputs = {i: consts[name] for i, name in enumerate(node.inputs)
                                if name in consts and consts[name].numel() <= _HOST_COPY_MAX}
        self.consts = {name: self._place(value) for name, value in consts.items()}
        self._plans: dict[tuple, list] = {}
        log.debug("ONNX graph: %d nodes to run, %d folded", len(self.nodes), len(graph.node) - len(self.nodes))

    def _place(self, t):
        """Float tensors to the device in the compute dtype; integers and booleans stay on the CPU."""
        if t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype)
        return t

    def _plan(self, wanted: tuple) -> list:
        """Nodes needed for ``wanted`` outputs, with the names each node frees after it runs."""
        plan = self._plans.get(wanted)
        if plan is not None:
            return plan
        needed, keep = set(wanted), []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.outputs):
                keep.append(node)
                needed.update(i for i in node.inputs if i)
        keep.reverse()
        last_use = {}
        for step, node in enumerate(keep):
            for name in node.inputs:
                if name and name not in self.consts:
                    last_use[name] = step
        plan = []
        for step, node in enumerate(keep):
            free = [n for n in node.inputs if n and last_use.get(n) == step and n not in wanted]
            plan.append((node, free))
        self._plans[wanted] = plan
        return plan

    def run(self, feeds: dict, outputs: Sequence[str], after=None) -> dict:
        """Evaluate ``outputs`` from ``feeds`` ({input name: tensor on the device}); ``after(node,
        results)``, when given, sees each node's outputs and returns what goes on (autograd's hooks)."""
        wanted = tuple(outputs)
        missing = [o for o in wanted if o not in self.output_names]
        if missing:
            raise ModelError(f"the model has no output(s) {missing}; it has {self.output_names}")
        env = dict(feeds)
        for node, free in self._plan(wanted):
            args = [None if not name else (env[name] if name in env else self.consts[name]) for name in node.inputs]
            results = _OPS[node.op_type](node, *args)
            if after is not None:
                results = after(node, results)
            for name, value in zip(node.outputs, results):
                if name:
                    env[name] = value
            for name in free:
                env.pop(name, None)
        return {name: env[name] if name in env else self.consts[name] for name in wanted}


class _Folder:
    """Constant folding at load time, on the CPU in float32."""

    def __init__(self, interp: TorchGraph, consts: dict):
        self.consts = consts
        self.cpu = _CpuView(interp)

    def fold(self, node: Node) -> bool:
        if not all((not name) or name in self.consts for name in node.inputs):
            return False
        saved = node.interp
        node.interp = self.cpu
        try:
            results = _OPS[node.op_type](node, *[self.consts[n] if n else None for n in node.inputs])
        finally:
            node.interp = saved
        for name, value in zip(node.outputs, results):
            if name:
                self.consts[name] = value
        return True


class _CpuView:
    """What an op reads from its interpreter while folding: CPU device, float32."""

    def __init__(self, interp: TorchGraph):
        self.torch = interp.torch
        self.device = interp.torch.device("cpu")
        self.dtype = interp.torch.float32


# ---------------------------------------------------------------- helpers

_ONNX_INT_TYPES = {2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 12: "uint32",
                   13: "uint64"}
_ONNX_FLOAT_TYPES = {1, 10, 11, 16}  # float, float16, double, bfloat16


def _from_numpy(torch, array: np.ndarray):
    array = np.array(array, order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    if array.dtype == np.float64 or array.dtype == np.float16:
        array = array.astype(np.float32)
    if array.dtype.kind == "u" and array.dtype != np.uint8:
        array = array.astype(np.int64)
    return torch.from_numpy(array)


def _ints(t) -> list[int]:
    """A small integer tensor (on any device) as a Python list."""
    if t is None:
        return []
    return [int(v) for v in t.reshape(-1).tolist()]


def _like(a, b):
    """Bring ``b`` to ``a``'s device when one of them is a CPU integer tensor (shape arithmetic)."""
    if a.device != b.device:
        if a.dim() == 0 or a.device.type == "cpu":
            a = a.to(b.device)
        else:
            b = b.to(a.device)
    return a, b


def _pool_args(node, x, nd):
    kernel = list(node.attr("kernel_shape"))
    strides = list(node.attr("strides", [1] * nd))
    dilations = list(node.attr("dilations", [1] * nd))
    pads = _resolve_pads(node, x, kernel, strides, dilations, nd)
    return kernel, strides, dilations, pads


def _resolve_pads(node, x, kernel, strides, dilations, nd) -> list[int]:
    """ONNX pads [b1..bn, e1..en] for the spatial axes, honouring auto_pad."""
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID"):
        pads = list(node.attr("pads", [0] * (2 * nd)))
        return [0] * (2 * nd) if auto == "VALID" else pads
    begin, end = [], []
    for i in range(nd):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin + end


def _torch_pad(pads: list[int], nd: int) -> list[int]:
    """ONNX [b1..bn, e1..en] (last nd axes) → torch.nn.functional.pad order (last axis first)."""
    out = []
    for i in reversed(range(nd)):
        out += [pads[i], pads[i + nd]]
    return out


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---------------------------------------------------------------- ops


@op("Identity", "Dropout")
def _identity(node, x, *_):
    return [x]


@op("Constant")
def _constant(node):
    import onnx

    torch = node.interp.torch
    if "value" in node.attrs:
        value = _from_numpy(torch, onnx.numpy_helper.to_array(node.attrs["value"]))
    elif "value_float" in node.attrs:
        value = torch.tensor(float(node.attrs["value_float"]), dtype=torch.float32)
    elif "value_floats" in node.attrs:
        value = torch.tensor(list(node.attrs["value_floats"]), dtype=torch.float32)
    elif "value_int" in node.attrs:
        value = torch.tensor(int(node.attrs["value_int"]), dtype=torch.int64)
    elif "value_ints" in node.attrs:
        value = torch.tensor(list(node.attrs["value_ints"]), dtype=torch.int64)
    else:
        raise ModelError(f"Constant node {node.name} has an unsupported value attribute {sorted(node.attrs)}")
    return [value.to(node.interp.dtype) if value.is_floating_point() else value]


@op("Conv")
def _conv(node, x, w, b=None):
    torch = node.interp.torch
    F = torch.nn.functional
    nd = w.dim() - 2
    kernel = list(node.attr("kernel_shape", w.shape[2:]))
    strides = list(node.attr("strides", [1] * nd))
    dilations = list(node.attr("dilations", [1] * nd))
    pads = _resolve_pads(node, x, kernel, strides, dilations, nd)
    if pads[:nd] != pads[nd:]:
        x = F.pad(x, _torch_pad(pads, nd))
        pads = [0] * (2 * nd)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
    if conv is None:
        raise ModelError(f"Conv node {node.name}: {nd}-D convolution is not supported")
    return [conv(x, w, b, strides, pads[:nd], dilations, int(node.attr("group", 1)))]


@op("BatchNormalization")
def _batchnorm(node, x, scale, bias, mean, var, *_):
    F = node.interp.torch.nn.functional
    return [F.batch_norm(x, mean, var, scale, bias, training=False, eps=float(node.attr("epsilon", 1e-5)))]


# Elementwise ops that are one torch function of one input, by ONNX name.
_UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Exp": "exp", "Log": "log",
          "Sqrt": "sqrt", "Neg": "neg", "Abs": "abs", "Reciprocal": "reciprocal", "Floor": "floor", "Ceil": "ceil"}


def _unary(function: str) -> OpFn:
    def run(node, x):
        return [getattr(node.interp.torch, function)(x)]
    return run


for _onnx_name, _function in _UNARY.items():
    op(_onnx_name)(_unary(_function))


@op("LeakyRelu")
def _leaky_relu(node, x):
    return [node.interp.torch.nn.functional.leaky_relu(x, float(node.attr("alpha", 0.01)))]


@op("Elu")
def _elu(node, x):
    return [node.interp.torch.nn.functional.elu(x, float(node.attr("alpha", 1.0)))]


@op("Softplus")
def _softplus(node, x):
    return [node.interp.torch.nn.functional.softplus(x)]


@op("Clip")
def _clip(node, x, lo=None, hi=None):
    if node.opset < 11:
        lo_v, hi_v = node.attr("min"), node.attr("max")
    else:
        lo_v, hi_v = node.scalar(1, lo), node.scalar(2, hi)
    return [node.interp.torch.clamp(x, lo_v, hi_v)]


@op("HardSigmoid")
def _hard_sigmoid(node, x):
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    return [node.interp.torch.clamp(x * alpha + beta, 0.0, 1.0)]


@op("HardSwish")
def _hard_swish(node, x):
    return [node.interp.torch.nn.functional.hardswish(x)]


def _binary(fn):
    def run(node, a, b):
        a, b = _like(a, b)
        return [fn(node, a, b)]
    return run


op("Add")(_binary(lambda node, a, b: a + b))
op("Sub")(_binary(lambda node, a, b: a - b))
op("Mul")(_binary(lambda node, a, b: a * b))
op("Pow")(_binary(lambda node, a, b: node.interp.torch.pow(a, b)))
op("Equal")(_binary(lambda node, a, b: a == b))
op("Less")(_binary(lambda node, a, b: a < b))
op("Greater")(_binary(lambda node, a, b: a > b))


@op("Div")
def _div(node, a, b):
    a, b = _like(a, b)
    if not a.is_floating_point() and not b.is_floating_point():
        return [node.interp.torch.div(a, b, rounding_mode="trunc")]
    return [a / b]


@op("Where")
def _where(node, cond, a, b):
    a, b = _like(a, b)
    cond, a = _like(cond, a)
    return [node.interp.torch.where(cond.to(a.device), a, b)]


def _variadic(fn):
    def run(node, *xs):
        out = xs[0]
        for x in xs[1:]:
            out, x = _like(out, x)
            out = fn(node.interp.torch, out, x)
        return [out / len(xs)] if node.op_type == "Mean" else [out]
    return run


op("Sum", "Mean")(_variadic(lambda torch, a, b: a + b))
op("Max")(_variadic(lambda torch, a, b: torch.maximum(a, b)))
op("Min")(_variadic(lambda torch, a, b: torch.minimum(a, b)))


@op("GlobalAveragePool")
def _global_avg(node, x):
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


@op("GlobalMaxPool")
def _global_max(node, x):
    return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]


def _reduce(fn):
    def run(node, x, axes=None):
        if node.op_type in _AXES_AS_INPUT and node.opset >= _AXES_AS_INPUT[node.op_type]:
            axes_list = _ints(axes) if axes is not None else None
        else:
            axes_list = list(node.attr("axes")) if node.attr("axes") is not None else None
        if not axes_list:
            if axes_list is not None and node.attr("noop_with_empty_axes", 0):
                return [x]
            axes_list = list(range(x.dim()))
        dims = tuple(_axis(a, x.dim()) for a in axes_list)
        return [fn(x, dims, bool(node.attr("keepdims", 1)))]
    return run


# the opset from which `axes` is an input rather than an attribute
_AXES_AS_INPUT = {"ReduceSum": 13, "ReduceMean": 18, "ReduceMax": 18, "ReduceMin": 18, "ReduceProd": 18}
op("ReduceMean")(_reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)))
op("ReduceSum")(_reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)))
op("ReduceMax")(_reduce(lambda x, d, k: x.amax(dim=d, keepdim=k)))
op("ReduceMin")(_reduce(lambda x, d, k: x.amin(dim=d, keepdim=k)))


def _torch_can_pad(pads, kernel, nd: int) -> bool:
    """torch pooling pads symmetrically and at most half a kernel; anything else is padded first."""
    return pads[:nd] == pads[nd:] and all(p <= k // 2 for p, k in zip(pads[:nd], kernel))


@op("MaxPool")
def _max_pool(node, x):
    torch = node.interp.torch
    F = torch.nn.functional
    nd = x.dim() - 2
    kernel, strides, dilations, pads = _pool_args(node, x, nd)
    ceil = bool(node.attr("ceil_mode", 0))
    symmetric = _torch_can_pad(pads, kernel, nd)
    if not symmetric:
        x = F.pad(x, _torch_pad(pads, nd), value=float("-inf"))
        pads = [0] * (2 * nd)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    return [pool(x, kernel, strides, pads[:nd], dilations, ceil_mode=ceil)]


@op("AveragePool")
def _avg_pool(node, x):
    torch = node.interp.torch
    F = torch.nn.functional
    nd = x.dim() - 2
    kernel, strides, _dil, pads = _pool_args(node, x, nd)
    ceil = bool(node.attr("ceil_mode", 0))
    include_pad = bool(node.attr("count_include_pad", 0))
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    symmetric = _torch_can_pad(pads, kernel, nd)
    if symmetric:
        return [pool(x, kernel, strides, pads[:nd], ceil_mode=ceil, count_include_pad=include_pad)]
    padded = F.pad(x, _torch_pad(pads, nd))
    total = pool(padded, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if include_pad:
        return [total]
    ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads, nd))
    share = pool(ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return [total / share]


@op("Flatten")
def _flatten(node, x):
    axis = _axis(int(node.attr("axis", 1)), x.dim())
    lead = int(np.prod(x.shape[:axis])) if axis > 0 else 1
    return [x.reshape(lead, -1)]


@op("Reshape")
def _reshape(node, x, shape):
    dims = _ints(shape)
    if not node.attr("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return [x.reshape(dims)]


@op("Squeeze")
def _squeeze(node, x, axes=None):
    axes_list = _ints(axes) if node.opset >= 13 else list(node.attr("axes", []))
    if not axes_list:
        return [x.squeeze()]
    for a in sorted((_axis(a, x.dim()) for a in axes_list), reverse=True):
        x = x.squeeze(a)
    return [x]


@op("Unsqueeze")
def _unsqueeze(node, x, axes=None):
    axes_list = _ints(axes) if node.opset >= 13 else list(node.attr("axes", []))
    rank = x.dim() + len(axes_list)
    for a in sorted(_axis(a, rank) for a in axes_list):
        x = x.unsqueeze(a)
    return [x]


@op("Transpose")
def _transpose(node, x):
    perm = node.attr("perm")
    return [x.permute(*(perm if perm is not None else reversed(range(x.dim()))))]


@op("Concat")
def _concat(node, *xs):
    xs = [x for x in xs if x is not None]
    target = next((x.device for x in xs if x.device.type != "cpu"), xs[0].device)
    return [node.interp.torch.cat([x.to(target) for x in xs], dim=int(node.attr("axis")))]


@op("Split")
def _split(node, x, split=None):
    axis = _axis(int(node.attr("axis", 0)), x.dim())
    sizes = _ints(split) if node.opset >= 13 else list(node.attr("split", []))
    if not sizes:
        parts = int(node.attr("num_outputs", len(node.outputs)))
        step = -(-x.shape[axis] // parts)
        sizes = [min(step, x.shape[axis] - i * step) for i in range(parts)]
    return list(node.interp.torch.split(x, sizes, dim=axis))


@op("Slice")
def _slice(node, x, starts=None, ends=None, axes=None, steps=None):
    torch = node.interp.torch
    if node.opset < 10:
        starts_l, ends_l = list(node.attr("starts")), list(node.attr("ends"))
        axes_l = list(node.attr("axes", range(len(starts_l))))
        steps_l = [1] * len(starts_l)
    else:
        starts_l, ends_l = _ints(starts), _ints(ends)
        axes_l = _ints(axes) if axes is not None else list(range(len(starts_l)))
        steps_l = _ints(steps) if steps is not None else [1] * len(starts_l)
    for start, end, axis, step in zip(starts_l, ends_l, axes_l, steps_l):
        axis = _axis(axis, x.dim())
        dim = x.shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index = [slice(None)] * axis + [slice(start, end, step)]
            x = x[tuple(index)]
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            picks = torch.arange(start, end, step, device=x.device)
            x = x.index_select(axis, picks)
    return [x]


@op("Gather")
def _gather(node, x, indices):
    axis = _axis(int(node.attr("axis", 0)), x.dim())
    idx = indices.to(x.device).long()
    idx = node.interp.torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape(tuple(x.shape[:axis]) + tuple(indices.shape) + tuple(x.shape[axis + 1:]))]


@op("Shape")
def _shape(node, x):
    dims = list(x.shape)
    start, end = node.attr("start", 0), node.attr("end", None)
    return [node.interp.torch.tensor(dims[start:end], dtype=node.interp.torch.int64)]


@op("Cast")
def _cast(node, x):
    torch = node.interp.torch
    to = int(node.attr("to"))
    if to in _ONNX_FLOAT_TYPES:
        return [x.to(device=node.interp.device, dtype=node.interp.dtype)]
    if to not in _ONNX_INT_TYPES:
        raise ModelError(f"Cast node {node.name}: unsupported target type {to}")
    return [x.to(getattr(torch, _ONNX_INT_TYPES[to]))]


@op("ConstantOfShape")
def _constant_of_shape(node, shape):
    import onnx

    torch = node.interp.torch
    value = node.attr("value")
    fill = _from_numpy(torch, onnx.numpy_helper.to_array(value)).reshape(-1) if value is not None else \
        torch.zeros(1, dtype=torch.float32)
    if fill.is_floating_point():  # made on the device directly: no host-to-device copy
        return [torch.full(_ints(shape), fill[0].item(), dtype=node.interp.dtype, device=node.interp.device)]
    return [torch.full(_ints(shape), fill[0].item(), dtype=fill.dtype)]


@op("Expand")
def _expand(node, x, shape):
    target = node.interp.torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    return [x.expand(target)]


@op("Gemm")
def _gemm(node, a, b, c=None):
    if node.attr("transA", 0):
        a = a.transpose(0, 1)
    if node.attr("transB", 0):
        b = b.transpose(0, 1)
    out = a @ b
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    if alpha != 1.0:
        out = out * alpha
    if c is not None:
        out = out + (c * beta if beta != 1.0 else c)
    return [out]


@op("MatMul")
def _matmul(node, a, b):
    return [node.interp.torch.matmul(a, b)]


def _softmax_like(fn_name):
    def run(node, x):
        torch = node.interp.torch
        fn = getattr(torch, fn_name)
        if node.opset >= 13:
            return [fn(x, dim=_axis(int(node.attr("axis", -1)), x.dim()))]
        axis = _axis(int(node.attr("axis", 1)), x.dim())  # opsets < 13 flatten from `axis` on
        flat = x.reshape(int(np.prod(x.shape[:axis])) if axis else 1, -1)
        return [fn(flat, dim=1).reshape(x.shape)]
    return run


op("Softmax")(_softmax_like("softmax"))
op("LogSoftmax")(_softmax_like("log_softmax"))


@op("Pad")
def _pad(node, x, pads=None, value=None, axes=None):
    F = node.interp.torch.nn.functional
    mode = node.attr("mode", "constant")
    if node.opset < 11:
        pad_list, fill = list(node.attr("pads")), float(node.attr("value", 0.0))
    else:
        pad_list = _ints(pads)
        fill = node.scalar(2, value) or 0.0
    rank = x.dim()
    axes_l = [_axis(a, rank) for a in _ints(axes)] if axes is not None else list(range(rank))
    n = len(axes_l)
    full = [0] * (2 * rank)
    for i, a in enumerate(axes_l):
        full[a], full[a + rank] = pad_list[i], pad_list[i + n]
    torch_pads = _torch_pad(full, rank)
    while len(torch_pads) > 2 and torch_pads[-1] == 0 and torch_pads[-2] == 0:
        torch_pads = torch_pads[:-2]  # trailing pairs are the leading axes, unpadded
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise ModelError(f"Pad node {node.name}: mode {mode!r} is not supported")
    if torch_mode == "constant":
        return [F.pad(x, torch_pads, mode="constant", value=fill)]
    return [F.pad(x, torch_pads, mode=torch_mode)]


# ---------------------------------------------------------------- transformer ops
# What torch.onnx exports for vision transformers (ViT/DeiT, Swin's shifted windows, MaxViT's
# partitions, ConvNeXt's channels-last LayerNorm) beyond the CNN set above.


@op("LayerNormalization")
def _layer_norm(node, x, scale, bias=None):
    F = node.interp.torch.nn.functional
    axis = _axis(int(node.attr("axis", -1)), x.dim())
    shape = tuple(x.shape[axis:])
    return [F.layer_norm(x, shape, scale.reshape(shape), None if bias is None else bias.reshape(shape),
                         eps=float(node.attr("epsilon", 1e-5)))]


@op("InstanceNormalization")
def _instance_norm(node, x, scale, bias):
    F = node.interp.torch.nn.functional
    return [F.instance_norm(x, weight=scale, bias=bias, eps=float(node.attr("epsilon", 1e-5)))]


@op("Gelu")
def _gelu(node, x):
    approximate = node.attr("approximate", "none")
    return [node.interp.torch.nn.functional.gelu(x, approximate="tanh" if approximate == "tanh" else "none")]


@op("Mod")
def _mod(node, a, b):
    a, b = _like(a, b)
    torch = node.interp.torch
    # fmod=1: C fmod (sign of the dividend); fmod=0 (integers only): sign of the divisor, like Python
    return [torch.fmod(a, b) if node.attr("fmod", 0) else torch.remainder(a, b)]


op("GreaterOrEqual")(_binary(lambda node, a, b: a >= b))
op("LessOrEqual")(_binary(lambda node, a, b: a <= b))
op("And")(_binary(lambda node, a, b: node.interp.torch.logical_and(a, b)))
op("Or")(_binary(lambda node, a, b: node.interp.torch.logical_or(a, b)))
op("Xor")(_binary(lambda node, a, b: node.interp.torch.logical_xor(a, b)))


@op("Not")
def _not(node, x):
    return [node.interp.torch.logical_not(x)]


for _onnx_name, _function in {"Sin": "sin", "Cos": "cos", "Sign": "sign", "Round": "round"}.items():
    op(_onnx_name)(_unary(_function))


@op("Einsum")
def _einsum(node, *xs):
    return [node.interp.torch.einsum(node.attr("equation").replace(" ", ""), *xs)]


@op("Range")
def _range(node, start, limit, delta):
    torch = node.interp.torch
    values = [t.reshape(-1)[0].item() for t in (start, limit, delta)]
    if start.is_floating_point():
        return [torch.arange(*values, dtype=node.interp.dtype, device=node.interp.device)]
    return [torch.arange(*(int(v) for v in values), dtype=start.dtype)]


@op("Tile")
def _tile(node, x, repeats):
    return [x.repeat(*_ints(repeats))]


@op("CumSum")
def _cumsum(node, x, axis):
    dim = _axis(_ints(axis)[0], x.dim())
    torch = node.interp.torch
    if node.attr("reverse", 0):
        x = torch.flip(x, (dim,))
    out = torch.cumsum(x, dim)
    if node.attr("exclusive", 0):
        out = out - x
    return [torch.flip(out, (dim,)) if node.attr("reverse", 0) else out]


@op("ScatterND")
def _scatter_nd(node, data, indices, updates):
    if node.attr("reduction", "none") != "none":
        raise ModelError(f"ScatterND node {node.name}: reduction {node.attr('reduction')!r} is not supported")
    data, updates = _like(data, updates)
    out = data.clone()
    idx = indices.to(out.device).long()
    depth = idx.shape[-1]
    flat = idx.reshape(-1, depth)
    out[tuple(flat[:, i] for i in range(depth))] = updates.reshape(flat.shape[0], *out.shape[depth:])
    return [out]


@op("GatherElements")
def _gather_elements(node, x, indices):
    axis = _axis(int(node.attr("axis", 0)), x.dim())
    idx = indices.to(x.device).long()
    return [node.interp.torch.gather(x, axis, node.interp.torch.where(idx < 0, idx + x.shape[axis], idx))]


@op("ArgMax", "ArgMin")
def _arg_extreme(node, x):
    torch = node.interp.torch
    axis = _axis(int(node.attr("axis", 0)), x.dim())
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    return [fn(x, dim=axis, keepdim=bool(node.attr("keepdims", 1)))]
