"""A NumPy stand-in for CuPy, for CPU tests of the GPU path's host side.

Arrays are NumPy arrays (with a CuPy-like ``.data.ptr``); streams and events record what was
asked of them; ``RawModule`` kernels are Python models of the CUDA kernels, bound to the
parameter lists parsed from the .cu sources and checking every argument's C type.

Stream order is modelled too: uploads (``asarray``), allocations and kernel launches are
operations numbered per stream (``log.ops``), an event remembers how many operations its
stream had when it was recorded, and ``happens_before(a, b)`` says whether operation ``a`` is
ordered before ``b`` through the same stream or a chain of event waits — the question a real
GPU answers with a race. Shared by
tests/kernels/test_cuda_host_side.py and tests/runtime/test_tensorrt_engine_host_side.py.
"""
import contextlib
import importlib
import re
import sys
import types

import numpy as np


class DeviceArray(np.ndarray):
    """A NumPy array that also answers CuPy's ``arr.data.ptr``."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=int(self.ctypes.data))


POOL_ALIGNMENT = 512  # CuPy's memory pool hands out 512-byte-aligned blocks


def _pool_copy(values) -> "DeviceArray":
    """A C-contiguous copy of ``values`` in 512-byte-aligned memory, like a CuPy pool allocation."""
    values = np.asarray(values)
    raw = np.empty(values.nbytes + POOL_ALIGNMENT, dtype=np.uint8)
    offset = (-raw.ctypes.data) % POOL_ALIGNMENT
    out = raw[offset:offset + values.nbytes].view(values.dtype).reshape(values.shape)
    out[...] = values
    return out.view(DeviceArray)


def _device(fn, log=None, what=None):
    def wrapped(*args, **kwargs):
        given = args[0] if args else None
        if what in ("asarray", "ascontiguousarray") and isinstance(given, DeviceArray):
            dtype = kwargs.get("dtype", args[1] if len(args) > 1 else None)
            same = dtype is None or np.dtype(dtype) == given.dtype
            if same and (what == "asarray" or given.flags.c_contiguous):
                return given  # CuPy: no copy, no operation
        out = _pool_copy(fn(*args, **kwargs))
        if log is not None:
            log.op(what)
        return out
    return wrapped


# ------------------------------------------------------------------ CUDA parameter lists

_C_SCALARS = {"int": np.int32, "float": np.float32, "double": np.float64, "long long": np.int64}
_C_POINTERS = {"float": np.float32, "double": np.float64, "int": np.int32,
               "unsigned short": np.float16}  # f16 stored as its bits


def parse_kernels(code: str) -> dict:
    """{kernel name: [(C base type, is pointer, parameter name), ...]} of extern "C" kernels."""
    kernels = {}
    for name, params in re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', code):
        parsed = []
        for param in params.split(","):
            words = param.replace("__restrict__", " ").replace("const", " ").replace("*", " * ").split()
            pointer = "*" in words
            words = [w for w in words if w != "*"]
            parsed.append((" ".join(words[:-1]), pointer, words[-1]))
        kernels[name] = parsed
    return kernels


def bind(name, params, args) -> dict:
    assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters"
    bound = {}
    for (ctype, pointer, pname), value in zip(params, args):
        if pointer:
            assert isinstance(value, np.ndarray), f"{name}({pname}): expected a device array, got {type(value)}"
            assert value.dtype == _C_POINTERS[ctype], f"{name}({pname}): {ctype}* given {value.dtype}"
            assert value.flags.c_contiguous, f"{name}({pname}): not contiguous"
        else:
            assert type(value) is _C_SCALARS[ctype], f"{name}({pname}): {ctype} given {type(value).__name__}"
        bound[pname] = value
    return bound


# ------------------------------------------------------------------ Python models of the kernels


def _sample(masks, a, rows, cols):
    """resample.cu's sample_bilinear for masks (N,h,w) at table rows (N,H), columns (N,W)."""
    iy, wy = a["ty_idx"].reshape(-1, 2), a["ty_wt"].reshape(-1, 2)
    ix, wx = a["tx_idx"].reshape(-1, 2), a["tx_wt"].reshape(-1, 2)
    b = np.arange(masks.shape[0])[:, None, None]
    y0, y1, wy0, wy1 = (t[rows, k][:, :, None] for t, k in ((iy, 0), (iy, 1), (wy, 0), (wy, 1)))
    x0, x1, wx0, wx1 = (t[cols, k][:, None, :] for t, k in ((ix, 0), (ix, 1), (wx, 0), (wx, 1)))
    c0 = wy0 * masks[b, y0, x0] + wy1 * masks[b, y1, x0]
    c1 = wy0 * masks[b, y0, x1] + wy1 * masks[b, y1, x1]
    return (wx0 * c0 + wx1 * c1).astype(np.float32)


