"""Vision transformers and black-box models: the tensor chosen, its NCHW view and metadata,
parity between torch, ONNX Runtime and the torch engine, maps that localise planted evidence
on a ViT trained in the test, and black-box models (no activation) with RISE and the metrics."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from explainrt import Explainer
from explainrt.errors import InvalidInputError, ModelError
from explainrt.export import expose_activation, export_torch
from explainrt.metrics import insertion_deletion_curves
from explainrt.runtime.ort_engine import OnnxRuntimeEngine
from explainrt.runtime.torch_engine import TorchEngine

torch = pytest.importorskip("torch")

from tests.transformer_models import ResidualCNN, TinySwin, TinyViT  # noqa: E402

SIZE = 32


def _plain_onnx(model, path, size=SIZE):
    """The model as a user's own ONNX file: one input, logits out, dynamic batch."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), path, input_names=["image"], output_names=["scores"],
                          dynamic_axes={"image": {0: "n"}, "scores": {0: "n"}}, opset_version=17, dynamo=False)
    return path


def _captured(model, module, x):
    """Output of ``module`` on ``x`` (the independent torch reference)."""
    out = []
    handle = module.register_forward_hook(lambda _m, _i, o: out.append(o.detach()))
    with torch.no_grad():
        model(torch.from_numpy(x))
    handle.remove()
    return out[-1].numpy()


