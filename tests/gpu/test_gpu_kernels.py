"""Every CUDA kernel against its NumPy twin in kernels/reference.py, on fresh random inputs."""
import numpy as np
import pytest

from explainrt.kernels import reference

pytestmark = pytest.mark.gpu

FP32_RTOL = 1e-5
FP16_RTOL = 1e-2


@pytest.fixture(scope="module")
def ops(cp):
    from explainrt.kernels import cuda

    return cuda


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


@pytest.mark.parametrize("border", ["clamp", "reflect"])
@pytest.mark.parametrize("hw,out_hw", [((7, 7), (224, 224)), ((1, 6), (31, 17)), ((2, 3), (9, 40)), ((5, 5), (5, 5))])
def test_upsample_bilinear(cp, ops, border, hw, out_hw):
    masks = np.random.default_rng().standard_normal((6, *hw)).astype(np.float32)
    got = ops.upsample_bilinear(cp.asarray(masks), out_hw, border)
    assert isinstance(got, cp.ndarray) and got.dtype == cp.float32
    assert rel_err(cp.asnumpy(got), reference.upsample_bilinear(masks, out_hw, border)) < FP32_RTOL


@pytest.mark.parametrize("border", ["clamp", "reflect"])
@pytest.mark.parametrize("affine", [False, True])
def test_masked_batch_fp32(cp, ops, border, affine):
    rng = np.random.default_rng()
    x = rng.standard_normal((1, 3, 45, 37)).astype(np.float32)
    masks = rng.random((9, 6, 5)).astype(np.float32)
    shift = rng.standard_normal(9).astype(np.float32) if affine else None
    scale = rng.random(9).astype(np.float32) + 0.5 if affine else None
    out = cp.full((9, 3, 45, 37), np.nan, dtype=cp.float32)
    ret = ops.masked_batch(cp.asarray(x), cp.asarray(masks), out=out, border=border,
                           shift=None if shift is None else cp.asarray(shift),
                           scale=None if scale is None else cp.asarray(scale))
    assert ret is out
    want = reference.masked_batch(x, masks, border=border, shift=shift, scale=scale)
    assert rel_err(cp.asnumpy(out), want) < FP32_RTOL


def test_masked_batch_writes_a_slice_of_the_engine_buffer(cp, ops):
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 16, 16)).astype(np.float32)
    masks = rng.random((3, 4, 4)).astype(np.float32)
    buffer = cp.full((8, 3, 16, 16), 7.0, dtype=cp.float32)
    ops.masked_batch(cp.asarray(x), cp.asarray(masks), out=buffer[:3])
    assert rel_err(cp.asnumpy(buffer[:3]), reference.masked_batch(x, masks)) < FP32_RTOL
    assert bool((buffer[3:] == 7.0).all())  # nothing past the chunk is touched


def test_masked_batch_fp16(cp, ops):
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 64, 48)).astype(np.float32)
    masks = rng.random((5, 7, 7)).astype(np.float32)
    out = cp.empty((5, 3, 64, 48), dtype=cp.float16)
    ops.masked_batch(cp.asarray(x), cp.asarray(masks), out=out, border="reflect")
    assert rel_err(cp.asnumpy(out).astype(np.float32), reference.masked_batch(x, masks, border="reflect")) < FP16_RTOL


def test_masked_batch_rise_crops(cp, ops):
    rng = np.random.default_rng()
    grids, offsets, full_hw = reference.rise_grids(12, 7, 0.5, (60, 52), seed=int(rng.integers(1 << 30)))
    x = rng.standard_normal((3, 60, 52)).astype(np.float32)
    got = ops.masked_batch(cp.asarray(x), cp.asarray(grids), border="reflect", full_hw=full_hw,
                           offsets=cp.asarray(offsets))
    want = reference.masked_batch(x, grids, border="reflect", full_hw=full_hw, offsets=offsets)
    assert rel_err(cp.asnumpy(got), want) < FP32_RTOL
    up = ops.upsample_bilinear(cp.asarray(grids), (60, 52), "reflect", full_hw, cp.asarray(offsets))
    want_up = reference.upsample_bilinear(grids, (60, 52), "reflect", full_hw, offsets)
    assert rel_err(cp.asnumpy(up), want_up) < FP32_RTOL


