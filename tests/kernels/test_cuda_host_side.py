"""The host side of the GPU path, run on the CPU against a stand-in for CuPy (fake_cupy.py).

``kernels/cuda.py`` and the driver's device branch (index uploads, double buffering) run
unchanged, with ``cupy`` replaced by NumPy plus a ``RawModule`` whose kernels are Python
models of the CUDA ones. Each model is bound to the parameter list parsed from the very .cu
source cuda.py compiles, and checks every argument's C type, so a wrong argument order, a
wrong scalar type or a wrong buffer dtype fails here although no GPU is present. The second
half compiles the .cu sources themselves for the host and runs them thread by thread. The
kernels' arithmetic on a real GPU is checked in tests/gpu, their device syntax by nvcc
(test_cuda_sources.py).
"""
import os
import sys

import numpy as np
import pytest

from explainrt.kernels import reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_cupy import MODELS, bind, happens_before, installed_fake_cupy, parse_kernels  # noqa: E402


@pytest.fixture
def fake_cp():
    with installed_fake_cupy() as fake:
        yield fake


# ------------------------------------------------------------------ tests


def test_models_cover_every_kernel():
    import explainrt.kernels as kernels_pkg

    folder = os.path.dirname(kernels_pkg.__file__)
    names = set()
    for source in ("resample.cu", "binarize.cu"):
        with open(os.path.join(folder, source), encoding="utf-8") as fh:
            names |= set(parse_kernels(fh.read()))
    assert names == set(MODELS)


@pytest.mark.parametrize("border", ["clamp", "reflect"])
def test_ops_marshal_their_arguments(fake_cp, border):
    ops = fake_cp.ops
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 30, 26)).astype(np.float32)
    masks = rng.random((5, 6, 4)).astype(np.float32)
    shift, scale = rng.standard_normal(5).astype(np.float32), rng.random(5).astype(np.float32)
    np.testing.assert_allclose(ops.upsample_bilinear(masks, (30, 26), border),
                               reference.upsample_bilinear(masks, (30, 26), border), rtol=1e-6, atol=1e-6)
    out = np.empty((8, 3, 30, 26), np.float32)
    ops.masked_batch(x, masks, out=out[:5], border=border, shift=shift, scale=scale)
    np.testing.assert_allclose(out[:5], reference.masked_batch(x, masks, border=border, shift=shift, scale=scale),
                               rtol=1e-5, atol=1e-6)
    half = np.empty((5, 3, 30, 26), np.float16)
    ops.masked_batch(x, masks, out=half, border=border)
    np.testing.assert_allclose(half, reference.masked_batch(x, masks, border=border), rtol=1e-2, atol=1e-2)
    lo, hi = ops.upsampled_minmax(masks, (30, 26), border)
    want_lo, want_hi = reference.upsampled_minmax(masks, (30, 26), border)
    np.testing.assert_allclose(lo, want_lo, rtol=1e-6)
    np.testing.assert_allclose(hi, want_hi, rtol=1e-6)
    weights = rng.standard_normal((5, 2))
    np.testing.assert_allclose(ops.weighted_mask_sum(weights, masks, (30, 26), border),
                               reference.weighted_mask_sum(weights, masks, (30, 26), border), rtol=1e-5, atol=1e-6)


def test_rise_ops_marshal_their_arguments(fake_cp):
    ops = fake_cp.ops
    rng = np.random.default_rng(1)
    grids, offsets, full_hw = reference.rise_grids(20, 5, 0.5, (33, 29), seed=2)
    x = rng.standard_normal((3, 33, 29)).astype(np.float32)
    np.testing.assert_allclose(
        ops.masked_batch(x, grids, border="reflect", full_hw=full_hw, offsets=offsets),
        reference.masked_batch(x, grids, border="reflect", full_hw=full_hw, offsets=offsets), rtol=1e-5, atol=1e-6)
    weights = rng.random((20, 11)).astype(np.float32)  # 11 targets: two kernel passes
    np.testing.assert_allclose(ops.weighted_crop_sum(weights, grids, offsets, (33, 29), full_hw),
                               reference.weighted_crop_sum(weights, grids, offsets, (33, 29), full_hw),
                               rtol=1e-5, atol=1e-6)


