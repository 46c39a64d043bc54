"""GPU engines against ONNX Runtime on the CPU: torch on CUDA, ORT with IOBinding, TensorRT."""
import numpy as np
import pytest

from explainrt.runtime import load_engine
from explainrt.runtime.ort_engine import OnnxRuntimeEngine

pytestmark = pytest.mark.gpu


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-12))


def _batch(engine, n, seed=0):
    h, w = engine.metadata.input_size
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


def _check(cp, engine, path, tol, batches=(1, 5, 8)):
    reference = OnnxRuntimeEngine(path, max_batch=max(batches))
    for n in batches:
        x = _batch(engine, n, seed=n)
        got = engine.infer(cp.asarray(x))
        want = reference.infer(x)
        assert set(got) == set(want)
        for name, value in got.items():
            assert isinstance(value, cp.ndarray) and value.dtype == cp.float32
            err = rel_err(cp.asnumpy(value), want[name])
            assert err < tol, f"batch {n}, {name}: relative error {err:.2e}"


@pytest.mark.parametrize("model", ["tiny", "lite0"])
def test_torch_cuda_matches_ort_cpu(cp, request, model):
    pytest.importorskip("torch")
    path = request.getfixturevalue("tiny_model_path" if model == "tiny" else "lite0_path")
    engine = load_engine(path, backend="torch", device="cuda", max_batch=8)
    assert engine.xp is cp and engine.input_dtype == "float32"
    _check(cp, engine, path, 1e-4)


@pytest.mark.parametrize("model", ["tiny", "lite0"])  # tiny: the FP16 path runs without the Lite0 packages
def test_torch_cuda_fp16(cp, request, model):
    pytest.importorskip("torch")
    path = request.getfixturevalue("tiny_model_path" if model == "tiny" else "lite0_path")
    engine = load_engine(path, backend="torch", device="cuda", max_batch=8, fp16=True)
    assert engine.input_dtype == "float16"
    _check(cp, engine, path, 2e-2)
    # a float32 input, misaligned, is staged (cast + aligned copy) on the engine's stream
    x = cp.asarray(_batch(engine, 5, seed=9))
    flat = cp.empty(x.size + 3, dtype=cp.float32)
    view = flat[3:].reshape(x.shape)
    view[...] = x
    want = OnnxRuntimeEngine(path, max_batch=8).infer(cp.asnumpy(x))["probs"]
    assert rel_err(cp.asnumpy(engine.infer(view)["probs"]), want) < 2e-2


def test_torch_cuda_graphs_replay_the_eager_result(cp, tiny_model_path):
    pytest.importorskip("torch")
    eager = load_engine(tiny_model_path, backend="torch", device="cuda", max_batch=8)
    graphed = load_engine(tiny_model_path, backend="torch", device="cuda", max_batch=8, cuda_graphs=True)
    for n in (8, 3, 8, 4, 7):  # replay, a second graph (bucket 4), replay again, bucket 4 again, bucket 8
        x = cp.asarray(_batch(eager, n, seed=n))
        a, b = eager.infer(x), graphed.infer(x)
        for name in a:
            np.testing.assert_allclose(cp.asnumpy(b[name]), cp.asnumpy(a[name]), rtol=1e-5, atol=1e-6)
    assert len(graphed._graphs) == 2 and graphed._graphs.captures == 2


@pytest.mark.parametrize("stream_kind", ["non_blocking", "per_thread_default"])
def test_torch_engine_follows_the_cupy_stream(cp, tiny_model_path, stream_kind):
    pytest.importorskip("torch")
    engine = load_engine(tiny_model_path, backend="torch", device="cuda", max_batch=8)
    x = _batch(engine, 4)
    stream = cp.cuda.Stream(non_blocking=True) if stream_kind == "non_blocking" else cp.cuda.Stream.ptds
    with stream:
        out = engine.infer(cp.asarray(x))
        probs = out["probs"] * 1.0
    stream.synchronize()
    want = OnnxRuntimeEngine(tiny_model_path, max_batch=8).infer(x)["probs"]
    assert rel_err(cp.asnumpy(probs), want) < 1e-4


def test_ort_cuda_iobinding(cp, tiny_model_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with the CUDA execution provider is not installed")
    engine = OnnxRuntimeEngine(tiny_model_path, max_batch=8, device="cuda",
                               providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert engine.xp is cp
    _check(cp, engine, tiny_model_path, 1e-4)


@pytest.mark.trt
@pytest.mark.parametrize("fp16,tol", [(False, 1e-3), (True, 3e-2)])
def test_tensorrt_matches_ort_cpu(cp, tmp_path, lite0_path, fp16, tol):
    pytest.importorskip("tensorrt")
    from explainrt.runtime.tensorrt_build import build_plan, read_plan_info
    from explainrt.runtime.tensorrt_engine import TensorRTEngine

    plan = str(tmp_path / f"lite0.{'fp16' if fp16 else 'fp32'}.plan")
    info = build_plan(lite0_path, plan, max_batch=8, fp16=fp16, opt_batch=4)
    assert info["build"]["fp16"] is fp16 and read_plan_info(plan)["metadata"]["activation_output"] == "activations"
    engine = TensorRTEngine(plan, max_batch=8)
    _check(cp, engine, lite0_path, tol, batches=(1, 5, 8, 5))  # shape changes and repeats
    with pytest.raises(Exception):
        TensorRTEngine(plan, max_batch=16)  # built for 8


@pytest.mark.trt
def test_tensorrt_from_onnx_and_cli(cp, tmp_path, tiny_model_path):
    pytest.importorskip("tensorrt")
    import shutil

    from explainrt import cli
    from explainrt.runtime.tensorrt_build import default_plan_path

    model = str(tmp_path / "tiny.onnx")
    shutil.copy(tiny_model_path, model)
    assert cli.main(["build", model, "--max-batch", "8", "-o", str(tmp_path / "tiny.plan")]) == 0
    engine = load_engine(str(tmp_path / "tiny.plan"), backend="tensorrt", device="cuda", max_batch=8)
    _check(cp, engine, model, 1e-3)
    built = load_engine(model, backend="tensorrt", device="cuda", max_batch=4)  # builds beside the ONNX file
    assert built.path == default_plan_path(model, 4, False)
    _check(cp, built, model, 1e-3, batches=(1, 4))


@pytest.mark.trt
def test_tensorrt_explanations_match_cpu(cp, tiny_model_path):
    pytest.importorskip("tensorrt")
    from explainrt import Explainer

    image = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    for method, params in (("scorecam", {}), ("rise", {"n_masks": 200}), ("sidu", {"threshold": 0.1})):
        want = Explainer(tiny_model_path, batch_size=16).explain(image, method, **params)
        got = Explainer(tiny_model_path, backend="tensorrt", device="cuda", batch_size=16).explain(
            image, method, **params)
        np.testing.assert_allclose(got.saliency_maps, want.saliency_maps, atol=5e-3)
