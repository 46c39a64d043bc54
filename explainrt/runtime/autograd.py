"""Gradients of the deployed graph: the torch engine's ONNX interpreter run with autograd on.

``TorchGraph.run`` is plain torch code, so it is differentiable as it stands; the engine wraps
it in ``inference_mode`` for the forward-only methods. This module adds what the gradient
methods need, without model-specific code:

- per-node hooks through ``TorchGraph.run(..., after=hook)``: called on each node's outputs (it
  may replace them), with gradients recorded;
- ``nonlinearity_outputs``: the output tensor of every nonlinearity node of the graph (Relu,
  Clip/ReLU6, HardSwish, LeakyRelu, Gelu, …, and ``x·sigmoid(x)``/``x·hardsigmoid(x)`` written
  as a Mul), except those that end the network (the classifier's Softmax/Sigmoid);
- ``GradientGraph``: the engine's graph with FGVis's gradient filter (seed 004, Eq. 5–6) after
  every nonlinearity, and the class-score gradient at the explained tensor (Grad-CAM).
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..errors import InvalidInputError
from .onnx_torch import TorchGraph

#: ONNX ops that are a nonlinearity of one tensor (where FGVis filters gradients)
NONLINEAR_OPS = frozenset({
    "Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid",
    "HardSwish", "Sigmoid", "Tanh", "Gelu", "Mish", "ThresholdedRelu",
})
_GATES = ("Sigmoid", "HardSigmoid")  # x · gate(x) is one nonlinearity (SiLU/Swish, hard swish)



def nonlinearity_outputs(graph: TorchGraph) -> frozenset:
    """Names of the tensors that leave a nonlinearity node, the network's last ones excluded.

    A Sigmoid/HardSigmoid whose only consumer multiplies it with its own input is the gate of a
    SiLU/hard swish: the Mul's output is the nonlinearity, not the gate's. A nonlinearity whose
    output feeds no other node (the classifier's own) is not filtered, as the paper says.
    """
    producer = {out: node for node in graph.nodes for out in node.outputs if out}
    consumers: dict[str, list] = {}
    for node in graph.nodes:
        for name in node.inputs:
            if name:
                consumers.setdefault(name, []).append(node)
    gates, names = set(), set()
    for node in graph.nodes:
        if node.op_type != "Mul" or len(node.inputs) != 2:
            continue
        for gate_name, other in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            gate = producer.get(gate_name)
            if gate is not None and gate.op_type in _GATES and gate.inputs[0] == other:
                names.add(node.outputs[0])
                if len(consumers.get(gate_name, [])) == 1:
                    gates.add(gate_name)
                break
    for node in graph.nodes:
        if node.op_type in NONLINEAR_OPS and node.outputs[0] not in gates:
            names.add(node.outputs[0])
    return frozenset(n for n in names if consumers.get(n))


_FILTER = None


def _filter_function(torch):
    """The clipping layer of Eq. 6: identity forward, gradient kept only where lo ≤ h ≤ hi."""
    global _FILTER
    if _FILTER is None:
        class GradientFilter(torch.autograd.Function):
            @staticmethod
            def forward(ctx, h, lo, hi):
                ctx.save_for_backward((h >= lo) & (h <= hi))
                return h.view_as(h)

            @staticmethod
            def backward(ctx, grad):
                (keep,) = ctx.saved_tensors
                return grad * keep, None, None

        _FILTER = GradientFilter
    return _FILTER


class GradientGraph:
    """The graph of a torch engine, differentiated on the engine's device.

    Inputs and results are torch tensors; ``to_torch``/``from_torch`` convert the engine's
    arrays (NumPy on the CPU, CuPy on CUDA, zero-copy). Work runs on the engine's stream.
    """

    def __init__(self, engine):
        while not isinstance(getattr(engine, "graph", None), TorchGraph) and getattr(engine, "engine", None) is not None:
            engine = engine.engine  # a wrapper (the server's batching engine): gradients bypass its batches
        if getattr(engine, "backend", None) != "torch" or not isinstance(getattr(engine, "graph", None), TorchGraph):
            raise InvalidInputError(
                f"gradient methods need the model's graph, which only the torch engine runs; this engine is "
                f"{getattr(engine, 'backend', type(engine).__name__)!r}: open the model with backend='torch' "
                "(CLI: --backend torch)")
        self.engine = engine
        self.torch = engine.torch
        self.graph: TorchGraph = engine.graph
        self.meta = engine.metadata
        self.device = engine._torch_device
        self._nonlinear: Optional[frozenset] = None

    @property
    def nonlinear(self) -> frozenset:
        if self._nonlinear is None:
            self._nonlinear = nonlinearity_outputs(self.graph)
        return self._nonlinear

    # ------------------------------------------------------------ arrays
    def to_torch(self, array):
        torch = self.torch
        if isinstance(array, torch.Tensor):
            return array.to(self.device, self.graph.dtype)
        if self.device.type == "cuda":
            return torch.from_dlpack(array).to(self.graph.dtype)
        import numpy as np

        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.graph.dtype)

    def from_torch(self, tensor):
        t = tensor.detach().float().contiguous()
        if self.device.type == "cuda":
            return self.engine._cp.from_dlpack(t)
        return t.cpu().numpy()

    def stream(self):
        """A context that runs torch work on the engine's stream (a no-op on the CPU).

        Gradient work is long, so the handshake is a host wait on both sides: the caller's
        stream is finished before (its input is read), the engine's after (results are read)."""
        import contextlib

        if self.device.type != "cuda":
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def on_engine_stream():
            self.engine._cp.cuda.get_current_stream().synchronize()
            with self.torch.cuda.stream(self.engine._torch_stream):
                yield
            self.engine._torch_stream.synchronize()

        return on_engine_stream()

    # ------------------------------------------------------------ FGVis
    def bounds(self, x) -> dict:
        """Eq. 5's bounds (min(0, h(x)), max(0, h(x))) of every nonlinearity output for the input ``x``."""
        torch, found = self.torch, {}

        def record(node, results):
            name = node.outputs[0]
            if name in self.nonlinear:
                h = results[0].detach()
                found[name] = (torch.clamp(h, max=0.0), torch.clamp(h, min=0.0))
            return results

        with torch.no_grad():
            self.graph.run({self.meta.input_name: x}, [self.meta.probs_output], after=record)
        return found

    def forward(self, x, outputs: Sequence[str], bounds: Optional[dict] = None) -> dict:
        """Outputs for ``x`` with gradients recorded; with ``bounds`` (from ``bounds()``) every
        nonlinearity's gradient is filtered as FGVis's defence (forward values unchanged)."""
        hook = None
        if bounds:
            apply = _filter_function(self.torch).apply

            def hook(node, results):
                b = bounds.get(node.outputs[0])
                if b is None:
                    return results
                return [apply(results[0], *b), *results[1:]]

        return self.graph.run({self.meta.input_name: x}, outputs, after=hook)

    # ------------------------------------------------------------ Grad-CAM
    def activation_gradients(self, x, targets: Sequence[int], score: str = "logit"):
        """(A, dS/dA): the explained activation (1, C, h, w) for ``x`` and the gradient of each
        target's score at it, (T, C, h, w), from one forward and one backward pass (batched over
        the targets: the input repeated once per target, since shape arithmetic of exported graphs
        may read the batch size from the input). ``score``: 'logit' (pre-softmax, as Grad-CAM) or 'prob'."""
        torch, meta = self.torch, self.meta
        if meta.activation_output is None:
            raise InvalidInputError("gradient CAMs need the activations of a feature layer; this model has none")
        field = meta.logits_output if score == "logit" else meta.probs_output
        if field is None:
            raise InvalidInputError("score='logit' needs a model exported with a logits output; use score='prob'")
        targets = list(targets)
        # A model kept at a fixed batch N runs N rows at a time: targets in groups of N, the last padded.
        group = meta.fixed_batch or len(targets)
        leaf: dict = {}

        def detach_at_activation(node, results):
            if node.outputs[0] == meta.activation_output:
                leaf["a"] = results[0].detach().requires_grad_(True)
                return [leaf["a"], *results[1:]]
            return results

        grads = []
        for start in range(0, len(targets), group):
            part = targets[start:start + group]
            leaf.clear()
            with torch.enable_grad():
                xs = x.expand(group, *x.shape[1:])
                out = self.graph.run({meta.input_name: xs}, [field], after=detach_at_activation)[field]
                if "a" not in leaf:
                    raise InvalidInputError(f"the activation output {meta.activation_output!r} is not computed on the "
                                            f"way to {field!r}")
                index = torch.as_tensor(part, device=out.device)
                picked = out[torch.arange(len(part), device=out.device), index].sum()
                (grad,) = torch.autograd.grad(picked, leaf["a"], allow_unused=True)
            if grad is None:
                raise InvalidInputError(
                    f"the class scores do not depend on the activation output {meta.activation_output!r}")
            grads.append(grad[:len(part)])
        return leaf["a"][:1].detach(), grads[0] if len(grads) == 1 else torch.cat(grads)
