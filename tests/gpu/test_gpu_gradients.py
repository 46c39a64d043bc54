"""Gradient methods on the CUDA torch engine against the CPU torch engine (same exported model).

Not yet run on a GPU (no device in the session that wrote it).
"""
import copy

import numpy as np
import pytest

from explainrt import Explainer

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(12).integers(0, 256, (48, 40, 3), dtype=np.uint8)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_gradient_cams_on_cuda_match_cpu(cp, tiny_model_path, image, method):
    pytest.importorskip("torch")
    from explainrt.runtime.torch_engine import TorchEngine

    meta = copy.deepcopy(Explainer(tiny_model_path).metadata)
    meta.cam_head = None  # the autograd path on both devices
    cpu = Explainer(TorchEngine(tiny_model_path, device="cpu", metadata=meta))
    gpu = Explainer(TorchEngine(tiny_model_path, device="cuda", metadata=meta))
    want = cpu.explain(image, method, target=[0, 3])
    got = gpu.explain(image, method, target=[0, 3])
    assert got.extras["gradients"] == "autograd"
    np.testing.assert_allclose(got.saliency_maps, want.saliency_maps, atol=2e-3)


def test_fgvis_on_cuda_matches_cpu(cp, tiny_model_path, image):
    pytest.importorskip("torch")
    cpu = Explainer(tiny_model_path, backend="torch", device="cpu")
    gpu = Explainer(tiny_model_path, backend="torch", device="cuda")
    want = cpu.explain(image, "fgvis", target=1, iterations=20, game="preservation")
    got = gpu.explain(image, "fgvis", target=1, iterations=20, game="preservation")
    assert got.masks.shape == want.masks.shape and isinstance(got.masks, np.ndarray)
    # Adam's normalised steps amplify rounding where the gradient is ~0: compare loosely
    assert np.abs(got.masks - want.masks).mean() < 0.02
    assert np.corrcoef(got.saliency.ravel(), want.saliency.ravel())[0, 1] > 0.95