def _positions(a, n, offsets_on):
    H, W, fh, fw = int(a["H"]), int(a["W"]), int(a["full_h"]), int(a["full_w"])
    dy = dx = np.zeros((n, 1), np.int64)
    if offsets_on:
        offs = a["offsets"].reshape(n, 2).astype(np.int64)
        dy, dx = np.clip(offs[:, :1], 0, fh - H), np.clip(offs[:, 1:], 0, fw - W)
    return dy + np.arange(H)[None], dx + np.arange(W)[None]


def model_masked_batch(a):
    n, c, h, w, H, W = (int(a[k]) for k in ("n", "channels", "h", "w", "H", "W"))
    opt = int(a["options"])
    rows, cols = _positions(a, n, opt & 4)
    m = _sample(a["masks"].reshape(n, h, w), a, rows, cols)
    if opt & 1:
        m = m + a["shift"][:n, None, None]
    if opt & 2:
        m = m * a["scale"][:n, None, None]
    a["out"].reshape(n, c, H, W)[...] = a["image"].reshape(c, H, W)[None] * m[:, None]


def model_upsample(a):
    n, h, w, H, W = (int(a[k]) for k in ("n", "h", "w", "H", "W"))
    rows, cols = _positions(a, n, int(a["options"]) & 4)
    a["out"].reshape(n, H, W)[...] = _sample(a["masks"].reshape(n, h, w), a, rows, cols)


def model_minmax(a, block):
    assert block % 32 == 0 and block <= 1024
    n, h, w, H, W = (int(a[k]) for k in ("n", "h", "w", "H", "W"))
    rows, cols = np.broadcast_to(np.arange(H), (n, H)), np.broadcast_to(np.arange(W), (n, W))
    up = _sample(a["masks"].reshape(n, h, w), a, rows, cols)
    a["lo"][:n] = up.min(axis=(1, 2))
    a["hi"][:n] = up.max(axis=(1, 2))


def model_crop_sum(a):
    n, t, t0, tn, h, w, H, W = (int(a[k]) for k in ("n", "targets", "t0", "tn", "h", "w", "H", "W"))
    assert 1 <= tn <= 8
    rows, cols = _positions(a, n, True)
    up = _sample(a["grids"].reshape(n, h, w), a, rows, cols).astype(np.float64)
    weights = a["weights"].reshape(n, t)[:, t0:t0 + tn].astype(np.float64)
    a["acc"].reshape(t, H, W)[t0:t0 + tn] += np.einsum("nk,nyx->kyx", weights, up)  # all block rows at once


def model_threshold(a):
    n = int(a["n"])
    a["out"].reshape(-1)[:n] = (a["a"].reshape(-1)[:n] > a["tau"]).astype(np.float32)


def model_ksigma(a, block):
    assert block % 32 == 0 and block <= 1024
    c, hw = int(a["channels"]), int(a["hw"])
    flat = a["a"].reshape(c, hw).astype(np.float64)
    mean = flat.mean(axis=1)
    sigma = np.sqrt(((flat - mean[:, None]) ** 2).mean(axis=1))
    a["binary"].reshape(c, hw)[...] = flat >= (mean + float(a["k_sigma"]) * sigma)[:, None]
    a["mu"][:c] = mean


MODELS = {
    "masked_batch_f32": lambda a, block: model_masked_batch(a),
    "masked_batch_f16": lambda a, block: model_masked_batch(a),
    "upsample_bilinear_f32": lambda a, block: model_upsample(a),
    "upsampled_minmax_f32": model_minmax,
    "weighted_crop_sum_f32": lambda a, block: model_crop_sum(a),
    "threshold_masks_f32": lambda a, block: model_threshold(a),
    "ksigma_binarize_f32": model_ksigma,
}


