"""GPU tests: marked `gpu`, skipped (and reported as skipped) without CuPy and a CUDA device."""
import functools

import pytest


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason():
    """None when CuPy imports and sees a CUDA device, else why not."""
    try:
        import cupy
    except ImportError:
        return "needs CuPy (pip install 'explainrt[gpu]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        return f"no usable CUDA device ({exc})"
    return None if count > 0 else "no CUDA device"


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            reason = reason or cuda_unavailable_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def cp():
    """The cupy module (the test is skipped without a device)."""
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import cupy

    return cupy


@pytest.fixture(scope="session")
def lite0_path(lite0):
    """EfficientNet-Lite0 exported once for the session (tests/conftest.py)."""
    return lite0[1]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A small CNN (random weights) exported with activation outputs, 48x40 input, 10 classes."""
    torch = pytest.importorskip("torch")
    from explainrt.export import export_torch

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Hardswish(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 24, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.onnx")
    export_torch(model.eval(), path, input_size=(48, 40))
    return path
