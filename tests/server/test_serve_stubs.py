"""The checked-in gRPC stubs are what scripts/gen_proto.py generates from the .proto."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUBS = os.path.join(ROOT, "explainrt", "proto", "explainrt", "v1")
GENERATED = ("explainrt_pb2.py", "explainrt_pb2.pyi", "explainrt_pb2_grpc.py")


def test_checked_in_stubs_match_a_fresh_generation(tmp_path):
    pytest.importorskip("grpc_tools")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gen_proto.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in GENERATED:
        fresh = (tmp_path / "explainrt" / "v1" / name).read_text()
        with open(os.path.join(STUBS, name)) as fh:
            assert fh.read() == fresh, f"{name} is stale: run `python scripts/gen_proto.py` and commit the result"


def test_stubs_import_inside_the_package():
    """The grpc module imports its messages relatively, so nothing resolves against a top-level `explainrt.v1`."""
    from explainrt.proto.explainrt.v1 import explainrt_pb2, explainrt_pb2_grpc

    with open(os.path.join(STUBS, "explainrt_pb2_grpc.py")) as fh:
        assert "from . import explainrt_pb2 as" in fh.read()
    assert explainrt_pb2.DESCRIPTOR.package == "explainrt.v1"
    assert explainrt_pb2.DESCRIPTOR.name == "explainrt/v1/explainrt.proto"
    assert explainrt_pb2_grpc.ExplainServiceStub is not None


def test_core_cli_does_not_import_grpc():
    """`explainrt methods` (and the parser with serve/client registered) works without the serve extra."""
    code = ("import sys; from explainrt.cli import build_parser; build_parser(); "
            "assert 'grpc' not in sys.modules, 'grpc imported'; "
            "assert 'explainrt.server.app' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
