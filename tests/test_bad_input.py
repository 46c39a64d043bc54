"""Bad input raises the project's exceptions with messages that say what was wrong."""
from __future__ import annotations

import numpy as np
import pytest

from explainrt import Explainer, InvalidInputError, ModelError


@pytest.fixture(scope="module")
def explainer(tiny_model):
    return Explainer(tiny_model[1], batch_size=8)


def test_corrupt_image_file(explainer, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(InvalidInputError, match="could not decode"):
        explainer.explain(str(bad), "fem")


def test_missing_image_file(explainer, tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        explainer.explain(str(tmp_path / "nope.jpg"), "fem")


def test_corrupt_bytes(explainer):
    with pytest.raises(InvalidInputError, match="could not decode"):
        explainer.explain(b"garbage", "fem")


@pytest.mark.parametrize("shape,match", [
    ((10, 10, 5), "expected an RGB image"),
    ((4, 10, 10, 3), "expected an RGB image"),
])
def test_wrong_image_shape(explainer, shape, match):
    with pytest.raises(InvalidInputError, match=match):
        explainer.explain(np.zeros(shape, np.uint8), "fem")


def test_wrong_dtype(explainer):
    with pytest.raises(InvalidInputError, match="uint8"):
        explainer.explain(np.zeros((10, 10, 3), np.int32), "fem")


def test_wrong_preprocessed_shape(explainer):
    with pytest.raises(InvalidInputError, match=r"shape \(3, 32, 32\)"):
        explainer.explain(np.zeros((3, 16, 16), np.float32), "fem")


def test_nan_in_preprocessed(explainer):
    x = np.zeros((1, 3, 32, 32), np.float32)
    x[0, 1, 2, 3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        explainer.explain(x, "fem")


def test_grey_and_rgba_are_accepted(explainer, rgb_image):
    assert explainer.explain(rgb_image[:, :, 0], "fem").saliency.shape == (32, 32)
    rgba = np.concatenate([rgb_image, np.full(rgb_image.shape[:2] + (1,), 255, np.uint8)], axis=2)
    assert explainer.explain(rgba, "fem").saliency.shape == (32, 32)


def test_unknown_method(explainer, rgb_image):
    with pytest.raises(InvalidInputError, match="unknown method 'lime'.*sidu"):
        explainer.explain(rgb_image, "lime")


def test_unknown_parameter(explainer, rgb_image):
    with pytest.raises(InvalidInputError, match="unknown parameter.*n_mask.*rise"):
        explainer.explain(rgb_image, "rise", n_mask=10)


@pytest.mark.parametrize("target", [5, -1, [0, 9]])
def test_target_out_of_range(explainer, rgb_image, target):
    with pytest.raises(InvalidInputError, match="out of range.*5 classes"):
        explainer.explain(rgb_image, "fem", target=target)


def test_target_wrong_type(explainer, rgb_image):
    with pytest.raises(InvalidInputError, match="class index"):
        explainer.explain(rgb_image, "fem", target="cat")


def test_missing_model(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Explainer(str(tmp_path / "missing.onnx"))


def test_not_an_onnx_file(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelError, match="could not load"):
        Explainer(str(junk))


def test_unknown_backend(tiny_model):
    with pytest.raises(InvalidInputError, match="unknown backend"):
        Explainer(tiny_model[1], backend="tflite")


def test_bad_batch_size(tiny_model):
    with pytest.raises(InvalidInputError, match="batch_size"):
        Explainer(tiny_model[1], batch_size=0)


def test_zero_dim_numpy_target(explainer, rgb_image):
    assert explainer.explain(rgb_image, "fem", target=np.array(3)).target == 3


def test_bad_normalisation_is_refused_at_export(tmp_path):
    from explainrt.export import export_torch
    from tests.conftest import tiny_cnn

    with pytest.raises(ModelError, match="std must be positive"):
        export_torch(tiny_cnn(), str(tmp_path / "m.onnx"), input_size=(32, 32), std=(0, 0, 0))
    with pytest.raises(ModelError, match="mean must be 3 finite numbers"):
        export_torch(tiny_cnn(), str(tmp_path / "m.onnx"), input_size=(32, 32), mean=(0, float("nan"), 0))


def test_model_producing_nan_is_reported(tiny_model, rgb_image):
    from explainrt.runtime.base import BasePass

    engine = Explainer(tiny_model[1]).engine
    real = engine.base_pass
    engine.base_pass = lambda x: BasePass(np.full_like(real(x).probs, np.nan), None, real(x).activations)
    with pytest.raises(ModelError, match="NaN/Inf probabilities"):
        Explainer(engine).explain(rgb_image, "fem")


def test_rise_grid_larger_than_the_image(explainer, rgb_image):
    with pytest.raises(InvalidInputError, match="grid_size"):
        explainer.explain(rgb_image, "rise", n_masks=4, grid_size=33)


def test_non_rgb_torch_model_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    from explainrt.export import export_torch

    grey = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ModelError, match=r"does not run on a \(1, 3, 16, 16\) RGB batch"):
        export_torch(grey, str(tmp_path / "g.onnx"), input_size=(16, 16))


def _with_metadata(src: str, dst, text: str) -> str:
    """A copy of the model ``src`` whose explainrt metadata is replaced by ``text``."""
    import onnx

    model = onnx.load(src)
    for prop in model.metadata_props:
        if prop.key == "explainrt":
            prop.value = text
    onnx.save(model, str(dst))
    return str(dst)


def _edited_metadata(src: str, dst, **changes) -> str:
    import json

    import onnx

    props = {p.key: p.value for p in onnx.load(src).metadata_props}
    return _with_metadata(src, dst, json.dumps({**json.loads(props["explainrt"]), **changes}))


@pytest.mark.parametrize("edit,message", [
    ("[1, 2]", "must be a JSON object"),
    ({"input_size": "abc"}, "'input_size' must be 2 positive integers"),
    ({"input_size": [0, 0]}, "'input_size' must be 2 positive integers"),
    ({"activation_shape": [12, -8, 8]}, "'activation_shape' must be 3 positive integers"),
    ({"num_classes": "5"}, "'num_classes' must be 1 positive integers"),
    ({"probs_output": 3}, "'probs_output' must name a tensor"),
    ({"labels": "cat"}, "'labels' must be a list of strings"),
    ({"mean": 5}, "mean must be 3 finite numbers"),
])
def test_malformed_metadata_is_a_model_error(tiny_model, tmp_path, edit, message):
    path = (_with_metadata(tiny_model[1], tmp_path / "m.onnx", edit) if isinstance(edit, str)
            else _edited_metadata(tiny_model[1], tmp_path / "m.onnx", **edit))
    with pytest.raises(ModelError, match=message):
        Explainer(path)


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": "a"}, "batch_size must be an integer"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"max_batch": True}, "max_batch must be an integer"),
    ({"threads": -1}, "threads must be an integer >= 1"),
])
def test_engine_options_are_checked(tiny_model, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        Explainer(tiny_model[1], **kwargs)


@pytest.mark.parametrize("method,params,message", [
    ("rise", {"n_masks": 2**70}, "n_masks=.* is out of range"),
    ("rise", {"seed": 10**400}, "seed=.* is out of range"),
    ("rise", {"p1": 10**400}, "p1 must be a float"),
    ("sidu", {"sigma": "1e999"}, "sigma must be finite"),
])
def test_huge_parameters_are_refused(explainer, rgb_image, method, params, message):
    with pytest.raises(InvalidInputError, match=message):
        explainer.explain(rgb_image, method, **params)


def test_method_must_be_one_name(explainer, rgb_image):
    with pytest.raises(InvalidInputError, match="unknown method"):
        explainer.explain(rgb_image, ["sidu"])


def test_directory_is_not_an_image(explainer, tmp_path):
    with pytest.raises(InvalidInputError, match="is a directory, not an image file"):
        explainer.explain(str(tmp_path), "fem")


def _edge_model(path, torch) -> str:
    """A stand-in HED: one 3x3 convolution of the BGR image and a sigmoid, any input size."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3, padding=1), torch.nn.Sigmoid()).eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 40, 48),), str(path), input_names=["image"], output_names=["edges"],
                      dynamic_axes={"image": {2: "h", 3: "w"}, "edges": {2: "h", 3: "w"}}, opset_version=17,
                      dynamo=False)
    return net


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy ONNX exporter
def test_featurecam_with_an_edge_model_file(explainer, tmp_path):
    """edges=<HED .onnx>: F is the model's map of the BGR − mean image, at the image's size."""
    torch = pytest.importorskip("torch")
    from explainrt.explainers.featurecam import _HED_MEAN_BGR, edge_descriptor
    from tests.conftest import random_rgb

    net = _edge_model(tmp_path / "edges.onnx", torch)
    rgb = random_rgb(40, 48)
    x = torch.from_numpy((rgb[:, :, ::-1].astype(np.float32) - _HED_MEAN_BGR).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        want = net(x)[0, 0].numpy()
    np.testing.assert_allclose(edge_descriptor(rgb, str(tmp_path / "edges.onnx")), want, atol=1e-5)
    result = explainer.explain(rgb, "featurecam", base="fem", edges=str(tmp_path / "edges.onnx"))
    assert result.visualization.shape == (32, 32, 3) and np.isfinite(result.saliency).all()


def test_a_classifier_is_not_an_edge_model(explainer, tiny_model, rgb_image):
    with pytest.raises(InvalidInputError, match="is not an edge model"):
        explainer.explain(rgb_image, "featurecam", base="fem", edges=tiny_model[1])


@pytest.mark.parametrize("value,message", [(1e300, "NaN or Inf values"), (3e38, "values up to 3e\\+38")])
def test_preprocessed_values_out_of_range(explainer, value, message):
    x = np.zeros((3, 32, 32), np.float64)
    x[0, 0, 0] = value
    with pytest.raises(InvalidInputError, match=message):
        explainer.explain(x, "fem")


def test_result_accessors_and_hooks_check_their_arguments(explainer, rgb_image):
    result = explainer.explain(rgb_image, "fem")
    with pytest.raises(InvalidInputError, match="alpha must be <= 1"):
        result.overlay(alpha=2)
    with pytest.raises(InvalidInputError, match="parameter k must be an int"):
        result.top_k("a")
    with pytest.raises(InvalidInputError, match="cancel must be a threading.Event"):
        explainer.explain(rgb_image, "fem", cancel=True)
    with pytest.raises(InvalidInputError, match="progress must be a callable"):
        explainer.explain(rgb_image, "fem", progress=3)


def test_results_print_array_shapes_not_numbers(explainer, rgb_image):
    text = repr(explainer.explain(rgb_image, "fem"))
    assert text.startswith("Explanation(method='fem'") and "saliency_maps=<array 1x32x32 float32>" in text
    assert len(text) < 1500


def test_export_torch_takes_the_module_itself_as_layer(tmp_path):
    from explainrt.export import export_torch
    from tests.conftest import tiny_cnn

    model = tiny_cnn()
    meta = export_torch(model, str(tmp_path / "m.onnx"), input_size=(32, 32), layer=model[1])
    assert meta.activation_layer == "1" and meta.activation_shape == (8, 32, 32)
    with pytest.raises(InvalidInputError, match="not in the model"):
        export_torch(model, str(tmp_path / "n.onnx"), input_size=(32, 32), layer=tiny_cnn()[1])
