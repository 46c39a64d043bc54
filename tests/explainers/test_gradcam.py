"""Gradient CAMs of the exported model against torch autograd on the nn.Module it came from.

The reference is written here from the papers' formulas (as pytorch-grad-cam computes them:
map at activation resolution, min–max, cv2 bilinear resize), on gradients taken by torch
autograd through the original module with a hook on the explained layer. Models with a CAM head
(global average pooling + one linear layer) must give the same maps forward-only on ONNX
Runtime; models with a deeper head need the torch engine.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from explainrt import Explainer
from explainrt.errors import InvalidInputError
from explainrt.export import export_torch
from explainrt.export.metadata import ModelMetadata

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from tests.conftest import random_rgb  # noqa: E402
from tests.transformer_models import ResidualCNN  # noqa: E402

METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam")


def reference_cams(module, layer_name, x, targets, method):
    """(T, H, W) maps in [0, 1] from autograd through ``module`` at ``layer_name``."""
    name, _, call = layer_name.partition("#")  # "module#k": the k-th call of a module used twice
    layer = dict(module.named_modules())[name]
    calls = []

    def keep(_, __, out):
        calls.append(out)
        if len(calls) == int(call or 0) + 1:
            out.retain_grad()
            store["a"] = out

    store = {}
    handle = layer.register_forward_hook(keep)
    try:
        maps = []
        for t in targets:
            module.zero_grad()
            calls, store = [], {}
            logits = module(torch.from_numpy(x))
            logits[0, t].backward()
            a = store["a"][0].detach().double().numpy()
            g = store["a"].grad[0].double().numpy()
            if method == "gradcam":
                cam = np.tensordot(g.mean(axis=(1, 2)), a, axes=1)
            elif method == "gradcam++":
                aij = g ** 2 / (2 * g ** 2 + a.sum(axis=(1, 2))[:, None, None] * g ** 3 + 1e-6)
                aij[g == 0] = 0
                cam = np.tensordot((np.maximum(g, 0) * aij).sum(axis=(1, 2)), a, axes=1)
            elif method == "xgradcam":
                cam = np.tensordot((g * a).sum(axis=(1, 2)) / (a.sum(axis=(1, 2)) + 1e-7), a, axes=1)
            else:
                cam = (np.maximum(g, 0) * a).sum(axis=0)
            cam = np.maximum(cam, 0)
            cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-12)
            maps.append(cv2.resize(cam.astype(np.float32), (x.shape[3], x.shape[2]), interpolation=cv2.INTER_LINEAR))
    finally:
        handle.remove()
    return np.stack(maps)


def pearson(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


class DeepHead(torch.nn.Module):
    """Convs, then GAP → Linear → ReLU → Linear: no CAM head, the gradient is image-dependent."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 12, 3, stride=2, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("gradcam")
    out = {"tiny": tiny_model}
    for name, module in (("residual", ResidualCNN(classes=6).eval()), ("deep", DeepHead().eval())):
        path = str(root / f"{name}.onnx")
        export_torch(module, path, input_size=(32, 32), mean=(120, 110, 100), std=(60, 60, 60))
        out[name] = (module, path)
    return out


def _x(explainer, img):
    return explainer.prepare(img).x


@pytest.mark.parametrize("name,head", [("tiny", True), ("residual", True), ("deep", False)])
def test_cam_head_detected_only_for_gap_plus_linear(models, name, head):
    meta = Explainer(models[name][1]).metadata
    assert (meta.cam_head is not None) == head, meta.cam_head


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["tiny", "residual", "deep"])
def test_torch_engine_gradients_match_autograd_on_the_module(models, name, method):
    module, path = models[name]
    meta = Explainer(path).metadata
    no_head = copy.deepcopy(meta)
    no_head.cam_head = None  # force the autograd path on every model
    from explainrt.runtime.torch_engine import TorchEngine

    ex = Explainer(TorchEngine(path, device="cpu", metadata=no_head))
    img = random_rgb(32, 32, seed=4)
    targets = [0, 2, 3]
    result = ex.explain(img, method, target=targets)  # one backward, batched over the targets
    assert result.extras["gradients"] == "autograd"
    want = reference_cams(module, meta.activation_layer, _x(ex, img), targets, method)
    for t in range(len(targets)):
        assert pearson(result.saliency_maps[t], want[t]) >= 0.99, (name, method, t)


@pytest.mark.parametrize("method", METHODS)
def test_cam_head_forward_only_on_onnx_runtime(models, method):
    module, path = models["residual"]
    ex = Explainer(path)  # ONNX Runtime: no gradients anywhere
    img = random_rgb(32, 32, seed=5)
    result = ex.explain(img, method, target=[1, 4])
    assert result.extras["gradients"] == "cam_head" and result.forward_passes == 1
    want = reference_cams(module, ex.metadata.activation_layer, _x(ex, img), [1, 4], method)
    for t in range(2):
        assert pearson(result.saliency_maps[t], want[t]) >= 0.99, (method, t)


def test_deep_head_needs_the_torch_engine(models):
    ex = Explainer(models["deep"][1])
    with pytest.raises(InvalidInputError, match="backend='torch'"):
        ex.explain(random_rgb(32, 32), "gradcam")
    with pytest.raises(InvalidInputError, match="backend='torch'"):  # prob scores are not linear in A
        Explainer(models["tiny"][1]).explain(random_rgb(32, 32), "gradcam", score="prob")