@pytest.mark.parametrize("border", ["clamp", "reflect"])
def test_upsampled_minmax(cp, ops, border):
    masks = np.random.default_rng().standard_normal((300, 7, 7)).astype(np.float32) * 3
    lo, hi = ops.upsampled_minmax(cp.asarray(masks), (224, 224), border)
    want_lo, want_hi = reference.upsampled_minmax(masks, (224, 224), border)
    assert rel_err(cp.asnumpy(lo), want_lo) < FP32_RTOL and rel_err(cp.asnumpy(hi), want_hi) < FP32_RTOL


@pytest.mark.parametrize("targets", [1, 3])
def test_weighted_mask_sum(cp, ops, targets):
    rng = np.random.default_rng()
    weights = rng.standard_normal((200, targets))
    masks = rng.random((200, 7, 7)).astype(np.float32)
    got = ops.weighted_mask_sum(cp.asarray(weights), cp.asarray(masks), (224, 224), "reflect")
    assert rel_err(cp.asnumpy(got), reference.weighted_mask_sum(weights, masks, (224, 224), "reflect")) < FP32_RTOL


@pytest.mark.parametrize("targets", [1, 3, 11])  # 11 crosses the kernel's 8-target pass
def test_weighted_crop_sum(cp, ops, targets):
    rng = np.random.default_rng()
    grids, offsets, full_hw = reference.rise_grids(150, 7, 0.5, (96, 80), seed=int(rng.integers(1 << 30)))
    weights = rng.random((150, targets)).astype(np.float32)
    got = ops.weighted_crop_sum(cp.asarray(weights), cp.asarray(grids), cp.asarray(offsets), (96, 80), full_hw)
    want = reference.weighted_crop_sum(weights, grids, offsets, (96, 80), full_hw)
    assert got.shape == (targets, 96, 80)
    assert rel_err(cp.asnumpy(got), want) < FP32_RTOL


def test_threshold_masks(cp, ops):
    acts = np.random.default_rng().standard_normal((64, 7, 7)).astype(np.float32)
    for tau in (0.5, 0.1, -0.3):
        got = cp.asnumpy(ops.threshold_masks(cp.asarray(acts), tau))
        np.testing.assert_array_equal(got, reference.threshold_masks(acts, tau))


@pytest.mark.parametrize("k", [1.0, 2.0, -0.5])
def test_ksigma_binarize(cp, ops, k):
    acts = np.maximum(np.random.default_rng().standard_normal((128, 7, 7)), 0).astype(np.float32)
    acts[5] = 0.25  # constant channel: σ = 0, every value is >= μ
    binary, mu = ops.ksigma_binarize(cp.asarray(acts), k)
    want_binary, want_mu = reference.ksigma_binarize(acts, k)
    np.testing.assert_array_equal(cp.asnumpy(binary), want_binary)
    assert rel_err(cp.asnumpy(mu), want_mu) < FP32_RTOL


def test_kernels_stay_on_the_current_stream(cp, ops):
    """Launched on a non-default stream, results are correct once that stream is synchronised."""
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 32, 32)).astype(np.float32)
    masks = rng.random((4, 7, 7)).astype(np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        got = ops.masked_batch(cp.asarray(x), cp.asarray(masks))
    stream.synchronize()
    assert rel_err(cp.asnumpy(got), reference.masked_batch(x, masks)) < FP32_RTOL


def test_double_buffered_input_orders_the_streams(cp, ops):
    """The driver's staging: chunk k masked on the side stream, consumed on the main stream."""
    rng = np.random.default_rng()
    x = cp.asarray(rng.standard_normal((3, 64, 64)).astype(np.float32))
    masks = cp.asarray(rng.random((40, 7, 7)).astype(np.float32))
    from explainrt.runtime.staging import DoubleBufferedInput

    staging = DoubleBufferedInput((8, 3, 64, 64), "float32")
    sums = []
    for k in range(5):
        with staging.fill(k) as buf:
            ops.masked_batch(x, masks[8 * k:8 * k + 8], out=buf)
        sums.append(staging.ready(k).sum(axis=(1, 2, 3)))  # consumed on the main stream
        staging.release(k)
    got = cp.asnumpy(cp.concatenate(sums))
    want = reference.masked_batch(cp.asnumpy(x), cp.asnumpy(masks)).sum(axis=(1, 2, 3))
    assert rel_err(got, want) < 1e-4
