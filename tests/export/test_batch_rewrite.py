"""Fixed-batch ONNX files (torch.onnx.export without dynamic_axes): rewritten and proven, or run at their batch.

Each rewrite pattern has a model built here whose plain export hard-codes batch 1 in a shape
constant; the exported file must then run any batch and give the torch model's numbers. A model
the rewrite cannot make dynamic (torch's MultiheadAttention folds the batch into the heads axis)
and one whose graph mixes samples keep their fixed batch, and explain exactly like a
dynamic-batch export of the same model.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import pytest

from explainrt import Explainer, ModelError, load_model
from explainrt.export import expose_activation
from explainrt.export.metadata import ModelMetadata

torch = pytest.importorskip("torch")
nn = torch.nn


class FlattenNet(nn.Module):
    """Flatten through ``view(batch, -1)``: a Reshape with the constant shape [1, -1]."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1))
        self.act = nn.ReLU()
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        x = self.act(self.features(x))
        return self.fc(x.view(x.size(0), -1))


class ShuffleNet(nn.Module):
    """ShuffleNet's channel shuffle: view(b, g, c/g, h, w) → transpose → view(b, c, h, w)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 10, 3, stride=2, padding=1, groups=2)
        self.act = nn.ReLU()
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        x = self.act(self.c2(x))
        return self.fc(x.mean((2, 3)))


class TokenNet(nn.Module):
    """A small vision transformer: patch tokens by reshape, a class token (expand or repeat), batch-first
    attention with reshapes of (b, tokens, heads, dim), and the patch tokens reshaped back to a grid."""

    def __init__(self, cls_by: str = "expand", d: int = 16, heads: int = 2):
        super().__init__()
        self.cls_by, self.d, self.heads = cls_by, d, heads
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.1)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mix = nn.Conv2d(d, d, 1)
        self.act = nn.ReLU()
        self.head = nn.Linear(2 * d, 5)

    def forward(self, x):
        x = self.patch(x)
        n, d, h, w = x.shape
        t = x.reshape(n, d, h * w).permute(0, 2, 1)
        cls = self.cls.expand(n, -1, -1) if self.cls_by == "expand" else self.cls.repeat(n, 1, 1)
        t = torch.cat([cls, t], dim=1) + self.pos
        q, k, v = self.qkv(t).reshape(n, 17, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        t = t + self.proj((a @ v).transpose(1, 2).reshape(n, 17, d))
        grid = self.act(self.mix(t[:, 1:].transpose(1, 2).reshape(n, d, h, w)))
        return self.head(torch.cat([grid.mean((2, 3)), t[:, 0]], dim=1))


class WindowNet(nn.Module):
    """Swin-style window attention: (b, H, W, C) partitioned into (b·windows, tokens, C) and back."""

    def __init__(self, c: int = 12, ws: int = 4, pad: bool = False):
        super().__init__()
        self.c, self.ws, self.pad = c, ws, pad
        self.embed = nn.Conv2d(3, c, 2, stride=2)
        self.qkv = nn.Linear(c, 3 * c)
        self.act = nn.ReLU()
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # (b, 8, 8, c)
        if self.pad:  # as torchvision's Swin: padded to whole windows, so the shapes below are computed
            _, h, w, _ = x.shape
            ws = self.ws
            x = nn.functional.pad(x, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        b, h, w, c = x.shape
        ws, nw = self.ws, (h // self.ws) * (w // self.ws)
        t = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, ws * ws, c)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        t = t + torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1) @ v
        x = t.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        x = self.act(x.permute(0, 3, 1, 2))
        return self.fc(x.mean((2, 3)))


class TorchVit(nn.Module):
    """torch's own TransformerEncoderLayer: its attention folds the batch into the heads axis
    (reshape (tokens, batch·heads, dim)), which a leading-entry rewrite cannot make dynamic."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.enc = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.act = nn.ReLU()
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = self.patch(x)
        n, d, h, w = x.shape
        t = torch.cat([self.cls.expand(n, -1, -1), x.reshape(n, d, h * w).permute(0, 2, 1)], dim=1)
        t = self.enc(t)
        grid = self.act(t[:, 1:].transpose(1, 2).reshape(n, d, h, w))
        return self.head(grid.mean((2, 3)) + t[:, 0])


