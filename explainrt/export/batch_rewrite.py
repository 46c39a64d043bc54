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
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    dep = _input_dependent(graph, input_name)
    candidates = []
    for index, node in enumerate(graph.node):  # (node index, its input-independent shape-like inputs)
        if node.op_type in _SHAPE_INPUT:
            idx = _SHAPE_INPUT[node.op_type]
            if len(node.input) > idx and node.input[idx] and node.input[idx] not in dep:
                candidates.append((index, [node.input[idx]]))
        elif node.op_type == "Slice" and len(node.input) >= 3 and node.input[0] in dep:
            rest = [i for i in node.input[1:] if i]
            if not any(i in dep for i in rest):
                candidates.append((index, rest))
    if not candidates:
        out = copy.deepcopy(model)
        _set_batch(out, BATCH_DIM)
        return out, []
    wanted = []
    for index, extra in candidates:
        node = graph.node[index]
        wanted += [node.input[0], node.output[0], *extra]
    x = np.zeros((batch, *item_shape), np.float32)
    values = _probe_values(model, list(dict.fromkeys(wanted)), input_name, x)

    out = copy.deepcopy(model)  # same node order as ``model``
    batch_name = "explainrt_batch"
    new_nodes = [
        helper.make_node("Shape", [input_name], ["explainrt_input_shape"], name="explainrt_input_shape"),
        helper.make_node("Gather", ["explainrt_input_shape", "explainrt_batch_index"], [batch_name], axis=0,
                         name="explainrt_batch"),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "explainrt_batch_index")]
    changes = []

    def leading_from_batch(tail: np.ndarray, i: int) -> str:
        """A new shape tensor: Concat(batch, tail)."""
        tail_name = f"explainrt_tail_{i}"
        inits.append(numpy_helper.from_array(tail.astype(np.int64), tail_name))
        result = f"explainrt_shape_{i}"
        new_nodes.append(helper.make_node("Concat", [batch_name, tail_name], [result], axis=0,
                                          name=f"explainrt_shape_{i}"))
        return result

    candidate_at = dict(candidates)
    batchy = {input_name}  # tensors that carry the batch: computed from the input, or by a rewritten node
    for i, node in enumerate(out.graph.node):
        extra = candidate_at.get(i)
        if extra is not None and not any(name in batchy for name in extra):
            change = _rewrite_node(node, values, batch, node.input[0] in batchy, i, inits, leading_from_batch)
            if change:
                changes.append(change)
                batchy.update(node.output)
        if any(name in batchy for name in node.input if name):
            batchy.update(node.output)
    if changes:
        out.graph.initializer.extend(inits)
        rest = list(out.graph.node)
        del out.graph.node[:]
        out.graph.node.extend(new_nodes + rest)
    _set_batch(out, BATCH_DIM)
    del out.graph.value_info[:]
    return out, changes


def _rewrite_node(node, values: dict, batch: int, data_dep: bool, i: int, inits: list, leading_from_batch):
    """Rewrite one node's shape-like input whose leading entry is ``batch``; returns what changed, or None.

    ``values`` holds the original model's tensors (static batch); ``data_dep`` says whether the
    node's data input carries the batch.
    """
    from onnx import numpy_helper

    out_shape = np.shape(values[node.output[0]])
    if not out_shape or out_shape[0] != batch:
        return None
    label = f"{node.op_type} '{node.name or node.output[0]}'"
    data_shape = np.shape(values[node.input[0]])
    if node.op_type == "Slice":  # x[0:N] on the batch axis → x[0:]
        starts = values[node.input[1]].astype(np.int64)
        ends = values[node.input[2]].astype(np.int64).copy()
        axes = (values[node.input[3]].astype(np.int64) if len(node.input) > 3 and node.input[3]
                else np.arange(starts.size))
        steps = (values[node.input[4]].astype(np.int64) if len(node.input) > 4 and node.input[4]
                 else np.ones(starts.size, np.int64))
        hits = [j for j in range(axes.size) if axes[j] % len(data_shape) == 0 and starts[j] == 0 and steps[j] == 1
                and batch <= ends[j] < _INT64_MAX]
        if not data_dep or not hits or data_shape[0] != batch:
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
    lead = int(shape_value[0])
    if node.op_type == "Reshape":  # a batch-carrying tensor reshaped to [N, ...] or [-1, ...]
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        if not data_dep or not data_shape or data_shape[0] != batch or lead not in (batch, -1) or allowzero:
            return None
    elif node.op_type == "Expand":  # e.g. a class token expanded to the batch
        if shape_value.size != len(out_shape) or lead not in (batch, 1):
            return None
    elif node.op_type == "Tile":  # a constant of batch 1 repeated N times
        if data_dep or not data_shape or data_shape[0] != 1 or lead != batch:
            return None
    elif node.op_type == "ConstantOfShape":
        if len(out_shape) < 2 or lead != batch:
            return None
    node.input[idx] = leading_from_batch(shape_value[1:], i)
    what = "repeats" if node.op_type == "Tile" else "shape"
    return f"{label} {what} {shape_value.tolist()} -> {['batch', *shape_value[1:].tolist()]}"


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
