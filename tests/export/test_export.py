"""Export parity: the ONNX file explainrt writes gives the torch model's numbers through ORT."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from explainrt import Explainer, ModelError, load_model
from explainrt.errors import InvalidInputError
from explainrt.export import expose_activation, export_torch, find_activation_layer
from explainrt.export.metadata import METADATA_KEY, ModelMetadata
from explainrt.imaging import prepare_image

torch = pytest.importorskip("torch")
from tests.conftest import tiny_cnn  # noqa: E402


def torch_outputs(model, x, layer_index: int):
    """Logits and the output of model[layer_index] for a Sequential model."""
    acts = []
    handle = model[layer_index].register_forward_hook(lambda _m, _i, o: acts.append(o))
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    handle.remove()
    return logits.numpy(), acts[-1].numpy()


def test_tiny_export_matches_torch(tiny_model):
    model, path = tiny_model
    engine = load_model(path, max_batch=8)
    meta = engine.metadata
    assert meta.input_size == (32, 32) and meta.activation_shape == (12, 8, 8) and meta.num_classes == 5
    assert meta.activation_layer == "3"  # the last ReLU before pooling
    x = np.random.default_rng(1).standard_normal((6, 3, 32, 32)).astype(np.float32)
    out = engine.infer(x)
    logits, acts = torch_outputs(model, x, 3)
    np.testing.assert_allclose(out["logits"], logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["activations"], acts, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["probs"], torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-6)


def test_metadata_round_trip(tiny_model):
    _, path = tiny_model
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    meta = ModelMetadata.from_json(props[METADATA_KEY])
    assert meta.mean == (120.0, 110.0, 100.0) and meta.std == (60.0, 60.0, 60.0)
    assert meta.labels == [f"thing{i}" for i in range(5)] and meta.label(2) == "thing2"
    model = onnx.load(path)
    assert model.opset_import[0].version >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_named_layer_and_unknown_layer(tmp_path):
    model = tiny_cnn()
    meta = export_torch(model, str(tmp_path / "l1.onnx"), input_size=(32, 32), layer="1")
    assert meta.activation_shape == (8, 32, 32)
    with pytest.raises(InvalidInputError, match="no module named"):
        export_torch(model, str(tmp_path / "bad.onnx"), input_size=(32, 32), layer="nope")


def test_find_activation_layer_skips_pooled_outputs():
    # AdaptiveAvgPool2d's (N, C, 1, 1) output is 4-D but is not a feature map
    assert find_activation_layer(tiny_cnn(), torch.zeros(1, 3, 32, 32))[:2] == ("3", 0)


def _plain_onnx(model, path, softmax: bool = False, batch_dynamic: bool = False):
    net = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)) if softmax else model
    kwargs = {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}} if batch_dynamic else {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(1, 3, 32, 32),), path, input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False, **kwargs)


@pytest.mark.parametrize("softmax", [False, True])
def test_expose_activation_of_plain_onnx(tmp_path, softmax):
    model = tiny_cnn()
    src, dst = str(tmp_path / "plain.onnx"), str(tmp_path / "exposed.onnx")
    _plain_onnx(model, src, softmax=softmax)  # batch fixed at 1, no activation output
    meta = expose_activation(src, dst)
    assert meta.activation_shape == (12, 8, 8) and meta.num_classes == 5
    onnx.checker.check_model(onnx.load(dst))
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = load_model(dst).infer(x)
    logits, acts = torch_outputs(model, x, 3)
    np.testing.assert_allclose(out[meta.activation_output], acts, atol=1e-5)
    np.testing.assert_allclose(out[meta.logits_output], logits, atol=1e-5)
    np.testing.assert_allclose(out[meta.probs_output].sum(axis=1), 1.0, atol=1e-5)


def test_expose_named_activation_and_errors(tmp_path):
    src = str(tmp_path / "plain.onnx")
    _plain_onnx(tiny_cnn(), src, batch_dynamic=True)
    names = [n.output[0] for n in onnx.load(src).graph.node]
    first_relu = next(n.output[0] for n in onnx.load(src).graph.node if n.op_type == "Relu")
    meta = expose_activation(src, str(tmp_path / "named.onnx"), activation=first_relu)
    assert meta.activation_shape == (8, 32, 32)
    with pytest.raises(InvalidInputError, match="no tensor named"):
        expose_activation(src, str(tmp_path / "x.onnx"), activation="missing_tensor")
    with pytest.raises(InvalidInputError, match="is the model's input, not an activation"):
        expose_activation(src, str(tmp_path / "x.onnx"), activation=onnx.load(src).graph.input[0].name)
    logits = onnx.load(src).graph.output[0].name
    with pytest.raises(InvalidInputError, match=r"has shape \(N, 5\); explainrt explains a 4-D"):
        expose_activation(src, str(tmp_path / "failed.onnx"), activation=logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named.onnx", "plain.onnx"], "a failed export left a file"
    with pytest.raises(InvalidInputError, match="input size must be positive"):
        expose_activation(src, str(tmp_path / "x.onnx"), input_size=(0, 0))
    with pytest.raises(ModelError, match="not found"):
        expose_activation(str(tmp_path / "nope.onnx"), str(tmp_path / "x.onnx"))
    assert names  # the graph is non-empty


def test_model_without_metadata_is_refused(tmp_path):
    src = str(tmp_path / "plain.onnx")
    _plain_onnx(tiny_cnn(), src, batch_dynamic=True)
    with pytest.raises(ModelError, match="no explainrt metadata"):
        Explainer(src)


@pytest.mark.slow
def test_lite0_export_matches_torch(lite0, chelsea):
    model, path = lite0
    engine = load_model(path, max_batch=4)
    x = prepare_image(chelsea, engine.metadata).x
    base = engine.base_pass(x)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()[0]
        feats = model.extract_features(torch.from_numpy(x)).numpy()[0]  # head ReLU6 output
    np.testing.assert_allclose(base.logits, logits, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(base.activations, feats, atol=2e-4, rtol=1e-4)
    assert base.activations.shape == (1280, 7, 7)
    assert int(np.argmax(base.probs)) in range(281, 286)