class BatchMixingNet(nn.Module):
    """Adds the batch mean to every sample: right at batch 1, wrong (samples mixed) at any other."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = x + x.mean(0, keepdim=True)
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def plain_export(model, path, batch: int = 1, size=(16, 16), dynamic: bool = False) -> None:
    """``torch.onnx.export(..., dynamo=False)`` as users write it: no dynamic_axes unless ``dynamic``."""
    kwargs = {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}} if dynamic else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(batch, 3, *size),), str(path), input_names=["x"],
                          output_names=["y"], opset_version=17, dynamo=False, **kwargs)


def torch_reference(model, x):
    """Logits and the output of ``model.act`` (the activation explainrt exposes) for a batch ``x``."""
    acts = []
    handle = model.act.register_forward_hook(lambda _m, _i, o: acts.append(o))
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    handle.remove()
    return logits.numpy(), acts[-1].numpy()


def _seeded(make):
    torch.manual_seed(0)
    return make().eval()


PATTERNS = {  # model, an op the rewrite must have changed
    "flatten": (FlattenNet, "Reshape"),
    "channel_shuffle": (ShuffleNet, "Reshape"),
    "tokens_expand_cls": (lambda: TokenNet("expand"), "Expand"),
    "tokens_repeat_cls": (lambda: TokenNet("repeat"), "Expand"),  # torch exports repeat as Expand + Tile
    "window_partition": (WindowNet, "Reshape"),  # (b·windows, …): the batch times a factor
    "window_partition_computed": (lambda: WindowNet(pad=True), "Reshape"),  # that shape computed from Shape
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_fixed_batch_export_is_rewritten_and_runs_any_batch(tmp_path, pattern):
    make, op = PATTERNS[pattern]
    model = _seeded(make)
    src, dst = tmp_path / "plain.onnx", str(tmp_path / "out.onnx")
    plain_export(model, src)
    assert onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    meta = expose_activation(str(src), dst)
    info = meta.batch_rewrite
    assert meta.fixed_batch is None and info["status"] == "rewritten" and info["original_batch"] == 1
    assert any(r.startswith(op) for r in info["rewrites"]), info["rewrites"]
    if pattern == "window_partition":
        assert any("['batch*4', 16, 12]" in r for r in info["rewrites"]), info["rewrites"]
    if pattern == "window_partition_computed":
        assert any("computed shape [4, 16, 12] -> [batch*4" in r for r in info["rewrites"]), info["rewrites"]
    assert info["proven_batches"] == [1, 2, 3, 5] and info["max_error"] < 1e-5
    stored = ModelMetadata.from_json({p.key: p.value for p in onnx.load(dst).metadata_props}["explainrt"])
    assert stored.batch_rewrite == info and stored.fixed_batch is None
    engine = load_model(dst, max_batch=8)
    assert engine.max_batch == 8 and engine.fixed_batch is None
    x = np.random.default_rng(3).standard_normal((7, 3, 16, 16)).astype(np.float32)
    out = engine.infer(x)
    logits, acts = torch_reference(model, x)
    np.testing.assert_allclose(out[meta.logits_output], logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[meta.activation_output], acts, rtol=1e-4, atol=1e-5)


def test_a_larger_fixed_batch_is_rewritten_too(tmp_path):
    model = _seeded(ShuffleNet)
    plain_export(model, tmp_path / "b3.onnx", batch=3)
    meta = expose_activation(str(tmp_path / "b3.onnx"), str(tmp_path / "out.onnx"))
    assert meta.fixed_batch is None and meta.batch_rewrite["original_batch"] == 3
    assert meta.batch_rewrite["proven_batches"] == [1, 2, 3, 5]
    x = np.random.default_rng(4).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(load_model(str(tmp_path / "out.onnx")).infer(x)[meta.logits_output],
                               torch_reference(model, x)[0], rtol=1e-4, atol=1e-5)


def _explain_all(explainer, image):
    return {method: explainer.explain(image, method, **params).saliency_maps
            for method, params in (("rise", {"n_masks": 37}), ("scorecam", {}), ("sidu", {}), ("fem", {}))}


@pytest.mark.parametrize("make", [TorchVit, BatchMixingNet], ids=["torch_attention", "batch_mixing"])
def test_unprovable_rewrite_keeps_the_fixed_batch(tmp_path, capfd, caplog, make):
    """Kept at batch 1, explained like the dynamic export of the same model (which, for the model
    that mixes samples, is only right one image per call: the fixed batch keeps it right)."""
    model = _seeded(make)
    plain_export(model, tmp_path / "fixed.onnx")
    plain_export(model, tmp_path / "dyn.onnx", dynamic=True)
    capfd.readouterr()
    meta = expose_activation(str(tmp_path / "fixed.onnx"), str(tmp_path / "fixed_out.onnx"))
    assert "onnxruntime" not in capfd.readouterr().err  # ORT's own "[E:onnxruntime:…]" lines stay quiet
    dyn = expose_activation(str(tmp_path / "dyn.onnx"), str(tmp_path / "dyn_out.onnx"))
    assert meta.fixed_batch == 1 and meta.batch_rewrite["status"] == "fixed"
    assert ("differs" if make is BatchMixingNet else "batch of") in meta.batch_rewrite["reason"]
    assert dyn.fixed_batch is None and dyn.batch_rewrite is None
    stored = onnx.load(str(tmp_path / "fixed_out.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert stored.dim_value == 1  # the original graph, kept at its batch
    fixed = Explainer(str(tmp_path / "fixed_out.onnx"), batch_size=16)
    assert fixed.engine.max_batch == 1 and fixed.engine.fixed_batch == 1 and fixed.engine.requested_max_batch == 16
    dynamic = Explainer(str(tmp_path / "dyn_out.onnx"), batch_size=1 if make is BatchMixingNet else 16)
    image = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    calls = []
    run = fixed.engine._run
    fixed.engine._run = lambda inputs, names: calls.append(inputs["x"].shape[0]) or run(inputs, names)
    with caplog.at_level(logging.WARNING, logger="explainrt.runtime.base"):
        got, want = _explain_all(fixed, image), _explain_all(dynamic, image)
    assert set(calls) == {1}  # every engine call at the fixed batch
    for method in want:
        np.testing.assert_allclose(got[method], want[method], rtol=1e-4, atol=1e-5, err_msg=method)
    warnings_ = [r.getMessage() for r in caplog.records if r.name == "explainrt.runtime.base"]
    assert len(warnings_) == 1 and "37 inputs take 37 engine calls of 1 instead of 3 of up to 16" in warnings_[0]
    assert "\n" not in warnings_[0]


def test_fixed_batch_engines_pad_to_the_batch(tmp_path):
    """A model kept at batch 3: every engine call has exactly 3 rows, the last chunk padded, outputs unchanged."""
    model = _seeded(ShuffleNet)
    plain_export(model, tmp_path / "b3.onnx", batch=3)
    meta = expose_activation(str(tmp_path / "b3.onnx"), str(tmp_path / "out.onnx"), rewrite_batch=False)
    assert meta.fixed_batch == 3 and meta.batch_rewrite == {"original_batch": 3, "status": "fixed",
                                                            "reason": "the batch rewrite was turned off"}
    engine = load_model(str(tmp_path / "out.onnx"), max_batch=64)
    assert (engine.max_batch, engine.fixed_batch) == (3, 3)
    rows = []
    run = engine._run
    engine._run = lambda inputs, names: rows.append(inputs["x"].shape[0]) or run(inputs, names)
    x = np.random.default_rng(6).standard_normal((7, 3, 16, 16)).astype(np.float32)
    got = engine.infer_batches(x, [meta.logits_output, meta.activation_output], batch_size=8)
    logits, acts = torch_reference(model, x)
    np.testing.assert_allclose(got[meta.logits_output], logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[meta.activation_output], acts, rtol=1e-4, atol=1e-5)
    base = engine.base_pass(x[:1])  # a batch of 1 padded up to 3
    np.testing.assert_allclose(base.logits, logits[0], rtol=1e-4, atol=1e-5)
    assert rows == [3, 3, 3, 3]
    with pytest.raises(Exception, match="fixed at 3"):
        engine.infer(x[:5])


def test_metadata_checks_the_fixed_batch():
    meta = ModelMetadata("x", (8, 8), None, "p", "a", (1, 2, 2), 3, fixed_batch=2, batch_rewrite={"status": "fixed"})
    assert ModelMetadata.from_json(meta.to_json()).fixed_batch == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ModelError, match="fixed_batch"):
            ModelMetadata("x", (8, 8), None, "p", "a", (1, 2, 2), 3, fixed_batch=bad).validate()


def test_cli_export_says_which_path_it_took(tmp_path, capsys):
    from explainrt import cli

    plain_export(_seeded(FlattenNet), tmp_path / "plain.onnx")
    assert cli.main(["export", "--onnx", str(tmp_path / "plain.onnx"), "-o", str(tmp_path / "a.onnx")]) == 0
    out = capsys.readouterr().out
    assert "batch made dynamic (was fixed at 1; 1 shape constant(s) rewritten, proven for batches 1, 2, 3, 5)" in out
    assert cli.main(["export", "--onnx", str(tmp_path / "plain.onnx"), "-o", str(tmp_path / "b.onnx"),
                     "--keep-fixed-batch"]) == 0
    assert "batch fixed at 1 (the batch rewrite was turned off)" in capsys.readouterr().out


def test_tile_slice_and_constant_of_shape_patterns(tmp_path):
    """A graph written by hand with the other shape inputs that hard-code batch 1: a constant tiled to
    the batch, ConstantOfShape([1, 1]) and a Slice [0:1] on the batch axis; checked against NumPy."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    weight = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    extra = rng.standard_normal((1, 2)).astype(np.float32)
    ints = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"]),
        helper.make_node("Slice", ["conv", "s0", "s1", "s0"], ["act"]),  # conv[0:1] on the batch axis
        helper.make_node("GlobalAveragePool", ["act"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Tile", ["extra", "reps"], ["tiled"]),
        helper.make_node("ConstantOfShape", ["ones_shape"], ["ones"],
                         value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Concat", ["flat", "tiled", "ones"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(extra, "extra"), ints("s0", [0]),
         ints("s1", [1]), ints("reps", [1, 1]), ints("ones_shape", [1, 1])])
    src, dst = str(tmp_path / "hand.onnx"), str(tmp_path / "out.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    meta = expose_activation(src, dst, activation="act")
    assert meta.fixed_batch is None, meta.batch_rewrite
    ops = sorted(r.split()[0] for r in meta.batch_rewrite["rewrites"])
    assert ops == ["ConstantOfShape", "Slice", "Tile"], meta.batch_rewrite["rewrites"]
    x = rng.standard_normal((5, 3, 4, 4)).astype(np.float32)
    out = load_model(dst).infer(x)
    conv = np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], x)
    want = np.concatenate([conv.mean((2, 3)), np.repeat(extra, 5, 0), np.ones((5, 1), np.float32)], axis=1)
    np.testing.assert_allclose(out[meta.activation_output], conv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[meta.logits_output], want, rtol=1e-5, atol=1e-6)