# ------------------------------------------------------------------ a NumPy stand-in for CuPy


class FakeStream:
    def __init__(self, null=False, non_blocking=False, log=None, ptr=None):
        self.ptr = ptr if ptr is not None else 0 if null else id(self)
        self.non_blocking = non_blocking
        self.log = log
        self.count = 0  # operations enqueued so far
        log.streams[self.ptr] = self

    def __enter__(self):
        self.log.current.append(self)
        return self

    def __exit__(self, *exc):
        self.log.current.pop()

    def record(self, event=None):
        event = event or FakeEvent()
        event.record(self)
        return event

    def wait_event(self, event):
        assert event.stream is not None, "waiting on an event that was never recorded"
        self.log.events.append(("wait", self, event.stream))
        self.log.waits.append((self, self.count, event.stream, event.count))

    def synchronize(self):
        self.log.events.append(("sync", self, None))


class FakeEvent:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.stream = None
        self.count = 0
        self.done = True  # the host never has to wait in these tests

    def record(self, stream=None):
        assert stream is not None, "record on an explicit stream (CuPy's default would be the current one)"
        self.stream = stream
        self.count = stream.count


def happens_before(log, first, then, depth=6) -> bool:
    """Whether op ``first`` = (stream, index) is ordered before the point ``then`` = (stream, index)
    (the index-th operation of that stream, or the point after index operations)."""
    (s1, i1), (s2, i2) = first, then
    if s1 is s2:
        return i1 < i2
    # a wait enqueued on s2 before that point, on an event recorded after `first`
    return depth > 0 and any(waiter is s2 and at <= i2 and happens_before(log, first, (on, count), depth - 1)
                             for waiter, at, on, count in log.waits if on is not s2)


def make_fake_cupy():
    log = types.SimpleNamespace(launches=[], events=[], current=[], ops=[], waits=[], streams={})

    def op(what, stream=None):
        """Enqueue one operation on ``stream`` (default: the current one); returns (stream, index)."""
        stream = stream or log.current[-1]
        log.ops.append((what, stream, stream.count))
        stream.count += 1
        return stream, stream.count - 1

    log.op = op
    log.current.append(FakeStream(null=True, log=log))

    class RawModule:
        def __init__(self, code=None, options=(), **kwargs):
            assert "-std=c++17" in options
            self.kernels = parse_kernels(code)

        def get_function(self, name):
            params = self.kernels[name]

            def launch(grid, block, args, shared_mem=0):
                assert len(grid) >= 1 and grid[0] >= 1 and block[0] >= 1
                log.launches.append((name, log.current[-1]))
                log.op(name)
                MODELS[name](bind(name, params, args), block[0])
            return launch

    fake = types.ModuleType("cupy")
    fake.__getattr__ = lambda attr: getattr(np, attr)  # everything else: NumPy
    fake.asnumpy = lambda a: np.asarray(a).view(np.ndarray)
    fake.ndarray = DeviceArray
    for name in ("asarray", "ascontiguousarray", "empty", "zeros", "full", "ones", "array"):
        setattr(fake, name, _device(getattr(np, name), log, name))
    fake.RawModule = RawModule
    fake.cuda = types.SimpleNamespace(
        Device=lambda *a: types.SimpleNamespace(id=0),
        get_current_stream=lambda: log.current[-1],
        Stream=lambda null=False, non_blocking=False, ptds=False: FakeStream(
            null, non_blocking, log, ptr=2 if ptds else None),
        Event=FakeEvent,
    )
    fake.log = log
    return fake


@contextlib.contextmanager
def installed_fake_cupy():
    """``import cupy`` gives the stand-in and ``fake.ops`` is explainrt.kernels.cuda imported
    against it; everything is undone afterwards so real CuPy tests are unaffected."""
    import explainrt.kernels as kernels_pkg

    fake = make_fake_cupy()
    saved = {name: sys.modules.get(name) for name in ("cupy", "explainrt.kernels.cuda")}
    sys.modules["cupy"] = fake
    sys.modules.pop("explainrt.kernels.cuda", None)
    try:
        fake.ops = importlib.import_module("explainrt.kernels.cuda")
        yield fake
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        if hasattr(kernels_pkg, "cuda"):
            delattr(kernels_pkg, "cuda")
