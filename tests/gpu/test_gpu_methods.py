"""Every method on the GPU path against the CPU path, same model, same input.

Two comparisons: (1) the CPU ONNX Runtime engine behind a CuPy interface, so only the CUDA
kernels, the driver's device path and the double buffering differ from the CPU run (tight
tolerance); (2) the torch engine on CUDA, the real GPU pipeline (engine numerics differ).
"""
import numpy as np
import pytest

from explainrt import Explainer
from explainrt.runtime.base import Engine
from explainrt.runtime.ort_engine import OnnxRuntimeEngine

pytestmark = pytest.mark.gpu

METHODS = [
    ("sidu", {"threshold": 0.1}),
    ("scorecam", {}),
    ("scorecam", {"channel_softmax": True, "score": "logit", "baseline": True}),
    ("rise", {"n_masks": 300, "seed": 7}),
    ("fem", {"k": 1.0}),
    ("featurecam", {"base": "scorecam"}),
]


class DeviceProxyEngine(Engine):
    """A CPU engine with a CuPy interface: device arrays in and out, host numerics inside."""

    backend = "proxy"
    device = "cuda"

    def __init__(self, inner: Engine, cp):
        super().__init__(inner.metadata, inner.max_batch)
        self.inner, self.xp = inner, cp

    @property
    def inputs(self):
        return self.inner.inputs

    @property
    def outputs(self):
        return self.inner.outputs

    def _run(self, inputs, output_names):
        host = {k: self.xp.asnumpy(v) for k, v in inputs.items()}
        return {k: self.xp.asarray(v) for k, v in self.inner._run(host, output_names).items()}


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(11).integers(0, 256, (48, 40, 3), dtype=np.uint8)


@pytest.mark.parametrize("method,params", METHODS)
def test_gpu_kernels_and_driver_match_cpu(cp, tiny_model_path, image, method, params):
    cpu = Explainer(tiny_model_path, batch_size=16)
    gpu = Explainer(DeviceProxyEngine(OnnxRuntimeEngine(tiny_model_path, max_batch=16), cp), batch_size=16)
    assert gpu.xp is cp
    want = cpu.explain(image, method, target=[3, 1], **params)
    got = gpu.explain(image, method, target=[3, 1], **params)
    assert got.forward_passes == want.forward_passes
    assert isinstance(got.saliency_maps, np.ndarray)
    scale = max(1.0, float(np.abs(want.raw_maps).max()))
    np.testing.assert_allclose(got.raw_maps, want.raw_maps, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(got.saliency_maps, want.saliency_maps, atol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_chunking_and_double_buffering_do_not_change_scores(cp, tiny_model_path, image, batch_size):
    """Odd chunk sizes exercise both buffers and a short last chunk."""
    cpu = Explainer(tiny_model_path, batch_size=64).explain(image, "rise", n_masks=100)
    gpu = Explainer(DeviceProxyEngine(OnnxRuntimeEngine(tiny_model_path, max_batch=64), cp), batch_size=batch_size)
    np.testing.assert_allclose(gpu.explain(image, "rise", n_masks=100).saliency_maps, cpu.saliency_maps, atol=1e-4)


@pytest.mark.parametrize("method,params", METHODS)
def test_torch_cuda_pipeline_matches_cpu(cp, tiny_model_path, image, method, params):
    pytest.importorskip("torch")
    cpu = Explainer(tiny_model_path, batch_size=32)
    gpu = Explainer(tiny_model_path, backend="torch", device="cuda", batch_size=32)
    want = cpu.explain(image, method, **params)
    got = gpu.explain(image, method, **params)
    assert got.targets == want.targets and got.forward_passes == want.forward_passes
    np.testing.assert_allclose(got.saliency_maps, want.saliency_maps, atol=2e-3)


@pytest.mark.parametrize("method,params", [("sidu", {"threshold": 0.1}), ("scorecam", {}), ("rise", {"n_masks": 200})])
def test_torch_cuda_fp16_pipeline_matches_cpu(cp, tiny_model_path, image, method, params):
    """The FP16 driver path (masked_batch_f16 into a half buffer → torch in fp16), no Lite0 needed."""
    pytest.importorskip("torch")
    want = Explainer(tiny_model_path, batch_size=32).explain(image, method, **params)
    gpu = Explainer(tiny_model_path, backend="torch", device="cuda", batch_size=32, fp16=True)
    assert gpu.engine.input_dtype == "float16"
    got = gpu.explain(image, method, **params)
    assert got.targets == want.targets and got.forward_passes == want.forward_passes
    np.testing.assert_allclose(got.saliency_maps, want.saliency_maps, atol=3e-2)


@pytest.mark.parametrize("method,params", [("scorecam", {}), ("rise", {"n_masks": 500}), ("fem", {})])
def test_lite0_gpu_maps_match_cpu(cp, lite0_path, method, params):
    pytest.importorskip("torch")
    image = np.random.default_rng(3).integers(0, 256, (240, 260, 3), dtype=np.uint8)
    want = Explainer(lite0_path, batch_size=32).explain(image, method, **params)
    got = Explainer(lite0_path, backend="torch", device="cuda", batch_size=64).explain(image, method, **params)
    assert got.targets == want.targets
    np.testing.assert_allclose(got.saliency_maps, want.saliency_maps, atol=5e-3)


def test_cancel_between_chunks_on_gpu(cp, tiny_model_path, image):
    import threading

    from explainrt.explainers.driver import Cancelled

    gpu = Explainer(DeviceProxyEngine(OnnxRuntimeEngine(tiny_model_path, max_batch=8), cp), batch_size=8)
    cancel = threading.Event()

    def progress(done, total):
        if done >= 16:
            cancel.set()

    with pytest.raises(Cancelled):
        gpu.explain(image, "rise", n_masks=80, progress=progress, cancel=cancel)
    # the explainer still works after a cancelled request
    assert gpu.explain(image, "fem").saliency_maps.shape == (1, 48, 40)
