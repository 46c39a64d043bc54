"""The shared driver: chunked, deduplicated masked passes equal one naive pass per mask."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from explainrt.explainers.base import Context, MaskPlan  # noqa: E402
from explainrt.explainers.driver import run_masked_passes  # noqa: E402
from explainrt.export import export_torch  # noqa: E402
from tests.conftest import unstrided_cnn  # noqa: E402
from explainrt.kernels import reference  # noqa: E402
from explainrt.runtime.ort_engine import OnnxRuntimeEngine  # noqa: E402

H, W = 20, 18


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model = unstrided_cnn()
    path = str(tmp_path_factory.mktemp("driver") / "tiny.onnx")
    export_torch(model.eval(), path, input_size=(H, W))
    return OnnxRuntimeEngine(path, max_batch=64)


def _context(engine, batch_size):
    x = np.random.default_rng(0).standard_normal((1, 3, H, W)).astype(np.float32)
    base = engine.base_pass(x)
    return Context(engine=engine, ops=reference, xp=np, x=x, base=base, targets=[0], input_hw=(H, W),
                   rgb=np.zeros((H, W, 3), np.uint8), batch_size=batch_size)


def _naive(engine, ctx, plan, i):
    sl = slice(i, i + 1)
    masked = reference.masked_batch(
        ctx.x, plan.masks[sl], border=plan.border, full_hw=plan.full_hw,
        shift=None if plan.shift is None else plan.shift[sl], scale=None if plan.scale is None else plan.scale[sl],
        offsets=None if plan.offsets is None else plan.offsets[sl])
    return engine.infer(masked)["probs"][0]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_binary_masks_with_duplicates(engine, batch_size):
    rng = np.random.default_rng(1)
    distinct = (rng.random((5, 4, 4)) > 0.5).astype(np.float32)
    distinct[0] = 1.0  # an all-ones mask: scored by the base pass, not run
    masks = distinct[rng.integers(0, 5, 13)]
    masks[:2] = distinct[:2]
    plan = MaskPlan(masks=masks, border="reflect", binary=True)
    ctx = _context(engine, batch_size)
    table = run_masked_passes(ctx, plan)
    assert table.probs.shape[0] == len(np.unique(masks.reshape(13, -1), axis=0))
    # the base pass plus every distinct mask but the all-ones one (its scores are the base pass's)
    assert ctx.forward_passes == 1 + (table.probs.shape[0] - 1)
    expanded = table.expanded()
    for i in range(13):
        np.testing.assert_allclose(expanded[i], _naive(engine, ctx, plan, i), atol=1e-6)
    assert table.counts.sum() == 13


@pytest.mark.parametrize("batch_size", [2, 7])
def test_shifted_scaled_and_cropped_masks(engine, batch_size):
    rng = np.random.default_rng(2)
    acts = rng.standard_normal((9, 5, 4)).astype(np.float32)
    plan = MaskPlan(masks=acts, border="clamp", shift=-acts.min(axis=(1, 2)),
                    scale=1.0 / np.ptp(acts, axis=(1, 2)))
    ctx = _context(engine, batch_size)
    table = run_masked_passes(ctx, plan)
    for i in range(9):
        np.testing.assert_allclose(table.probs[i], _naive(engine, ctx, plan, i), atol=1e-6)
    grids, offsets, full_hw = reference.rise_grids(11, 3, 0.5, (H, W), seed=4)
    plan = MaskPlan(masks=grids, border="reflect", full_hw=full_hw, offsets=offsets)
    table = run_masked_passes(ctx, plan)
    for i in range(11):
        np.testing.assert_allclose(table.probs[i], _naive(engine, ctx, plan, i), atol=1e-6)


def test_progress_reports_every_chunk(engine):
    masks = np.random.default_rng(3).random((10, 3, 3)).astype(np.float32)
    calls = []
    run_masked_passes(_context(engine, 4), MaskPlan(masks=masks), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 10), (4, 10), (8, 10), (10, 10)]
