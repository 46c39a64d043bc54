"""Fixed-batch ONNX models: make the batch axis dynamic where that can be proven, else keep it fixed.

Files written by ``torch.onnx.export`` without ``dynamic_axes`` (and many deployed models) hard-code
their batch N in shape constants: ``Reshape(x, [1, 2, 58, 28, 28])``, the shape of an ``Expand`` of a
class token, ``Tile`` repeats, ``ConstantOfShape`` sizes, ``Slice`` ends. ``settle_batch_axis``
rewrites those whose leading entry is the batch so that it is computed from the input's shape
(``Shape(input)[0]``), then **proves** the rewrite: a batch of k different inputs must give what
the original gives on them at its own batch (k batch-1 runs for N = 1), for several k, to a tight
tolerance. A rewrite that fails the proof is dropped: the original graph is kept at its fixed
batch (``ModelMetadata.fixed_batch``) and every engine runs it in chunks of exactly N, padding
the last (``runtime.base.Engine``). What was done is recorded in ``ModelMetadata.batch_rewrite``.
"""
from __future__ import annotations

import copy
import logging
import re
from typing import Optional, Sequence

import numpy as np

from ..errors import ModelError
from .metadata import ModelMetadata
from .onnx_tensors import node_attr

log = logging.getLogger(__name__)

BATCH_DIM = "batch"
#: batch sizes the rewrite is proven on (and the fixed batch itself)
PROOF_BATCHES = (1, 2, 3, 5)
#: tolerance of the proof: |rewritten - original| <= atol·max(1, max|original|) + rtol·|original|
PROOF_RTOL, PROOF_ATOL = 1e-4, 1e-5
_INT64_MAX = np.iinfo(np.int64).max
#: op → index of its shape-like input
_SHAPE_INPUT = {"Reshape": 1, "Expand": 1, "Tile": 1, "ConstantOfShape": 0}


def quiet_session(model):
    """An ONNX Runtime CPU session whose own log lines stay off the terminal (errors come back as exceptions).

    ``model`` is a path or an ``onnx.ModelProto``.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: a failed probe raises, it need not also print "[E:onnxruntime…]"
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def quiet_run(sess, names: Sequence[str], feed: dict) -> list:
    import onnxruntime as ort

    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    return sess.run(list(names), feed, run_options)


def _set_batch(model, batch) -> None:
    """Set dim 0 of the graph's input and outputs to ``batch`` (an int, or a symbol name)."""
    inits = {i.name for i in model.graph.initializer}
    for vi in [*(i for i in model.graph.input if i.name not in inits), *model.graph.output]:
        shape = vi.type.tensor_type.shape
        if len(shape.dim):
            if isinstance(batch, str):
                shape.dim[0].ClearField("dim_value")
                shape.dim[0].dim_param = batch
            else:
                shape.dim[0].ClearField("dim_param")
                shape.dim[0].dim_value = int(batch)


def _input_dependent(graph, input_name: str) -> set:
    """Names of tensors computed from the graph input (graph.node is topologically sorted)."""
    dep = {input_name}
    for node in graph.node:
        if any(i in dep for i in node.input if i):
            dep.update(node.output)
    return dep


def _probe_values(model, names: Sequence[str], input_name: str, x) -> dict:
    """Values of tensors ``names`` of ``model`` (static batch) on input ``x``."""
    from onnx import helper

    probe = copy.deepcopy(model)
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name not in present:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
            present.add(name)
    sess = quiet_session(probe)
    return dict(zip(names, quiet_run(sess, names, {input_name: x})))