def test_prob_score_gradients(models):
    module, path = models["deep"]
    ex = Explainer(path, backend="torch", device="cpu")
    img = random_rgb(32, 32, seed=6)
    result = ex.explain(img, "gradcam", target=2, score="prob")
    layer = dict(module.named_modules())[ex.metadata.activation_layer]
    store = {}

    def keep(_, __, out):
        out.retain_grad()
        store["a"] = out

    handle = layer.register_forward_hook(keep)
    torch.softmax(module(torch.from_numpy(_x(ex, img))), 1)[0, 2].backward()
    handle.remove()
    a, g = store["a"][0].detach().numpy(), store["a"].grad[0].numpy()
    cam = np.maximum(np.tensordot(g.mean(axis=(1, 2)), a, axes=1), 0)
    want = cv2.resize(cam, (32, 32), interpolation=cv2.INTER_LINEAR)
    assert pearson(result.saliency, want) >= 0.99


def test_lite0_forward_only_and_autograd_match_the_module(lite0, chelsea):
    module, path = lite0
    ort = Explainer(path)
    assert ort.metadata.cam_head is not None  # conv head → GAP → (dropout) → Linear
    targets = [281, 285]
    x = _x(ort, chelsea)
    for method in ("gradcam", "gradcam++"):
        want = reference_cams(module, ort.metadata.activation_layer, x, targets, method)
        fast = ort.explain(chelsea, method, target=targets)
        assert fast.forward_passes == 1
        for t in range(2):
            assert pearson(fast.saliency_maps[t], want[t]) >= 0.99, (method, t)
    no_head = copy.deepcopy(ort.metadata)
    no_head.cam_head = None
    from explainrt.runtime.torch_engine import TorchEngine

    slow = Explainer(TorchEngine(path, device="cpu", metadata=no_head)).explain(chelsea, "gradcam", target=targets)
    want = reference_cams(module, ort.metadata.activation_layer, x, targets, "gradcam")
    for t in range(2):
        assert pearson(slow.saliency_maps[t], want[t]) >= 0.99


def test_metadata_round_trip_and_bad_cam_head(models):
    meta = Explainer(models["tiny"][1]).metadata
    again = ModelMetadata.from_json(meta.to_json())
    assert again.cam_head == meta.cam_head and meta.cam_head["layout"] == "KC"
    bad = meta.to_json().replace('"layout": "KC"', '"layout": "XY"')
    from explainrt.errors import ModelError

    with pytest.raises(ModelError, match="cam_head"):
        ModelMetadata.from_json(bad)


def test_cam_weights_found_through_a_tensorrt_plan_record(models, tmp_path):
    """A TensorRT engine runs a plan; the CAM weights come from the ONNX file its record names."""
    import json

    from explainrt.export.cam_head import class_weights, onnx_source
    from explainrt.runtime.tensorrt_build import plan_info_path

    module, path = models["tiny"]
    plan = str(tmp_path / "tiny.b8.fp32.plan")
    with open(plan_info_path(plan), "w") as fh:
        json.dump({"build": {"source": path, "max_batch": 8}}, fh)

    class PlanEngine:  # what the forward-only path reads of a TensorRT engine
        pass

    engine = PlanEngine()
    engine.path = plan
    assert onnx_source(engine) == path
    head = Explainer(path).metadata.cam_head
    np.testing.assert_array_equal(class_weights(engine, head), module[-1].weight.detach().numpy())
    # a plan deployed without the file its record names: a ModelError that says what to do
    with open(plan_info_path(plan), "w") as fh:
        json.dump({"build": {"source": str(tmp_path / "elsewhere" / "tiny.onnx"), "max_batch": 8}}, fh)
    from explainrt.errors import ModelError

    with pytest.raises(ModelError, match="is not there: put it at that path beside the plan"):
        class_weights(engine, head)


def test_server_gradcam_forward_only_on_onnx_runtime(models, tmp_path):
    pytest.importorskip("grpc")
    import os

    from explainrt.client import ExplainClient, RemoteError
    from explainrt.server import ExplainServer, ServerConfig

    root = tmp_path / "models"
    root.mkdir()
    for name in ("residual", "deep"):
        os.link(models[name][1], root / f"{name}.onnx")
    server = ExplainServer(ServerConfig(models=str(root), host="127.0.0.1", port=0, workers=1, threads=1)).start()
    try:
        with ExplainClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            img = random_rgb(32, 32, seed=8)
            got = client.explain(img, "gradcam++", target=[1, 2], model="residual")
            want = Explainer(models["residual"][1]).explain(img, "gradcam++", target=[1, 2])
            np.testing.assert_allclose(got.saliency_maps, want.saliency_maps, atol=1e-5)
            with pytest.raises(RemoteError, match="backend='torch'"):  # no CAM head: gradients needed
                client.explain(img, "gradcam", model="deep")
    finally:
        server.stop(grace=0)


def test_featurecam_over_gradcam_the_papers_base(models):
    """Feature CAM's paper blends edges into Grad-CAM/Grad-CAM++: forward-only with a CAM head."""
    path = models["residual"][1]
    img = random_rgb(32, 32, seed=9)
    ex = Explainer(path)
    fc = ex.explain(img, "featurecam", base="gradcam++", target=2)
    plain = ex.explain(img, "gradcam++", target=2)
    np.testing.assert_allclose(fc.base_saliency_maps[0], plain.saliency, atol=1e-6)
    with pytest.raises(InvalidInputError, match="backend='torch'"):
        Explainer(models["deep"][1]).explain(img, "featurecam", base="gradcam")
