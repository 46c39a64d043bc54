"""Fixtures: tiny models exported to ONNX once per session."""
import pytest


@pytest.fixture(scope="session")
def region_model(tmp_path_factory):
    from explainrt.export import export_torch
    from metric_models import RegionScore

    path = str(tmp_path_factory.mktemp("region") / "region.onnx")
    export_torch(RegionScore().eval(), path, input_size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1), layer="features")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from explainrt.export import export_torch
    from metric_models import TinyCNN

    path = str(tmp_path_factory.mktemp("tiny") / "tiny.onnx")
    export_torch(TinyCNN().eval(), path, input_size=(16, 16), mean=(127.5,) * 3, std=(64.0,) * 3)
    return path