def test_gradient_methods_on_a_model_kept_at_its_fixed_batch(tmp_path):
    """Gradients run the graph directly (no engine padding): Grad-CAM groups its targets by the fixed
    batch and equals the dynamic export's maps; FGVis, one batch of masks, says what it needs."""
    from explainrt.errors import InvalidInputError

    torch.manual_seed(0)
    model = FlattenNet()
    plain_export(model, tmp_path / "fixed.onnx")
    plain_export(model, tmp_path / "dyn.onnx", dynamic=True)
    fixed = expose_activation(str(tmp_path / "fixed.onnx"), str(tmp_path / "fixed_x.onnx"), rewrite_batch=False)
    expose_activation(str(tmp_path / "dyn.onnx"), str(tmp_path / "dyn_x.onnx"))
    assert fixed.fixed_batch == 1
    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    kept, dynamic = Explainer(str(tmp_path / "fixed_x.onnx"), backend="torch"), Explainer(
        str(tmp_path / "dyn_x.onnx"), backend="torch")
    for method in ("gradcam", "gradcam++"):
        got = kept.explain(img, method, target=[0, 1, 2])
        want = dynamic.explain(img, method, target=[0, 1, 2])
        np.testing.assert_allclose(got.raw_maps, want.raw_maps, rtol=1e-4, atol=1e-6)
    assert kept.explain(img, "fgvis", target=0, iterations=2).saliency_maps.shape[0] == 1
    with pytest.raises(InvalidInputError, match="fixed batch of 1"):
        kept.explain(img, "fgvis", target=[0, 1], iterations=2)
    with pytest.raises(InvalidInputError, match="the integer 1 or 3"):
        kept.explain(img, "fgvis", channels=3.0)