def test_binarize_ops_marshal_their_arguments(fake_cp):
    ops = fake_cp.ops
    acts = np.random.default_rng(3).standard_normal((16, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(ops.threshold_masks(acts, 0.3), reference.threshold_masks(acts, 0.3))
    binary, mu = ops.ksigma_binarize(acts, 1.5)
    want_binary, want_mu = reference.ksigma_binarize(acts, 1.5)
    np.testing.assert_array_equal(binary, want_binary)
    np.testing.assert_allclose(mu, want_mu, rtol=1e-6)


def test_masked_batch_rejects_a_bad_output_buffer(fake_cp):
    from explainrt.errors import InvalidInputError

    x = np.zeros((3, 8, 8), np.float32)
    masks = np.zeros((2, 2, 2), np.float32)
    with pytest.raises(InvalidInputError):
        fake_cp.ops.masked_batch(x, masks, out=np.zeros((2, 3, 8, 9), np.float32))
    with pytest.raises(InvalidInputError):
        fake_cp.ops.masked_batch(x, masks, out=np.zeros((2, 3, 8, 8), np.float64))


def test_double_buffering_protocol(fake_cp):
    ops, log = fake_cp.ops, fake_cp.log
    main = fake_cp.cuda.get_current_stream()
    x = np.ones((3, 8, 8), np.float32)
    masks = np.random.default_rng(0).random((12, 2, 2)).astype(np.float32)
    ops.masked_batch(x, masks[:1])  # first use uploads the tap tables (one synchronisation, once)
    log.events.clear()
    log.launches.clear()
    from explainrt.runtime.staging import DoubleBufferedInput

    staging = DoubleBufferedInput((4, 3, 8, 8), "float32")
    assert staging.side.non_blocking and staging.side is not main
    assert log.events == []  # nothing is recorded before the first fill: inputs may still be made on main
    late_input = fake_cp.asarray(masks)  # e.g. the driver's index arrays, uploaded after the staging exists
    upload = (main, main.count - 1)
    seen = []
    for k in range(3):
        with staging.fill(k) as buf:
            assert buf is staging.buffers[k % 2]
            ops.masked_batch(x, masks[4 * k:4 * k + 4], out=buf)
        seen.append(staging.ready(k).copy())
        staging.release(k)
    staging.close()
    kernels = [(name, stream) for name, stream in log.launches if name.startswith("masked_batch")]
    assert len(kernels) == 3 and all(stream is staging.side for _, stream in kernels)
    side_ops = [(s, i) for what, s, i in log.ops if s is staging.side and what.startswith("masked_batch")]
    assert all(happens_before(log, upload, op) for op in side_ops), "a fill may read an input before its upload"
    del late_input
    waits = [(s, on) for kind, s, on in log.events if kind == "wait"]
    assert waits.count((staging.side, main)) == 2  # the first fill, then chunk 2 waits for the engine on chunk 0
    # main waits for each chunk, then (close) for the side stream before the buffers may be freed
    assert sum(1 for s, on in waits if s is main and on is staging.side) == 4
    assert not [e for e in log.events if e[0] == "sync"], "the chunk loop must not synchronise the host"
    np.testing.assert_allclose(np.concatenate(seen), reference.masked_batch(x, masks), rtol=1e-6)


class DeviceProxyEngine:
    """Wraps the CPU engine so it claims the stand-in CuPy as its array module."""

    def __new__(cls, inner, xp):
        from explainrt.runtime.base import Engine

        class Proxy(Engine):
            backend, device = "proxy", "cuda"

            def __init__(self):
                super().__init__(inner.metadata, inner.max_batch)
                self.xp = xp

            inputs = property(lambda self: inner.inputs)
            outputs = property(lambda self: inner.outputs)

            def _run(self, inputs, output_names):
                return inner._run(inputs, output_names)

        return Proxy()


@pytest.fixture(scope="module")
def host_side_model(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from explainrt.export import export_torch

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 6))
    path = str(tmp_path_factory.mktemp("host_side") / "tiny.onnx")
    export_torch(model.eval(), path, input_size=(24, 20))
    return path


@pytest.mark.parametrize("method,params", [("sidu", {"threshold": 0.05}), ("scorecam", {}),
                                           ("scorecam", {"baseline": True, "channel_softmax": True}),
                                           ("rise", {"n_masks": 60}), ("fem", {}), ("featurecam", {})])
def test_gpu_pipeline_host_side_matches_cpu(fake_cp, host_side_model, method, params):
    from explainrt import Explainer
    from explainrt.kernels import get_ops
    from explainrt.runtime.ort_engine import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(host_side_model, max_batch=8)
    image = np.random.default_rng(4).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    gpu = Explainer(DeviceProxyEngine(engine, fake_cp), batch_size=5)
    assert gpu.ops is fake_cp.ops and get_ops(fake_cp) is fake_cp.ops
    want = Explainer(engine, batch_size=8).explain(image, method, target=[2, 0], **params)
    got = gpu.explain(image, method, target=[2, 0], **params)
    assert got.forward_passes == want.forward_passes
    np.testing.assert_allclose(got.raw_maps, want.raw_maps, rtol=1e-4, atol=1e-6 * max(1, np.abs(want.raw_maps).max()))
    np.testing.assert_allclose(got.saliency_maps, want.saliency_maps, atol=1e-5)
    if method in ("sidu", "scorecam", "rise"):  # masked passes ran through the double buffer
        assert any(name.startswith("masked_batch") and stream.ptr != 0 for name, stream in fake_cp.log.launches)


def test_side_stream_belongs_to_the_module_asked():
    """The thread's cached side stream is per CuPy module: a new module whose id() reuses a
    freed one's (CI hit it between two tests) must not get the old module's stream."""
    import gc

    from explainrt.runtime.staging import side_stream
    from fake_cupy import make_fake_cupy

    for _ in range(20):
        fake = make_fake_cupy()
        assert side_stream(fake).log is fake.log
        assert side_stream(fake) is side_stream(fake)
        del fake
        gc.collect()


def test_driver_fills_wait_for_every_upload(fake_cp, host_side_model):
    """The race of issue #4 defect 2: the index arrays are uploaded on the main stream, the side
    stream gathers with them; every side-stream write must be ordered after every upload."""
    from explainrt import Explainer
    from explainrt.runtime.ort_engine import OnnxRuntimeEngine

    log = fake_cp.log
    gpu = Explainer(DeviceProxyEngine(OnnxRuntimeEngine(host_side_model, max_batch=8), fake_cp), batch_size=5)
    image = np.random.default_rng(4).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    for method, params in (("sidu", {"threshold": 0.05}), ("rise", {"n_masks": 23})):
        del log.ops[:]
        gpu.explain(image, method, **params)
        main = log.current[0]
        positions = [k for k, (what, s, i) in enumerate(log.ops) if what.startswith("masked_batch")]
        assert positions and all(log.ops[k][1] is not main for k in positions)
        uploads = [(s, i) for what, s, i in log.ops[:positions[0]] if s is main and what == "asarray"]
        assert uploads
        for k in positions:
            launch = log.ops[k][1:]
            assert all(happens_before(log, up, launch) for up in uploads), f"{method}: a gather may read stale indices"


# ------------------------------------------------------------------ the real kernel code, run on the host
#
# The .cu sources compiled by the host C++ compiler behind a small shim: every CUDA thread of
# a block is an OS thread, __syncthreads is a block barrier and __shfl_down_sync exchanges
# values through per-warp slots between two warp barriers. Blocks run one after another
# (three at most, so the grid-stride loops wrap). This runs the kernels' own index
# arithmetic and reductions against the reference without a GPU; only the FP16 store (PTX
# inline assembly) is left out.

_SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
using std::max; using std::min;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define asm(...)
struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };
static emu_dim3 blockIdx, blockDim, gridDim;
static thread_local emu_dim3 threadIdx;
static std::unique_ptr<std::barrier<>> block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
static double warp_slots[32][32];
template <class T> inline T __ldg(const T* p) { return *p; }
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
template <class T> inline T __shfl_down_sync(unsigned, T v, int offset) {
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    warp_slots[warp][lane] = (double)v;
    warp_barriers[warp]->arrive_and_wait();
    const T out = lane + offset < 32 ? (T)warp_slots[warp][lane + offset] : v;
    warp_barriers[warp]->arrive_and_wait();
    return out;
}
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, sizeof f); return f; }
static std::mutex atomic_mutex;
inline double atomicAdd(double* p, double v) { std::lock_guard<std::mutex> g(atomic_mutex); double o = *p; *p = o + v; return o; }
#include "resample.cu"
#include "binarize.cu"
extern "C" void emu_launch(unsigned grid_x, unsigned grid_y, unsigned block, void (*run_thread)(void)) {
    gridDim.x = grid_x; gridDim.y = grid_y; blockDim.x = block;
    for (unsigned b = 0; b < grid_x * grid_y; ++b) {
        blockIdx.x = b % grid_x; blockIdx.y = b / grid_x;
        block_barrier = std::make_unique<std::barrier<>>(block);
        warp_barriers.clear();
        for (unsigned w = 0; w < block / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t) threads.emplace_back([t, run_thread] { threadIdx.x = t; run_thread(); });
        for (auto& th : threads) th.join();
    }
}
"""


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    import ctypes
    import shutil
    import subprocess

    import explainrt.kernels as kernels_pkg

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler to run the kernel code on the CPU")
    folder = os.path.dirname(kernels_pkg.__file__)
    tmp = tmp_path_factory.mktemp("host_kernels")
    (tmp / "shim.cpp").write_text(_SHIM)
    lib = tmp / "kernels.so"
    proc = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-I", folder,
                           str(tmp / "shim.cpp"), "-o", str(lib)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "barrier" in proc.stderr:
        pytest.skip(f"the host C++ compiler lacks C++20 <barrier>: {proc.stderr[:200]}")
    assert proc.returncode == 0, proc.stderr
    so = ctypes.CDLL(str(lib))
    params = {}
    for source in ("resample.cu", "binarize.cu"):
        with open(os.path.join(folder, source), encoding="utf-8") as fh:
            params.update(parse_kernels(fh.read()))
    c_scalar = {"int": ctypes.c_int, "float": ctypes.c_float, "double": ctypes.c_double, "long long": ctypes.c_longlong}
    thread_fn = ctypes.CFUNCTYPE(None)

    def launch(name, grid, block, args):  # grid: (x, y)
        bound = bind(name, params[name], args)  # the same type checks as the CuPy stand-in
        c_args = [v.ctypes.data_as(ctypes.c_void_p) if p else c_scalar[t](v.item())
                  for (t, p, _), v in zip(params[name], bound.values())]
        kernel = getattr(so, name)
        kernel.restype = None
        body = thread_fn(lambda: kernel(*c_args))
        so.emu_launch(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(block), body)

    return launch


@pytest.fixture
def host_cp(fake_cp, host_kernels):
    """The CuPy stand-in whose RawModule runs the compiled kernel code (at most 3 blocks of 64 threads)."""
    class RawModule:
        def __init__(self, code=None, options=(), **kwargs):
            pass

        def get_function(self, name):
            assert name != "masked_batch_f16", "the FP16 store is PTX assembly: not run on the host"
            return lambda grid, block, args, shared_mem=0: host_kernels(
                name, (min(grid[0], 3), min(grid[1] if len(grid) > 1 else 1, 3)), 64, args)

    fake_cp.RawModule = RawModule
    fake_cp.ops._functions.clear()
    fake_cp.ops._modules.clear()
    return fake_cp


@pytest.mark.parametrize("border", ["clamp", "reflect"])
def test_compiled_masked_batch_and_upsample(host_cp, border):
    ops = host_cp.ops
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 21, 17)).astype(np.float32)
    masks = rng.random((4, 5, 1)).astype(np.float32)  # a one-pixel-wide axis too
    shift, scale = rng.standard_normal(4).astype(np.float32), rng.random(4).astype(np.float32)
    np.testing.assert_allclose(ops.masked_batch(x, masks, border=border, shift=shift, scale=scale),
                               reference.masked_batch(x, masks, border=border, shift=shift, scale=scale),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.upsample_bilinear(masks, (21, 17), border),
                               reference.upsample_bilinear(masks, (21, 17), border), rtol=1e-5, atol=1e-6)


def test_compiled_rise_kernels(host_cp):
    ops = host_cp.ops
    rng = np.random.default_rng(6)
    grids, offsets, full_hw = reference.rise_grids(200, 4, 0.5, (19, 23), seed=8)  # 200: masks split 3 ways
    assert host_cp.ops._crop_sum_splits(200, 2) == 3
    x = rng.standard_normal((3, 19, 23)).astype(np.float32)
    np.testing.assert_allclose(
        ops.masked_batch(x, grids, border="reflect", full_hw=full_hw, offsets=offsets),
        reference.masked_batch(x, grids, border="reflect", full_hw=full_hw, offsets=offsets), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.upsample_bilinear(grids, (19, 23), "reflect", full_hw, offsets),
                               reference.upsample_bilinear(grids, (19, 23), "reflect", full_hw, offsets),
                               rtol=1e-5, atol=1e-6)
    weights = rng.random((200, 10)).astype(np.float32)  # 10 targets: two kernel passes
    np.testing.assert_allclose(ops.weighted_crop_sum(weights, grids, offsets, (19, 23), full_hw),
                               reference.weighted_crop_sum(weights, grids, offsets, (19, 23), full_hw),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("border", ["clamp", "reflect"])
def test_compiled_minmax_reduction(host_cp, border):
    masks = np.random.default_rng(9).standard_normal((5, 4, 6)).astype(np.float32)
    lo, hi = host_cp.ops.upsampled_minmax(masks, (27, 31), border)  # 5 masks on 3 blocks: blocks loop
    want_lo, want_hi = reference.upsampled_minmax(masks, (27, 31), border)
    np.testing.assert_allclose(lo, want_lo, rtol=1e-6)
    np.testing.assert_allclose(hi, want_hi, rtol=1e-6)


def test_compiled_binarisation(host_cp):
    acts = np.maximum(np.random.default_rng(7).standard_normal((5, 9, 11)), 0).astype(np.float32)
    acts[1] = 0.3  # constant channel
    np.testing.assert_array_equal(host_cp.ops.threshold_masks(acts, 0.2), reference.threshold_masks(acts, 0.2))
    for k in (1.0, 2.0):
        binary, mu = host_cp.ops.ksigma_binarize(acts, k)
        want_binary, want_mu = reference.ksigma_binarize(acts, k)
        np.testing.assert_array_equal(binary, want_binary)
        np.testing.assert_allclose(mu, want_mu, rtol=1e-6)
