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


def test_cuda_device_prefers_the_cuda_provider(monkeypatch):
    """The TensorRT EP without a profile builds an engine per batch size: never picked by default."""
    import onnxruntime as ort

    from explainrt.runtime.ort_engine import default_providers

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert default_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert default_providers("cpu") == ["CPUExecutionProvider"]


def test_tensorrt_provider_gets_a_batch_profile_and_an_engine_cache(engine, monkeypatch, tmp_path):
    import onnxruntime as ort

    seen = {}
    real = ort.InferenceSession

    def session(path, opts, providers):
        seen["providers"] = providers
        return real(path, opts, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", session)
    cache = str(tmp_path / "trt_cache")
    OnnxRuntimeEngine(engine.path, max_batch=16, providers=["TensorrtExecutionProvider", "CPUExecutionProvider"],
                      trt_cache_dir=cache)
    (name, options), cpu = seen["providers"]
    assert name == "TensorrtExecutionProvider" and cpu == "CPUExecutionProvider"
    assert options["trt_profile_min_shapes"] == "input:1x3x12x10"
    assert options["trt_profile_opt_shapes"] == options["trt_profile_max_shapes"] == "input:16x3x12x10"
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"] == cache
