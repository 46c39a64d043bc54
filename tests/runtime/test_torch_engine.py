"""The torch engine (ONNX → torch interpreter) against ONNX Runtime, on the CPU.

The same interpreter runs on CUDA in the GPU tests; here it is checked op by op through
small CNNs exported in the test, and on the real EfficientNet-Lite0 export.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from explainrt import Explainer  # noqa: E402
from explainrt.errors import InvalidInputError, ModelError  # noqa: E402
from explainrt.export import export_torch  # noqa: E402
from explainrt.runtime import load_engine  # noqa: E402
from explainrt.runtime.ort_engine import OnnxRuntimeEngine  # noqa: E402
from explainrt.runtime.torch_engine import TorchEngine  # noqa: E402


class ResidualNet(nn.Module):
    """Conv/BN/ReLU stem, max-pool, a residual block with a free-standing BatchNorm, ceil-mode
    average pooling without padded cells, flatten and a linear head."""

    def __init__(self, classes=7):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.post_bn = nn.BatchNorm2d(8)
        self.features = nn.Conv2d(8, 12, 3, padding=(1, 2), dilation=(1, 2))
        self.avg = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.head = nn.Linear(12 * 6 * 5, classes)  # at 40x36

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.post_bn(F.relu(x + self.block(x)))  # BN after Add stays a BatchNormalization node
        x = F.leaky_relu(self.features(x), 0.1)
        return self.head(torch.flatten(self.avg(x), 1))


class MobileNet(nn.Module):
    """Depthwise convs, ReLU6, hard-swish, a squeeze-excite block with hard-sigmoid, asymmetric
    padding, channel split/concat, GELU/tanh/sigmoid, ReduceMean and a view(N, -1) head."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.pw = nn.Conv2d(16, 24, 1)
        self.last = nn.Conv2d(24, 32, 3, padding=1)
        self.fc = nn.Linear(32, classes)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        x = F.relu6(self.stem(F.pad(x, (0, 1, 0, 1))))  # TF-style "same" padding
        x = F.hardswish(self.dw(x))
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(s))))
        x = x * s
        a, b = torch.split(self.pw(x), 12, dim=1)
        x = torch.cat([F.gelu(a), torch.tanh(b) * torch.sigmoid(b)], dim=1)
        x = F.max_pool2d(F.pad(x, (1, 0, 1, 0), value=-1e4), 2)
        x = F.elu(self.last(x))
        x = x.mean(dim=(2, 3))
        return self.fc(self.drop(x.view(x.size(0), -1)))


def _export(model, tmp_path, name, size):
    torch.manual_seed(0)
    for module in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    path = str(tmp_path / f"{name}.onnx")
    export_torch(model.eval(), path, input_size=size)
    return path


@pytest.fixture(scope="module")
def lite0_path(lite0):
    return lite0[1]  # the session's EfficientNet-Lite0 export (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torch_engine")
    torch.manual_seed(0)
    return {"residual": _export(ResidualNet(), tmp, "residual", (40, 36)),
            "mobile": _export(MobileNet(), tmp, "mobile", (33, 47))}


def _compare(path, x, rtol=1e-4):
    torch_engine = TorchEngine(path, max_batch=8, device="cpu")
    ort_engine = OnnxRuntimeEngine(path, max_batch=8)
    got, want = torch_engine.infer(x), ort_engine.infer(x)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == np.float32
        scale = max(float(np.abs(want[name]).max()), 1e-6)
        err = float(np.abs(got[name] - want[name]).max()) / scale
        assert err < rtol, f"{name}: relative error {err:.2e}"
    return torch_engine


@pytest.mark.parametrize("name", ["residual", "mobile"])
def test_tiny_cnns_match_onnxruntime(tiny_models, name):
    path = tiny_models[name]
    engine = TorchEngine(path, max_batch=8, device="cpu")
    h, w = engine.metadata.input_size
    x = np.random.default_rng(2).standard_normal((3, 3, h, w)).astype(np.float32)
    _compare(path, x)


def test_interpreter_covers_the_exported_ops(tiny_models):
    engine = TorchEngine(tiny_models["mobile"], max_batch=2, device="cpu")
    ran = {n.op_type for n in engine.graph.nodes}
    # the export really exercised these paths (otherwise the parity test proves little)
    assert {"Conv", "Clip", "HardSwish", "HardSigmoid", "Mul", "Split", "Concat", "MaxPool", "Pad", "Erf",
            "ReduceMean", "Reshape", "Gemm", "Softmax", "Elu"} <= ran, sorted(ran)
    resid = TorchEngine(tiny_models["residual"], max_batch=2, device="cpu")
    assert {"BatchNormalization", "AveragePool", "MaxPool", "Add", "LeakyRelu", "Flatten"} <= \
        {n.op_type for n in resid.graph.nodes}


