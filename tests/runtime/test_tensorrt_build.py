"""TensorRT build plumbing that needs no GPU: the CLI subcommand, plan naming, FP16 ONNX conversion."""
import importlib.util
import json

import numpy as np
import pytest

from explainrt import cli
from explainrt.runtime.tensorrt_build import default_plan_path, plan_info_path

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_build_is_a_cli_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["build", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--fp16", "--tf32", "--max-batch", "--opt-batch", "--timing-cache", "--output"):
        assert flag in out


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the missing-dependency message cannot be seen")
def test_build_without_tensorrt_names_the_extra(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    assert cli.main(["build", str(model), "-o", str(tmp_path / "m.plan")]) == 2
    err = capsys.readouterr().err
    assert "tensorrt" in err and "explainrt[trt]" in err


def test_build_rejects_bad_arguments(tmp_path, capsys):
    assert cli.main(["build", str(tmp_path / "m.txt")]) == 2
    assert ".onnx" in capsys.readouterr().err
    assert cli.main(["build", str(tmp_path / "m.onnx"), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


def test_plan_paths():
    assert default_plan_path("models/lite0.onnx", 64, False) == "models/lite0.b64.fp32.plan"
    assert default_plan_path("m.onnx", 8, True) == "m.b8.fp16.plan"
    assert plan_info_path("m.b8.fp16.plan") == "m.b8.fp16.plan.json"


def test_fp16_onnx_keeps_float32_io_and_the_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    from explainrt.export import export_torch
    from explainrt.runtime.tensorrt_build import onnx_to_fp16

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 5))
    src, dst = str(tmp_path / "m.onnx"), str(tmp_path / "m.fp16.onnx")
    export_torch(model.eval(), src, input_size=(16, 16))
    onnx_to_fp16(src, dst)
    half = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    assert [i.type for i in half.get_inputs()] == ["tensor(float)"]
    assert {o.name: o.type for o in half.get_outputs()} == \
        {n: "tensor(float)" for n in ("logits", "probs", "activations")}
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for a, b in zip(half.run(None, {"input": x}), full.run(None, {"input": x})):
        assert np.abs(a - b).max() <= 1e-2 * max(1.0, np.abs(b).max())
    # the explainrt metadata survives the conversion (TensorRT builds read it from the file)
    import onnx

    props = {p.key: p.value for p in onnx.load(dst).metadata_props}
    assert json.loads(props["explainrt"])["activation_output"] == "activations"
