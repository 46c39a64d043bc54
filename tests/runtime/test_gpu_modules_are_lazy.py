"""The GPU modules import without CuPy, TensorRT or torch: those load only when used."""
import subprocess
import sys


def test_gpu_modules_import_no_heavy_dependencies():
    code = (
        "import sys\n"
        "import explainrt, explainrt.cli, explainrt.runtime.cli, explainrt.runtime.torch_engine,"
        " explainrt.runtime.onnx_torch, explainrt.runtime.tensorrt_engine, explainrt.runtime.tensorrt_build, explainrt.runtime.staging, explainrt.kernels.taps\n"
        "explainrt.cli.build_parser()\n"
        "heavy = [m for m in ('cupy', 'tensorrt', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
