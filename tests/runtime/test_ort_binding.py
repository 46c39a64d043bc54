"""ONNX Runtime IOBinding (the GPU engine's path) checked on the CPU with NumPy buffers."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from explainrt.export import export_torch  # noqa: E402
from tests.conftest import unstrided_cnn  # noqa: E402
from explainrt.runtime.ort_engine import OnnxRuntimeEngine, run_with_binding  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model = unstrided_cnn()
    path = str(tmp_path_factory.mktemp("bind") / "tiny.onnx")
    export_torch(model.eval(), path, input_size=(12, 10))
    return OnnxRuntimeEngine(path, max_batch=4)


def test_bound_outputs_match_a_plain_run(engine):
    x = np.random.default_rng(0).standard_normal((3, 3, 12, 10)).astype(np.float32)
    types = {o.name: o.type for o in engine.session.get_outputs()}
    shapes = {"probs": (3, 4), "activations": (3, 8, 10, 8), "logits": None}  # logits: allocated by ORT
    got = run_with_binding(engine.session, np, "cpu", 0, {"input": x}, shapes, types)
    want = engine.infer(x)
    assert list(got) == list(shapes)
    for name in shapes:
        np.testing.assert_array_equal(got[name], want[name])


def test_bound_input_is_read_in_place_from_a_strided_view(engine):
    big = np.random.default_rng(1).standard_normal((3, 3, 12, 20)).astype(np.float32)
    view = big[:, :, :, ::2]  # not contiguous: bound through a contiguous copy
    types = {o.name: o.type for o in engine.session.get_outputs()}
    got = run_with_binding(engine.session, np, "cpu", 0, {"input": view}, {"probs": (3, 4)}, types)
    np.testing.assert_array_equal(got["probs"], engine.infer(np.ascontiguousarray(view), ["probs"])["probs"])
