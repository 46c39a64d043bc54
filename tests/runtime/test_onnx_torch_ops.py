"""The interpreter's transformer ops against ONNX Runtime, one hand-built graph per op."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from explainrt.runtime.onnx_torch import TorchGraph  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 6, 4)).astype(np.float32)


def _graph(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_empty_tensor_value_info(n) for n in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _check(model, feeds):
    outputs = [o.name for o in model.graph.output]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(outputs, feeds)
    got = TorchGraph(model).run({k: torch.from_numpy(v) for k, v in feeds.items()}, outputs)
    for name, expected in zip(outputs, want):
        value = got[name].numpy()
        assert value.shape == expected.shape, name
        np.testing.assert_allclose(value.astype(np.float64), expected.astype(np.float64), rtol=1e-5, atol=1e-5)


FLOAT_IN = [("x", TensorProto.FLOAT, list(X.shape))]


@pytest.mark.parametrize("case", [
    "layernorm", "layernorm_axis", "gelu", "mod_int", "fmod", "einsum", "range", "scatternd", "not_and_or",
    "compare", "sin_cos", "tile", "cumsum", "gather_elements", "argmax", "instance_norm",
])
def test_op_matches_onnxruntime(case):
    feeds = {"x": X}
    if case == "layernorm":
        model = _graph([helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], epsilon=1e-6)], FLOAT_IN, ["y"],
                       [("s", RNG.random(4).astype(np.float32)), ("b", RNG.random(4).astype(np.float32))])
    elif case == "layernorm_axis":
        model = _graph([helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=1)], FLOAT_IN, ["y"],
                       [("s", RNG.random((6, 4)).astype(np.float32))])
    elif case == "gelu":
        model = _graph([helper.make_node("Gelu", ["x"], ["y"]), helper.make_node("Gelu", ["x"], ["z"], approximate="tanh")],
                       FLOAT_IN, ["y", "z"], opset=20)
    elif case == "mod_int":  # Python-style sign (of the divisor), as Swin's shifted-window masks use
        model = _graph([helper.make_node("Mod", ["a", "b"], ["y"])],
                       [("a", TensorProto.INT64, [5]), ("b", TensorProto.INT64, [5])], ["y"])
        feeds = {"a": np.array([-7, 7, -3, 9, 0], np.int64), "b": np.array([3, -3, 3, 4, 2], np.int64)}
    elif case == "fmod":
        model = _graph([helper.make_node("Mod", ["x", "d"], ["y"], fmod=1)], FLOAT_IN, ["y"],
                       [("d", np.float32(0.7))])
    elif case == "einsum":
        model = _graph([helper.make_node("Einsum", ["x", "w"], ["y"], equation="bij, jk -> bik")], FLOAT_IN, ["y"],
                       [("w", RNG.standard_normal((4, 3)).astype(np.float32))])
    elif case == "range":
        model = _graph([helper.make_node("Shape", ["x"], ["s"]),
                        helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
                        helper.make_node("Range", ["zero", "n", "step"], ["y"]),
                        helper.make_node("Range", ["f0", "f1", "f2"], ["z"])], FLOAT_IN, ["y", "z"],
                       [("one", np.int64(1)), ("zero", np.int64(0)), ("step", np.int64(2)),
                        ("f0", np.float32(0.5)), ("f1", np.float32(3.0)), ("f2", np.float32(0.75))])
    elif case == "scatternd":
        model = _graph([helper.make_node("ScatterND", ["x", "i", "u"], ["y"])], FLOAT_IN, ["y"],
                       [("i", np.array([[[1, 2]], [[0, 5]]], np.int64)),
                        ("u", RNG.standard_normal((2, 1, 4)).astype(np.float32))])
    elif case == "not_and_or":
        model = _graph([helper.make_node("Greater", ["x", "zero"], ["p"]), helper.make_node("Not", ["p"], ["q"]),
                        helper.make_node("Less", ["x", "half"], ["r"]), helper.make_node("And", ["p", "r"], ["y"]),
                        helper.make_node("Or", ["q", "r"], ["z"]), helper.make_node("Xor", ["p", "r"], ["w"])],
                       FLOAT_IN, ["q", "y", "z", "w"], [("zero", np.float32(0)), ("half", np.float32(0.5))])
    elif case == "compare":
        model = _graph([helper.make_node("GreaterOrEqual", ["x", "t"], ["y"]),
                        helper.make_node("LessOrEqual", ["x", "t"], ["z"])], FLOAT_IN, ["y", "z"],
                       [("t", np.float32(X[0, 0, 0]))])
    elif case == "sin_cos":
        model = _graph([helper.make_node(o, ["x"], [o]) for o in ("Sin", "Cos", "Sign", "Round")], FLOAT_IN,
                       ["Sin", "Cos", "Sign", "Round"])
    elif case == "tile":
        model = _graph([helper.make_node("Tile", ["x", "r"], ["y"])], FLOAT_IN, ["y"], [("r", np.array([1, 2, 3]))])
    elif case == "cumsum":
        model = _graph([helper.make_node("CumSum", ["x", "a"], ["y"]),
                        helper.make_node("CumSum", ["x", "a"], ["z"], exclusive=1, reverse=1)], FLOAT_IN, ["y", "z"],
                       [("a", np.int64(1))])
    elif case == "gather_elements":
        model = _graph([helper.make_node("GatherElements", ["x", "i"], ["y"], axis=2)], FLOAT_IN, ["y"],
                       [("i", RNG.integers(-4, 4, (2, 6, 3)).astype(np.int64))])
    elif case == "argmax":
        model = _graph([helper.make_node("ArgMax", ["x"], ["y"], axis=1),
                        helper.make_node("ArgMin", ["x"], ["z"], axis=-1, keepdims=0)], FLOAT_IN, ["y", "z"])
    else:  # instance_norm
        model = _graph([helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"])], FLOAT_IN, ["y"],
                       [("s", RNG.random(6).astype(np.float32)), ("b", RNG.random(6).astype(np.float32))])
    _check(model, feeds)
