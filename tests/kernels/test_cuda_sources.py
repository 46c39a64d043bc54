"""CPU checks of the CUDA path: every .cu file compiles to PTX, cuda.py mirrors reference.py,
and the tap tables the kernels sample with reproduce the NumPy reference.

None of this imports CuPy: cuda.py is read as source (AST), the kernels are compiled by nvcc.
"""
import ast
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import explainrt.kernels as kernels_pkg
from explainrt.kernels import reference
from explainrt.kernels.taps import bilinear_taps

KERNEL_DIR = os.path.dirname(kernels_pkg.__file__)
CU_FILES = sorted(f for f in os.listdir(KERNEL_DIR) if f.endswith(".cu"))
CUDA_PY = os.path.join(KERNEL_DIR, "cuda.py")
REFERENCE_PY = os.path.join(KERNEL_DIR, "reference.py")
NVCC = shutil.which("nvcc")


def _tree(path):
    with open(path, encoding="utf-8") as fh:
        return ast.parse(fh.read())


def _launched_kernels() -> set:
    """Kernel names cuda.py launches: string literals passed to _launch(...)/_kernel(...)."""
    names = set()
    for node in ast.walk(_tree(CUDA_PY)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("_launch", "_kernel"):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
            elif isinstance(first, ast.IfExp):  # "a" if cond else "b"
                names.update(v.value for v in (first.body, first.orelse) if isinstance(v, ast.Constant))
    return names


def _source_table() -> dict:
    for node in ast.walk(_tree(CUDA_PY)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_SOURCES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("cuda.py has no _SOURCES table")


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compiled to PTX here")
    out = {}
    tmp = tmp_path_factory.mktemp("ptx")
    for name in CU_FILES:
        target = tmp / (name + ".ptx")
        proc = subprocess.run([NVCC, "-ptx", "-arch=compute_80", "-std=c++17", os.path.join(KERNEL_DIR, name),
                               "-o", str(target)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"nvcc failed on {name}:\n{proc.stderr}"
        out[name] = target.read_text()
    return out


def test_there_are_cuda_sources():
    assert {"resample.cu", "binarize.cu"} <= set(CU_FILES)


def test_every_launched_kernel_is_a_ptx_entry(ptx):
    launched = _launched_kernels()
    table = _source_table()
    assert launched, "found no kernel launches in cuda.py"
    assert launched <= set(table), f"kernels launched but missing from _SOURCES: {launched - set(table)}"
    for kernel, source in table.items():
        entries = set(re.findall(r"\.entry\s+(\w+)\s*\(", ptx[source]))
        assert kernel in entries, f"{kernel} is not an unmangled .entry of {source} (entries: {sorted(entries)})"


def _signatures(path) -> dict:
    out = {}
    for node in _tree(path).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            args = node.args
            defaults = [ast.unparse(d) for d in args.defaults]
            out[node.name] = ([a.arg for a in args.args], defaults)
    return out


def test_cuda_module_mirrors_the_reference():
    ref, gpu = _signatures(REFERENCE_PY), _signatures(CUDA_PY)
    mirrored = ["upsample_bilinear", "masked_batch", "upsampled_minmax", "weighted_mask_sum", "weighted_crop_sum",
                "threshold_masks", "ksigma_binarize"]
    for name in mirrored:
        assert name in gpu, f"cuda.py lacks {name}"
        assert gpu[name] == ref[name], f"{name}: cuda.py {gpu[name]} != reference {ref[name]}"
    # grids are drawn on the host: re-exported, not reimplemented
    src = open(CUDA_PY, encoding="utf-8").read()
    assert re.search(r"from \.reference import .*\binterp_matrix\b.*\brise_grids\b", src)


def _sample_with_taps(masks, taps_y, taps_x, rows, cols):
    """NumPy model of resample.cu's sample_bilinear: vertical taps first, then horizontal, float32."""
    (iy, wy), (ix, wx) = taps_y, taps_x
    b = np.arange(masks.shape[0])[:, None, None]
    y0, y1 = iy[rows, 0][:, :, None], iy[rows, 1][:, :, None]
    x0, x1 = ix[cols, 0][:, None, :], ix[cols, 1][:, None, :]
    wy0, wy1 = wy[rows, 0][:, :, None], wy[rows, 1][:, :, None]
    wx0, wx1 = wx[cols, 0][:, None, :], wx[cols, 1][:, None, :]
    m = masks.astype(np.float32)
    c0 = wy0 * m[b, y0, x0] + wy1 * m[b, y1, x0]
    c1 = wy0 * m[b, y0, x1] + wy1 * m[b, y1, x1]
    return wx0 * c0 + wx1 * c1


@pytest.mark.parametrize("border", ["clamp", "reflect"])
@pytest.mark.parametrize("hw,out_hw", [((7, 7), (224, 224)), ((1, 5), (9, 13)), ((2, 3), (17, 4)), ((6, 6), (6, 6)),
                                       ((9, 4), (5, 3))])
def test_tap_tables_reproduce_the_reference(border, hw, out_hw):
    rng = np.random.default_rng(1)
    masks = rng.standard_normal((4, *hw)).astype(np.float32)
    H, W = out_hw
    taps_y, taps_x = bilinear_taps(hw[0], border, H), bilinear_taps(hw[1], border, W)
    for idx, wt in (taps_y, taps_x):
        assert idx.dtype == np.int32 and wt.dtype == np.float32 and idx.shape == wt.shape
        assert idx.min() >= 0
    assert taps_y[0].max() < hw[0] and taps_x[0].max() < hw[1]
    rows = np.broadcast_to(np.arange(H), (4, H))
    cols = np.broadcast_to(np.arange(W), (4, W))
    got = _sample_with_taps(masks, taps_y, taps_x, rows, cols)
    want = reference.upsample_bilinear(masks, out_hw, border)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tap_tables_reproduce_rise_crops():
    grids, offsets, full_hw = reference.rise_grids(6, 7, 0.5, (50, 44), seed=3)
    H, W = 50, 44
    taps_y, taps_x = bilinear_taps(7, "reflect", full_hw[0]), bilinear_taps(7, "reflect", full_hw[1])
    rows = offsets[:, :1] + np.arange(H)[None]
    cols = offsets[:, 1:] + np.arange(W)[None]
    got = _sample_with_taps(grids, taps_y, taps_x, rows, cols)
    want = reference.upsample_bilinear(grids, (H, W), "reflect", full_hw, offsets)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tap_weights_are_the_reference_matrix_entries():
    idx, wt = bilinear_taps(5, "reflect", 23)
    dense = np.zeros((23, 5), np.float64)
    np.add.at(dense, (np.repeat(np.arange(23), 2), idx.reshape(-1)), wt.reshape(-1).astype(np.float64))
    np.testing.assert_array_equal(dense.astype(np.float32), reference.interp_matrix(23, 5, "reflect"))


def _find_nvrtc():
    """libnvrtc from the system, CUDA_PATH, or an nvidia-cuda-nvrtc wheel; None if absent."""
    import ctypes.util
    import glob
    import site
    import sys

    found = ctypes.util.find_library("nvrtc")
    if found:
        return found
    roots = [os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    roots += [os.path.join(p, "nvidia") for p in site.getsitepackages() + sys.path if p]
    for root in roots:
        for pattern in ("lib64/libnvrtc.so*", "*/lib/libnvrtc.so*", "lib/libnvrtc.so*"):
            hits = sorted(h for h in glob.glob(os.path.join(root, pattern)) if "builtins" not in h and ".alt." not in h)
            if hits:
                return hits[0]
    return None


def test_sources_compile_with_nvrtc_as_cupy_does():
    """CuPy compiles with NVRTC, which (unlike nvcc) includes no CUDA headers implicitly."""
    import ctypes

    path = _find_nvrtc()
    if path is None:
        pytest.skip("libnvrtc not found (CuPy's compiler; nvcc's PTX check above still ran)")
    lib = ctypes.CDLL(path)
    for name in CU_FILES:
        with open(os.path.join(KERNEL_DIR, name), "rb") as fh:
            code = fh.read()
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), code, name.encode(), 0, None, None) == 0
        options = [b"-std=c++17", b"--gpu-architecture=compute_80"]
        result = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        assert result == 0, f"NVRTC failed on {name}:\n{log.value.decode()}"