# model, the module the classifier's evidence is read from, its layout, expected (C, h, w), dropped tokens, grid,
# and the reference NCHW view written out by hand (pytorch-grad-cam's reshape_transform)
FAMILIES = {
    "vit": (lambda: TinyViT(), "norm", "tokens", (32, 8, 8), [0], (8, 8),
            lambda t: t[:, 1:].transpose(0, 2, 1).reshape(-1, 32, 8, 8)),
    "vit_registers": (lambda: TinyViT(registers=4), "norm", "tokens", (32, 8, 8), [0, 1, 2, 3, 4], (8, 8),
                      lambda t: t[:, 5:].transpose(0, 2, 1).reshape(-1, 32, 8, 8)),
    "swin_nhwc": (lambda: TinySwin(), "norm", "NHWC", (32, 4, 4), [], None, lambda t: t.transpose(0, 3, 1, 2)),
    "residual_cnn": (lambda: ResidualCNN(), "act", "NCHW", (16, 8, 8), [], None, lambda t: t),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    make, layer, layout, chw, dropped, grid, reference = FAMILIES[request.param]
    model = make().eval()
    tmp = tmp_path_factory.mktemp(request.param)
    torch_path = str(tmp / "torch.onnx")
    torch_meta = export_torch(model, torch_path, input_size=(SIZE, SIZE))
    onnx_path = str(tmp / "onnx.onnx")
    onnx_meta = expose_activation(_plain_onnx(model, str(tmp / "plain.onnx")), onnx_path)
    return dict(model=model, layer=layer, layout=layout, chw=chw, dropped=dropped, grid=grid, reference=reference,
                torch_path=torch_path, torch_meta=torch_meta, onnx_path=onnx_path, onnx_meta=onnx_meta)


def test_tensor_chosen_and_metadata(family):
    for meta, layer in ((family["torch_meta"], family["layer"]), (family["onnx_meta"], None)):
        assert meta.activation_layout == family["layout"]
        assert meta.activation_shape == family["chw"]
        assert meta.dropped_tokens == family["dropped"]
        assert meta.token_grid == family["grid"]
        if layer is not None:  # export_torch names the module; never the ViT's patch embedding
            assert meta.activation_layer == layer
    # the ONNX route explains the same tensor: the output of that module's last node
    produced = {o: n for n in onnx.load(family["onnx_path"]).graph.node for o in n.output}
    assert produced[family["onnx_meta"].activation_layer].name.startswith(f"/{family['layer']}/")
    # the metadata survives the file
    assert Explainer(family["onnx_path"]).metadata.dropped_tokens == family["dropped"]


def test_nchw_view_matches_torch_on_every_engine(family):
    x = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    model = family["model"]
    expected = family["reference"](_captured(model, dict(model.named_modules())[family["layer"]], x))
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    for path, meta in ((family["torch_path"], family["torch_meta"]), (family["onnx_path"], family["onnx_meta"])):
        ort_out = OnnxRuntimeEngine(path, max_batch=4).infer(x)
        torch_out = TorchEngine(path, max_batch=4, device="cpu").infer(x)
        for out in (ort_out, torch_out):
            np.testing.assert_allclose(out[meta.activation_output], expected, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(out[meta.logits_output], logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["sidu", "scorecam", "fem", "featurecam"])
def test_activation_methods_run_finite(family, method):
    result = Explainer(family["onnx_path"], batch_size=16).explain(
        np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), method, target=0)
    assert result.saliency.shape == (SIZE, SIZE) and np.isfinite(result.saliency).all()


def test_named_token_tensor_with_grid(tmp_path):
    model = TinyViT(registers=4).eval()
    meta = export_torch(model, str(tmp_path / "named.onnx"), input_size=(SIZE, SIZE), layer="blocks.0",
                        prefix_tokens=5, grid=(8, 8))
    assert (meta.activation_layer, meta.dropped_tokens, meta.activation_shape) == ("blocks.0", [0, 1, 2, 3, 4],
                                                                                   (32, 8, 8))
    with pytest.raises(InvalidInputError, match="do not hold a 9x9 grid"):
        export_torch(model, str(tmp_path / "x.onnx"), input_size=(SIZE, SIZE), layer="blocks.0", grid=(9, 9))
    with pytest.raises(InvalidInputError, match="give layer= too"):
        export_torch(model, str(tmp_path / "x.onnx"), input_size=(SIZE, SIZE), grid=(8, 8))
    src = _plain_onnx(model, str(tmp_path / "plain.onnx"))
    block_out = [o for n in onnx.load(src).graph.node if n.name.startswith("/blocks/blocks.0/") for o in n.output][-1]
    meta = expose_activation(src, str(tmp_path / "named_onnx.onnx"), activation=block_out, grid=(8, 8))
    assert (meta.activation_layer, meta.dropped_tokens, meta.activation_shape) == (block_out, [0, 1, 2, 3, 4],
                                                                                   (32, 8, 8))
    with pytest.raises(InvalidInputError, match="do not hold a 9x9 grid"):
        expose_activation(src, str(tmp_path / "x.onnx"), activation=block_out, grid=(9, 9))
    with pytest.raises(InvalidInputError, match="apply to tokens only"):
        expose_activation(src, str(tmp_path / "x.onnx"), activation="/patch_embed/Conv_output_0", prefix_tokens=1)


def test_unreadable_tokens_are_refused_not_skipped(tmp_path):
    # 20 register tokens: more than detection drops, so the 84 tokens read as no grid. The patch
    # embedding (the last 4-D map) must not be explained silently in their place.
    model = TinyViT(registers=19).eval()
    with pytest.raises(ModelError, match="after patch_embed .* not a feature grid"):
        export_torch(model, str(tmp_path / "x.onnx"), input_size=(SIZE, SIZE))
    with pytest.raises(ModelError, match="not a feature grid"):
        expose_activation(_plain_onnx(model, str(tmp_path / "plain.onnx")), str(tmp_path / "x.onnx"))
    meta = export_torch(model, str(tmp_path / "named.onnx"), input_size=(SIZE, SIZE), layer="norm", prefix_tokens=20)
    assert meta.dropped_tokens == list(range(20)) and meta.token_grid == (8, 8)


# ---------------------------------------------------------------- a ViT trained on planted evidence

PATCH = (16, 24, 8, 16)  # y0, y1, x0, x1 of the red square in the test image (2×2 patch tokens)
DISTRACTOR = (4, 12, 20, 28)  # … and of its blue square


def _square(img, box, colour):
    y0, y1, x0, x1 = box
    img[y0:y1, x0:x1] = colour


def _planted_batch(rng, n):
    """Grey noise with a blue 8×8 square anywhere; class 1 also has a red one, apart from it."""
    x = np.repeat(rng.integers(60, 180, (n, SIZE, SIZE, 1)), 3, axis=-1).astype(np.float32)
    y = rng.integers(0, 2, n)
    for i in range(n):
        while True:
            (by, bx), (ry, rx) = rng.integers(0, SIZE - 8, (2, 2))
            if abs(int(by) - int(ry)) >= 8 or abs(int(bx) - int(rx)) >= 8:
                break
        _square(x[i], (by, by + 8, bx, bx + 8), (20, 20, 230))
        if y[i]:
            _square(x[i], (ry, ry + 8, rx, rx + 8), (230, 20, 20))
    return torch.from_numpy(x.transpose(0, 3, 1, 2) / 255.0), torch.from_numpy(y)


def planted_image(seed: int = 3, red: bool = True) -> np.ndarray:
    img = np.repeat(np.random.default_rng(seed).integers(60, 180, (SIZE, SIZE, 1)), 3, axis=-1).astype(np.uint8)
    _square(img, DISTRACTOR, (20, 20, 230))
    if red:
        _square(img, PATCH, (230, 20, 20))
    return img


def _trained(model, steps: int = 60):
    """``model`` trained for a few seconds to find a red square beside a blue one (class 1: red)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared CPU
    try:
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        rng = np.random.default_rng(0)
        model.train()
        for _ in range(steps):
            x, y = _planted_batch(rng, 64)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def trained_vit(tmp_path_factory):
    """A TinyViT (class token) trained for a few seconds to find a red square beside a blue one."""
    model = _trained(TinyViT(size=SIZE, classes=2, seed=0))
    tmp = tmp_path_factory.mktemp("trained_vit")
    path = str(tmp / "vit.onnx")
    export_torch(model, path, input_size=(SIZE, SIZE), mean=(0, 0, 0), std=(255, 255, 255), labels=["blue", "red"])
    blackbox = str(tmp / "vit_blackbox.onnx")
    expose_activation(_plain_onnx(model, str(tmp / "plain.onnx")), blackbox, mean=(0, 0, 0), std=(255, 255, 255),
                      with_activation=False)
    return model, path, blackbox


def _assert_localises(sal, what, ratio=2.0, peak=True):
    """The map is higher on the red square than elsewhere (``ratio`` ×) and than on the blue one;
    with ``peak`` its maximum lies on the red square."""
    assert sal.shape == (SIZE, SIZE) and np.isfinite(sal).all(), what
    y0, y1, x0, x1 = PATCH
    if peak:
        y, x = np.unravel_index(int(np.argmax(sal)), sal.shape)
        margin = 3
        assert y0 - margin <= y < y1 + margin and x0 - margin <= x < x1 + margin, (what, (y, x))
    inside = sal[y0:y1, x0:x1].mean()
    mask = np.ones_like(sal, dtype=bool)
    mask[y0:y1, x0:x1] = False
    distractor = sal[DISTRACTOR[0]:DISTRACTOR[1], DISTRACTOR[2]:DISTRACTOR[3]].mean()
    assert inside > ratio * sal[mask].mean() and inside > ratio * distractor, (what, inside, sal[mask].mean(),
                                                                              distractor)


def test_trained_vit_decides_on_the_square(trained_vit):
    _, path, _ = trained_vit
    explainer = Explainer(path)
    assert int(np.argmax(explainer.predict(planted_image()))) == 1
    assert int(np.argmax(explainer.predict(planted_image(red=False)))) == 0


# SIDU (τ = 0.5, set for ReLU maps) and FEM (class-agnostic) do not single out the red square on
# these LayerNorm-ed tokens, whose features mark the blue distractor as strongly; they are only
# checked to run (test_activation_methods_run_finite).
# RISE's smooth maps are checked by their mass on the square, not by their peak.
RISE = {"n_masks": 1000, "grid_size": 4}


@pytest.mark.parametrize("backend,method,params,ratio,peak", [
    ("onnxruntime", "scorecam", {}, 2.0, True), ("torch", "scorecam", {}, 2.0, True),
    ("onnxruntime", "rise", RISE, 1.5, False),
])
def test_trained_vit_maps_localise_planted_evidence(trained_vit, backend, method, params, ratio, peak):
    _, path, _ = trained_vit
    result = Explainer(path, batch_size=64, backend=backend).explain(planted_image(), method, target=1, **params)
    _assert_localises(result.saliency, (backend, method), ratio, peak)


@pytest.mark.parametrize("family", ["vit_registers", "swin", "residual_cnn"])
def test_other_trained_families_localise_planted_evidence(family, tmp_path):
    """The planted-evidence check for the other families: a ViT with register tokens, the Swin-like
    NHWC model and the residual CNN, each trained in the test, explained through its export: Score-CAM
    and Feature CAM peak on the square, RISE ranks it first; on the CNN FEM and the gradient CAMs peak
    there too (SIDU does not: its map marks the blue distractor as strongly on these models)."""
    model = _trained({"vit_registers": lambda: TinyViT(size=SIZE, classes=2, registers=4, seed=0),
                      "swin": lambda: TinySwin(size=SIZE, classes=2, seed=0),
                      "residual_cnn": lambda: ResidualCNN(classes=2, seed=0)}[family]())
    path = str(tmp_path / f"{family}.onnx")
    export_torch(model, path, input_size=(SIZE, SIZE), mean=(0, 0, 0), std=(255, 255, 255), labels=["blue", "red"])
    explainer = Explainer(path, batch_size=64)
    assert int(np.argmax(explainer.predict(planted_image()))) == 1, family
    # These models' red score saturates (p ≈ 1 under most RISE masks that keep part of the square), so
    # RISE's map has little contrast: it is checked to rank the square above the rest and the distractor.
    checks = [("scorecam", {}, 2.0, True), ("rise", RISE, 1.0, False), ("featurecam", {}, 2.0, True)]
    if family == "residual_cnn":  # ReLU maps, NCHW, a CAM head: FEM and the gradient CAMs localise too
        checks += [(m, {}, 2.0, True) for m in ("fem", "gradcam", "gradcam++", "xgradcam", "layercam")]
    for method, params, ratio, peak in checks:
        result = explainer.explain(planted_image(), method, target=1, **params)
        _assert_localises(result.saliency, (family, method), ratio, peak)


# ---------------------------------------------------------------- black-box models

def test_blackbox_metadata_and_engines(trained_vit):
    model, _, blackbox = trained_vit
    for engine in (OnnxRuntimeEngine(blackbox, max_batch=4), TorchEngine(blackbox, max_batch=4, device="cpu")):
        meta = engine.metadata
        assert (meta.activation_output, meta.activation_shape, meta.activation_layout) == (None, None, None)
        x = np.random.default_rng(0).random((2, 3, SIZE, SIZE)).astype(np.float32)
        with torch.no_grad():
            expected = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
        np.testing.assert_allclose(engine.infer(x)[meta.probs_output], expected, rtol=1e-4, atol=1e-5)
        assert engine.base_pass(x[:1]).activations is None


def test_blackbox_rise_and_metrics(trained_vit):
    _, path, blackbox = trained_vit
    explainer = Explainer(blackbox, batch_size=64)
    result = explainer.explain(planted_image(), "rise", target=1, **RISE)
    _assert_localises(result.saliency, "rise on a black box", 1.5, peak=False)
    # the same masks on the model with an activation give the same map: RISE reads only scores
    same = Explainer(path, batch_size=64).explain(planted_image(), "rise", target=1, **RISE)
    np.testing.assert_allclose(result.raw_maps, same.raw_maps, rtol=1e-4, atol=1e-6)
    curves = insertion_deletion_curves(explainer, planted_image(), result.saliency, target=1, step=64)
    random_map = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
    baseline = insertion_deletion_curves(explainer, planted_image(), random_map, target=1, step=64)
    assert curves["deletion"].auc < baseline["deletion"].auc  # the map finds what the score depends on
    assert curves["insertion"].auc > baseline["insertion"].auc


@pytest.mark.parametrize("method,params", [("sidu", {}), ("scorecam", {}), ("fem", {}), ("featurecam", {})])
def test_blackbox_refuses_activation_methods_clearly(trained_vit, method, params):
    _, _, blackbox = trained_vit
    with pytest.raises(InvalidInputError, match=f"method '{method}' needs the activations .* black-box .* use rise"):
        Explainer(blackbox).explain(planted_image(), method, **params)
    # Feature CAM over RISE needs no activation
    result = Explainer(blackbox, batch_size=32).explain(planted_image(), "featurecam", target=1, base="rise",
                                                        base_params={"n_masks": 100, "grid_size": 8})
    assert np.isfinite(result.saliency).all()


class FlatMLP(torch.nn.Module):
    """A classifier with no feature grid at all: flattened pixels into an MLP."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def test_model_without_usable_activation(tmp_path):
    model = FlatMLP().eval()
    with pytest.raises(ModelError, match="no module whose output reads as a feature map .*with_activation=False"):
        export_torch(model, str(tmp_path / "x.onnx"), input_size=(SIZE, SIZE))
    src = _plain_onnx(model, str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelError, match="could not find a feature map .* --no-activation"):
        expose_activation(src, str(tmp_path / "x.onnx"))
    meta = expose_activation(src, str(tmp_path / "bb.onnx"), with_activation=False)
    result = Explainer(str(tmp_path / "bb.onnx"), batch_size=16).explain(
        np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "rise", n_masks=64, grid_size=4)
    assert meta.activation_output is None and np.isfinite(result.saliency).all() and result.forward_passes == 65


def test_blackbox_from_torch_and_cli(tmp_path, capsys):
    from explainrt.cli import main

    meta = export_torch(ResidualCNN().eval(), str(tmp_path / "bb.onnx"), input_size=(SIZE, SIZE), with_activation=False)
    assert meta.activation_output is None and [o.name for o in onnx.load(str(tmp_path / "bb.onnx")).graph.output] == \
        ["logits", "probs"]
    with pytest.raises(InvalidInputError, match="scores only"):
        export_torch(ResidualCNN().eval(), str(tmp_path / "x.onnx"), layer="act", with_activation=False)
    src = _plain_onnx(ResidualCNN().eval(), str(tmp_path / "plain.onnx"))
    assert main(["export", "--onnx", src, "--no-activation", "-o", str(tmp_path / "cli.onnx")]) == 0
    assert "no activation (black-box" in capsys.readouterr().out
    assert Explainer(str(tmp_path / "cli.onnx")).metadata.activation_output is None


def test_gradient_cams_refuse_token_layouts_up_front(tmp_path):
    """A ViT's explained tensor is a token grid: the gradient CAMs (NCHW only) are refused by the
    shared check, before any work, and the server's metadata does not offer them."""
    from explainrt.explainers import METHODS, check_applicable

    meta = export_torch(TinyViT().eval(), str(tmp_path / "vit.onnx"), input_size=(SIZE, SIZE))
    assert meta.activation_layout == "tokens"
    for method in ("gradcam", "gradcam++", "xgradcam", "layercam"):
        with pytest.raises(InvalidInputError, match="implemented for NCHW feature layers"):
            check_applicable(method, METHODS[method].create(), meta)
        with pytest.raises(InvalidInputError, match="implemented for NCHW"):
            Explainer(str(tmp_path / "vit.onnx"), backend="torch").explain(planted_image(), method)
    with pytest.raises(InvalidInputError, match="implemented for NCHW"):  # as Feature CAM's base too
        check_applicable("featurecam", METHODS["featurecam"].create(base="gradcam"), meta)
    check_applicable("scorecam", METHODS["scorecam"].create(), meta)
