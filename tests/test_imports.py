"""Heavy optional dependencies stay lazy: the core runtime imports none of them."""
from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import explainrt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "cupy", "tensorrt", "grpc", "matplotlib", "skimage", "scipy", "pytorch_grad_cam", "ray", "pyarrow",
         "pandas")


def test_core_imports_no_heavy_dependency():
    code = (
        "import sys, explainrt, explainrt.cli, explainrt.api, explainrt.explainers, explainrt.export, "
        "explainrt.runtime, explainrt.kernels\n"
        "explainrt.cli.build_parser()\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_module_imports():
    """Each module imports on its own (optional dependencies only inside functions)."""
    failures = []
    for info in pkgutil.walk_packages(explainrt.__path__, "explainrt."):
        if info.name.endswith("__main__"):
            continue
        try:
            __import__(info.name)
        except ImportError as exc:  # a missing optional extra must not break import
            failures.append(f"{info.name}: {exc}")
    assert not failures, failures


def test_client_never_imports_the_server():
    """Imports run down the house: the client shares the codec beside the proto stubs, not the server's modules."""
    code = (
        "import sys, explainrt.client, explainrt.proto.codec\n"
        "from explainrt.client import ExplainClient\n"
        "server = sorted(m for m in sys.modules if m.startswith('explainrt.server'))\n"
        "assert not server, server\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_ray_commands_name_the_extra_when_ray_is_missing(monkeypatch, tmp_path, capsys):
    from explainrt.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    for argv in (["explain", "--ray", "--model", "m.onnx", "--method", "fem", "img.png"],
                 ["eval", "--ray", "--model", "m.onnx", "--methods", "fem", "images/"]):
        assert main([*argv, "-o", str(tmp_path / argv[0])]) == 2
        err = capsys.readouterr().err
        assert "needs the Python package 'ray'" in err and "pip install 'explainrt[ray]'" in err, err
        assert len(err.strip().splitlines()) == 1