def rewrite_batch_constants(model, batch: int, input_name: str, item_shape: Sequence[int]):
    """Rewrite shape constants that hard-code ``batch``; returns (rewritten model, list of what changed).

    ``model`` has the fixed batch on its input and outputs; the copy returned has ``batch`` as
    symbolic dim ``"batch"`` there, and each rewritten constant's leading entry computed from the input.
    Which axis of each tensor holds the batch (as its outermost factor) is followed through the
    graph (``_batch_axes``), so a Reshape that folds the batch into a larger leading axis, as a
    window partition's ``(batch·windows, …)``, becomes ``batch × windows``, also where that shape is
    computed from ``Shape`` ops with the batch traced as a constant (``_rewrite_computed_shape``);
    where the batch moves inside an axis (``(tokens, batch·heads, …)``) it is not touched, and the
    proof fails.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    x = np.zeros((batch, *item_shape), np.float32)
    names = [o for node in graph.node for o in node.output if o]
    values = _probe_values(model, list(dict.fromkeys(names)), input_name, x)
    values[input_name] = x
    for init in graph.initializer:
        values.setdefault(init.name, numpy_helper.to_array(init))
    dep = _input_dependent(graph, input_name)

    out = copy.deepcopy(model)  # same node order as ``model``
    batch_name = "explainrt_batch"
    new_nodes = [
        helper.make_node("Shape", [input_name], ["explainrt_input_shape"], name="explainrt_input_shape"),
        helper.make_node("Gather", ["explainrt_input_shape", "explainrt_batch_index"], [batch_name], axis=0,
                         name="explainrt_batch"),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "explainrt_batch_index")]
    changes = []

    def leading_from_batch(tail: np.ndarray, i: int, factor: int = 1) -> str:
        """A new shape tensor: Concat(batch · factor, tail)."""
        lead = batch_name
        if factor != 1:
            lead = f"explainrt_lead_{i}"
            inits.append(numpy_helper.from_array(np.array([factor], np.int64), f"explainrt_factor_{i}"))
            new_nodes.append(helper.make_node("Mul", [batch_name, f"explainrt_factor_{i}"], [lead], name=lead))
        tail_name = f"explainrt_tail_{i}"
        inits.append(numpy_helper.from_array(tail.astype(np.int64), tail_name))
        result = f"explainrt_shape_{i}"
        new_nodes.append(helper.make_node("Concat", [lead, tail_name], [result], axis=0, name=result))
        return result

    insert_before: dict = {}  # node index → new nodes that read tensors computed in the graph
    axis_of: dict = {input_name: 0}  # batch-carrying tensor → the axis whose outermost factor is the batch (or None)
    for i, node in enumerate(out.graph.node):
        shape_like = _shape_like_inputs(node)  # constant shapes: of a batch-carrying tensor, or making one
        if shape_like and not any(n in dep for n in shape_like) and (
                node.input[0] in axis_of or node.op_type in ("Expand", "Tile", "ConstantOfShape")):
            change = _rewrite_node(node, values, batch, axis_of.get(node.input[0], "none"), i, inits,
                                   leading_from_batch)
            if change:
                changes.append(change)
                axis_of.update({o: 0 for o in node.output})
                continue
        if node.op_type == "Reshape" and node.input[1] in dep and axis_of.get(node.input[0]) is not None:
            before: list = []
            change = _rewrite_computed_shape(node, values, batch, axis_of[node.input[0]], i, inits, new_nodes,
                                             before, batch_name)
            if change:
                insert_before[i] = before
                changes.append(change)
                axis_of[node.output[0]] = 0
                continue
        if node.op_type in ("Shape", "Size"):  # its value depends on the batch, but it holds no samples
            continue
        if any(name in axis_of for name in node.input if name):
            for o, a in zip(node.output, _batch_axes(node, axis_of, values, dep)):
                axis_of[o] = a
    if changes:
        out.graph.initializer.extend(inits)
        rest = [n for k, node in enumerate(out.graph.node) for n in (*insert_before.get(k, ()), node)]
        del out.graph.node[:]
        out.graph.node.extend(new_nodes + rest)
    _set_batch(out, BATCH_DIM)
    del out.graph.value_info[:]
    return out, changes


def _shape_like_inputs(node) -> list:
    if node.op_type in _SHAPE_INPUT:
        idx = _SHAPE_INPUT[node.op_type]
        return [node.input[idx]] if len(node.input) > idx and node.input[idx] else []
    if node.op_type == "Slice" and len(node.input) >= 3:
        return [n for n in node.input[1:] if n]
    return []


_SAME_AXIS = {  # ops whose outputs keep the batch axis of their (first batch-carrying) input
    "Relu", "Sigmoid", "Tanh", "Gelu", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Clip", "Cast", "Identity",
    "Dropout", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Softplus", "PRelu", "Mish", "Reciprocal",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater", "And", "Or", "Not",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
}
_NCHW = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
         "BatchNormalization", "InstanceNormalization", "LpNormalization", "Resize", "Upsample", "LRN",
         "DepthToSpace", "SpaceToDepth"}


def _ints(values: dict, node, attr: str, input_index: int):
    """An int-list attribute, or (newer opsets) the constant input that replaced it; None if unknown."""
    for a in node.attribute:
        if a.name == attr:
            return list(a.ints) if a.ints else [a.i]
    if len(node.input) > input_index and node.input[input_index]:
        v = values.get(node.input[input_index])
        return None if v is None else [int(t) for t in np.asarray(v).reshape(-1)]
    return []


def _batch_axes(node, axis_of: dict, values: dict, dynamic: set) -> list:
    """For each output of ``node``: the axis holding the batch as its outermost factor, or None (unknown).

    ``dynamic``: tensors computed from the input (a shape computed from ``Shape`` is one).
    """
    op, n_out = node.op_type, len(node.output)
    carried = [(j, axis_of[name]) for j, name in enumerate(node.input) if name in axis_of]
    unknown = [None] * n_out
    if any(a is None for _, a in carried):
        return unknown
    rank = lambda name: np.ndim(values[name]) if name in values else None  # noqa: E731
    out_rank = rank(node.output[0]) if node.output and node.output[0] else None
    j, a = carried[0]
    in_rank = rank(node.input[j])
    if out_rank is None or any(rank(node.input[k]) is None for k, _ in carried):
        return unknown
    moved = {b + out_rank - rank(node.input[k]) for k, b in carried}  # broadcasting aligns on the right
    if op in _SAME_AXIS:
        return [moved.pop()] * n_out if len(moved) == 1 else unknown
    if op == "MatMul":  # the batch on a broadcast (leading) axis of either side
        ok = all(b < rank(node.input[k]) - (1 if k == 0 else 2) for k, b in carried)
        return [moved.pop()] if ok and len(moved) == 1 else unknown
    if op == "Einsum":  # the batch's letter, wherever the output puts it
        terms = next((a.s.decode() for a in node.attribute if a.name == "equation"), "").replace(" ", "")
        if "->" not in terms or "." in terms:
            return unknown
        ins, result = terms.split("->")
        ins = ins.split(",")
        letters = {ins[k][b] for k, b in carried if b < len(ins[k])}
        return [result.index(letters.pop())] if len(letters) == 1 and letters <= set(result) else unknown
    if len(carried) > 1 and op not in ("Concat",):
        return unknown
    if op in _NCHW:
        return [0] * n_out if a == 0 else unknown
    if op in ("Softmax", "LogSoftmax", "Hardmax", "LayerNormalization", "Flatten", "CumSum"):
        axis = node_attr(node, "axis", -1 if op != "Flatten" else 1) % max(in_rank, 1)
        if op == "LayerNormalization" and a < axis or op in ("Softmax", "LogSoftmax", "Hardmax") and a != axis:
            return [a] + [None] * (n_out - 1)
        if op == "Flatten" and all(d == 1 for d in np.shape(values[node.input[0]])[:a]) and a < axis:
            return [0]
        return unknown
    if op == "Gemm":
        return [0] if j == 0 and a == 0 and not node_attr(node, "transA", 0) else unknown
    if op == "Transpose":
        perm = _ints(values, node, "perm", 99) or list(range(in_rank))[::-1]
        return [perm.index(a)]
    if op in ("Concat", "Split"):
        axis = node_attr(node, "axis", 0) % in_rank
        return unknown if axis == a or len({b for _, b in carried}) > 1 else [a] * n_out
    if op == "Gather":
        axis = node_attr(node, "axis", 0) % in_rank
        if j != 0 or axis == a:
            return unknown
        return [a if axis > a else a + rank(node.input[1]) - 1]
    if op in ("Squeeze", "Unsqueeze"):
        axes = _ints(values, node, "axes", 1)
        if axes is None:
            return unknown
        if op == "Squeeze":
            axes = [t % in_rank for t in axes] or [d for d, s in enumerate(np.shape(values[node.input[0]])) if s == 1]
            return unknown if a in axes else [a - sum(t < a for t in axes)]
        axes = sorted(t % out_rank for t in axes)
        kept = [d for d in range(out_rank) if d not in axes]
        return [kept[a]]
    if op.startswith("Reduce") or op in ("ArgMax", "ArgMin"):
        axes = _ints(values, node, "axes" if not op.startswith("Arg") else "axis", 1)
        if not axes:
            return unknown
        axes = [t % in_rank for t in axes]
        keep = node_attr(node, "keepdims", 1)
        return unknown if a in axes else [a if keep else a - sum(t < a for t in axes)]
    if op == "Slice":
        axes = _ints(values, node, "axes", 3)
        starts = _ints(values, node, "starts", 1)
        axes = list(range(len(starts or []))) if axes == [] else axes
        if axes is None or a in [t % in_rank for t in axes]:
            return unknown
        return [a]
    if op == "Pad":
        pads = _ints(values, node, "pads", 1)
        if pads and pads[a] == 0 and pads[a + in_rank] == 0:
            return [a]
        return unknown
    if op == "Reshape":  # not rewritten: its leading entry copies (0), infers (-1) or computes the batch
        shape = _ints(values, node, "shape", 1)
        flat_outer = all(d == 1 for d in np.shape(values[node.input[0]])[:a])
        computed = node.input[1] in dynamic
        return [0] if shape and (shape[0] in (0, -1) or computed) and flat_outer else unknown
    if op in ("Expand", "Tile"):
        return [a] if out_rank == in_rank else unknown
    return unknown


def _rewrite_computed_shape(node, values: dict, batch: int, data_axis: int, i: int, inits: list, new_nodes: list,
                            before: list, batch_name: str):
    """A Reshape whose shape is computed (from ``Shape`` of tensors) but whose leading entry may have been
    traced as a constant multiple of the batch, as Swin's ``batch·windows``: that entry becomes batch ×
    factor (the same value where it was computed right), the rest stays computed. The nodes that read
    the computed shape go to ``before`` (inserted before ``node``). Returns what changed, or None."""
    from onnx import helper, numpy_helper

    shape_value = np.asarray(values[node.input[1]]).astype(np.int64).reshape(-1)
    data_shape, out_shape = np.shape(values[node.input[0]]), np.shape(values[node.output[0]])
    if (not shape_value.size or shape_value[0] <= 0 or shape_value[0] % batch or not out_shape
            or out_shape[0] != shape_value[0] or not all(d == 1 for d in data_shape[:data_axis])
            or any(a.name == "allowzero" and a.i for a in node.attribute)):
        return None
    factor = int(shape_value[0]) // batch
    names = {k: f"explainrt_{k}_{i}" for k in ("factor", "lead", "one", "end", "tail", "shape")}
    inits += [numpy_helper.from_array(np.array([factor], np.int64), names["factor"]),
              numpy_helper.from_array(np.array([1], np.int64), names["one"]),
              numpy_helper.from_array(np.array([_INT64_MAX], np.int64), names["end"])]
    new_nodes.append(helper.make_node("Mul", [batch_name, names["factor"]], [names["lead"]], name=names["lead"]))
    tail = helper.make_node("Slice", [node.input[1], names["one"], names["end"]], [names["tail"]], name=names["tail"])
    shape = helper.make_node("Concat", [names["lead"], names["tail"]], [names["shape"]], axis=0, name=names["shape"])
    node.input[1] = names["shape"]
    before.extend([tail, shape])
    lead = "batch" if factor == 1 else f"batch*{factor}"
    return f"Reshape '{node.name or node.output[0]}' computed shape {shape_value.tolist()} -> [{lead}, (computed)…]"


def _rewrite_node(node, values: dict, batch: int, data_axis, i: int, inits: list, leading_from_batch):
    """Rewrite one node's shape-like input whose leading entry is ``batch``; returns what changed, or None.

    ``values`` holds the original model's tensors (static batch); ``data_axis`` is the batch axis
    of the node's data input (None: it carries the batch somewhere unknown; "none": it does not).
    """
    from onnx import numpy_helper

    out_shape = np.shape(values[node.output[0]])
    if not out_shape:
        return None
    label = f"{node.op_type} '{node.name or node.output[0]}'"
    data_shape = np.shape(values[node.input[0]]) if node.input[0] in values else ()
    if node.op_type == "Slice":  # x[0:N] on the batch axis → x[0:]
        starts = np.asarray(values[node.input[1]]).astype(np.int64)
        ends = np.asarray(values[node.input[2]]).astype(np.int64).copy()
        axes = (np.asarray(values[node.input[3]]).astype(np.int64) if len(node.input) > 3 and node.input[3]
                else np.arange(starts.size))
        steps = (np.asarray(values[node.input[4]]).astype(np.int64) if len(node.input) > 4 and node.input[4]
                 else np.ones(starts.size, np.int64))
        hits = [j for j in range(axes.size) if axes[j] % len(data_shape) == 0 and starts[j] == 0 and steps[j] == 1
                and batch <= ends[j] < _INT64_MAX]
        if data_axis != 0 or not hits or data_shape[0] != batch:
            return None
        was = ends.tolist()
        ends[hits] = _INT64_MAX
        name = f"explainrt_ends_{i}"
        inits.append(numpy_helper.from_array(ends, name))
        node.input[2] = name
        return f"{label} ends {was} -> to the end of the batch"
    idx = _SHAPE_INPUT[node.op_type]
    shape_value = np.asarray(values[node.input[idx]]).astype(np.int64).reshape(-1)
    if shape_value.size == 0:
        return None
    lead, factor = int(shape_value[0]), 1
    if node.op_type == "Reshape":  # the batch, outermost in the data, stays the outermost factor of axis 0
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        if data_axis == "none" or allowzero or lead <= 0 or lead % batch or out_shape[0] != lead:
            return None
        if data_axis is None:  # lost track of it: the batch is taken to lead, as it does at export (proof checks)
            if not data_shape or data_shape[0] != batch or lead != batch:
                return None
        elif not all(d == 1 for d in data_shape[:data_axis]):
            return None
        factor = lead // batch
    elif out_shape[0] != batch:
        return None
    elif node.op_type == "Expand":  # e.g. a class token expanded to the batch
        if shape_value.size != len(out_shape) or lead not in (batch, 1) or data_axis not in (0, "none"):
            return None
    elif node.op_type == "Tile":  # a constant of batch 1 repeated N times
        if data_axis != "none" or not data_shape or data_shape[0] != 1 or lead != batch:
            return None
    elif node.op_type == "ConstantOfShape":
        if len(out_shape) < 2 or lead != batch:
            return None
    node.input[idx] = leading_from_batch(shape_value[1:], i, factor)
    what = "repeats" if node.op_type == "Tile" else "shape"
    new_lead = "batch" if factor == 1 else f"batch*{factor}"
    return f"{label} {what} {shape_value.tolist()} -> {[new_lead, *shape_value[1:].tolist()]}"


def prove_batch_rewrite(original, rewritten, batch: int, input_name: str, item_shape: Sequence[int],
                        batches: Sequence[int] = PROOF_BATCHES, seed: int = 0) -> dict:
    """Check that ``rewritten`` on k different inputs gives what ``original`` (fixed ``batch``) gives on them.

    The original runs the inputs in chunks of its batch (the last padded with other inputs); the
    rewritten model runs batches of each k in ``batches`` (and ``batch``) at once. Returns
    ``{"batches": [...], "max_error": e}`` (error relative to each output's scale); raises
    ``ModelError`` saying which batch and output failed.
    """
    ks = sorted(set(int(k) for k in batches) | {int(batch)})
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((max(ks), *item_shape)).astype(np.float32)
    names = [o.name for o in rewritten.graph.output]
    try:
        ref_sess = quiet_session(original)
        parts = []
        for start in range(0, x.shape[0], batch):
            chunk = x[start:start + batch]
            pad = batch - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, x[:pad]])
            parts.append([v[:batch - pad] for v in quiet_run(ref_sess, names, {input_name: chunk})])
        reference = [np.concatenate([p[j] for p in parts]) for j in range(len(names))]
    except Exception as exc:
        raise ModelError(f"the original model does not run at its batch of {batch}: {_first_line(exc)}") from exc
    try:
        sess = quiet_session(rewritten)
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load the rewritten model: {_first_line(exc)}") from exc
    worst = 0.0
    for k in ks:
        try:
            got = quiet_run(sess, names, {input_name: x[:k]})
        except Exception as exc:
            raise ModelError(f"the rewritten model does not run on a batch of {k}: {_first_line(exc)}") from exc
        for name, g, want in zip(names, got, reference):
            want = want[:k]
            if g.shape != want.shape:
                raise ModelError(f"batch of {k}: output '{name}' has shape {g.shape}, expected {want.shape}")
            scale = max(1.0, float(np.abs(want).max()) if want.size else 1.0)
            diff = np.abs(g.astype(np.float64) - want)
            if not np.all(diff <= PROOF_ATOL * scale + PROOF_RTOL * np.abs(want)):
                raise ModelError(f"batch of {k}: output '{name}' differs from {k} runs of the original by up to "
                                 f"{float(diff.max()):.3g} (the graph mixes or misplaces samples)")
            worst = max(worst, float(diff.max()) / scale if diff.size else 0.0)
    return {"batches": ks, "max_error": worst}


def _first_line(exc: Exception, limit: int = 300) -> str:
    """The gist of an exception on one line: ONNX Runtime's status prefix and source paths dropped."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+ \S+::\S+\(.*?\) ", "", text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def settle_batch_axis(model, meta: ModelMetadata, fixed_batch: Optional[int], rewrite: bool = True):
    """The model explainrt stores and its metadata, for a source whose input batch is ``fixed_batch``.

    ``model`` has a symbolic batch on its input and outputs (``expose_activation`` made it so).
    ``fixed_batch`` None (the source's batch was already dynamic): returned unchanged. Otherwise
    the shape constants are rewritten and the rewrite proven; if it cannot be (or ``rewrite`` is
    False) the graph is kept with its fixed batch and ``meta.fixed_batch`` set. Either way
    ``meta.batch_rewrite`` records what happened.
    """
    from onnx import checker, shape_inference

    if not fixed_batch:
        return model, meta
    n = int(fixed_batch)
    item_shape = (meta.channels, *meta.input_size)
    original = copy.deepcopy(model)
    _set_batch(original, n)
    del original.graph.value_info[:]
    record = {"original_batch": n}
    reason = "the batch rewrite was turned off"
    if rewrite:
        try:
            candidate, changes = rewrite_batch_constants(original, n, meta.input_name, item_shape)
            candidate = shape_inference.infer_shapes(candidate)
            checker.check_model(candidate)
            proof = prove_batch_rewrite(original, candidate, n, meta.input_name, item_shape)
        except Exception as exc:  # ModelError from the proof, or ONNX refusing the rewritten graph
            reason = _first_line(exc)
        else:
            record.update(status="rewritten", rewrites=changes, proven_batches=proof["batches"],
                          max_error=proof["max_error"])
            meta.batch_rewrite, meta.fixed_batch = record, None
            log.info("batch axis made dynamic (was %d): %d shape constants rewritten, proven for batches %s",
                     n, len(changes), proof["batches"])
            return candidate, meta
    record.update(status="fixed", reason=reason)
    meta.batch_rewrite, meta.fixed_batch = record, n
    log.warning("the model keeps its fixed batch of %d (%s); explainrt runs it %d input(s) per engine call", n,
                reason, n)
    try:
        original = shape_inference.infer_shapes(original)
    except Exception as exc:
        raise ModelError(f"ONNX shape inference failed on the fixed-batch model: {exc}") from exc
    return original, meta


def describe_batch(meta: ModelMetadata) -> str:
    """One line on the batch axis of an exported model: dynamic, rewritten (and how), or fixed (and why)."""
    info = meta.batch_rewrite or {}
    if meta.fixed_batch:
        return (f"batch fixed at {meta.fixed_batch} ({info.get('reason', 'as exported')}): explainrt runs it "
                f"{meta.fixed_batch} per engine call")
    if info.get("status") == "rewritten":
        rewrites = info.get("rewrites") or []
        return (f"batch made dynamic (was fixed at {info.get('original_batch')}; {len(rewrites)} shape constant(s) "
                f"rewritten, proven for batches {', '.join(map(str, info.get('proven_batches', [])))})")
    return "batch dynamic"