def test_batch_sizes_and_output_subsets(tiny_models):
    path = tiny_models["residual"]
    engine = TorchEngine(path, max_batch=8, device="cpu")
    ref = OnnxRuntimeEngine(path, max_batch=8)
    h, w = engine.metadata.input_size
    for batch in (1, 5, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 3, h, w)).astype(np.float32)
        out = engine.infer(x, ["probs"])
        assert list(out) == ["probs"]
        np.testing.assert_allclose(out["probs"], ref.infer(x, ["probs"])["probs"], atol=1e-5)
    with pytest.raises(InvalidInputError):
        engine.infer(np.zeros((9, 3, h, w), np.float32))


def test_efficientnet_lite0_matches_onnxruntime(lite0_path):
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    engine = _compare(lite0_path, x)
    assert engine.metadata.activation_shape == (1280, 7, 7)


def test_explanations_match_the_onnxruntime_engine(tiny_models):
    path = tiny_models["residual"]
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    with Explainer(path, backend="torch", device="cpu", batch_size=4) as torch_explainer, \
            Explainer(path, batch_size=4) as ort_explainer:
        for method, params in (("scorecam", {}), ("rise", {"n_masks": 40}), ("sidu", {"threshold": 0.0})):
            a = torch_explainer.explain(image, method, **params)
            b = ort_explainer.explain(image, method, **params)
            assert a.targets == b.targets and a.forward_passes == b.forward_passes
            np.testing.assert_allclose(a.saliency_maps, b.saliency_maps, atol=1e-3)


def test_load_engine_picks_the_torch_backend(tiny_models):
    engine = load_engine(tiny_models["mobile"], backend="torch", device="cpu", max_batch=3)
    assert isinstance(engine, TorchEngine) and engine.xp is np and engine.max_batch == 3
    assert [i.name for i in engine.inputs] == ["input"]
    assert {o.name for o in engine.outputs} == {"logits", "probs", "activations"}


def test_fp16_and_cuda_graphs_need_cuda(tiny_models):
    with pytest.raises(InvalidInputError, match="device='cuda'"):
        TorchEngine(tiny_models["mobile"], device="cpu", fp16=True)
    with pytest.raises(InvalidInputError, match="device='cuda'"):
        TorchEngine(tiny_models["mobile"], device="cpu", cuda_graphs=True)


def test_unsupported_op_is_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from explainrt.runtime.onnx_torch import TorchGraph

    graph = helper.make_graph(
        [helper.make_node("LRN", ["x"], ["y"], size=3), helper.make_node("Relu", ["y"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match="LRN") as info:
        TorchGraph(model)
    assert "Relu" not in str(info.value).split("supports")[0]


def test_missing_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        TorchEngine(str(tmp_path / "nope.onnx"), device="cpu")


def test_model_without_metadata_is_rejected(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    path = str(tmp_path / "plain.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ModelError, match="explainrt metadata"):
        TorchEngine(path, device="cpu")


@pytest.mark.parametrize("name", ["residual", "mobile", "lite0"])
def test_graph_never_reads_device_values(request, tiny_models, name):
    """On torch's 'meta' device any read of a tensor's values raises: running the graph there
    shows no op reads device memory on the host (each read would synchronise the GPU and
    break CUDA graph capture). Only shapes flow."""
    import onnx

    from explainrt.runtime.onnx_torch import TorchGraph

    path = request.getfixturevalue("lite0_path") if name == "lite0" else tiny_models[name]
    model = onnx.load(path)
    graph = TorchGraph(model, device="meta")
    engine = TorchEngine(path, device="cpu")
    h, w = engine.metadata.input_size
    out = graph.run({"input": torch.empty(3, 3, h, w, device="meta")}, ["probs", "activations"])
    assert out["probs"].device.type == "meta" and out["probs"].shape == (3, engine.metadata.num_classes)
    assert tuple(out["activations"].shape) == (3, *engine.metadata.activation_shape)


def test_cuda_graph_buckets_bound_the_captures():
    """SIDU's last chunk varies per image: every batch size maps to one of a few buckets."""
    from explainrt.runtime.torch_engine import GraphCache, bucket_for, graph_buckets

    assert graph_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    buckets = graph_buckets(128)
    assert {bucket_for(b, buckets) for b in range(1, 129)} == set(buckets)
    assert all(bucket_for(b, buckets) >= b for b in range(1, 129))
    with pytest.raises(InvalidInputError):
        bucket_for(129, buckets)
    cache = GraphCache(capacity=4)
    made = []
    for b in list(range(1, 129)) * 2:  # every last-chunk size, twice
        key = (bucket_for(b, buckets), ("probs",))
        cache.get(key, lambda: made.append(key) or key)
    assert len(cache) == 4 and cache.captures == len(made)
    assert cache.keys() == [(k, ("probs",)) for k in (16, 32, 64, 128)]  # the most recently used
    assert len(made) < 2 * len(buckets) + 1  # nowhere near one capture per request
