"""Fixtures of the server tests: tiny CNNs exported in the test, a real server on loopback, a real client."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

pytest.importorskip("grpc")
pytest.importorskip("grpc_health.v1.health")
pytest.importorskip("grpc_reflection.v1alpha.reflection")
pytest.importorskip("prometheus_client")
torch = pytest.importorskip("torch")

from serve_helpers import INPUT_HW, TinyNet, export_tiny, start_server, wait_for  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Two exported tiny models (tiny, tiny2) and one ONNX file without explainrt metadata (skipped)."""
    root = tmp_path_factory.mktemp("models")
    export_tiny(str(root / "tiny.onnx"), seed=0)
    export_tiny(str(root / "tiny2.onnx"), seed=1)
    plain = TinyNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice about the legacy exporter
        torch.onnx.export(plain, (torch.zeros(1, 3, *INPUT_HW),), str(root / "plain.onnx"), dynamo=False,
                          input_names=["input"], output_names=["logits"])
    return str(root)


@pytest.fixture(scope="session")
def single_model_dir(model_dir, tmp_path_factory):
    """A directory holding only `tiny` (so requests may leave the model name empty)."""
    root = tmp_path_factory.mktemp("single")
    os.link(os.path.join(model_dir, "tiny.onnx"), root / "tiny.onnx")
    return str(root)


@pytest.fixture(scope="session")
def image():
    """A 40x48 RGB uint8 picture (not the model's size: the server resizes)."""
    rng = np.random.default_rng(0)
    return (rng.random((40, 48, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def png_path(image, tmp_path_factory):
    from explainrt.imaging import write_png

    path = tmp_path_factory.mktemp("images") / "picture.png"
    write_png(str(path), image)
    return str(path)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def client(server):
    from explainrt.client import ExplainClient

    with ExplainClient(f"127.0.0.1:{server.port}", timeout=30, model="tiny") as c:
        yield c


@pytest.fixture
def idle(server):
    """After the test: the server's workers are free again (long requests cancelled and stopped)."""
    yield server
    assert wait_for(lambda: server.scheduler.running == 0 and server.scheduler.depth == 0, timeout=10), \
        "a request kept a worker busy after its test"
