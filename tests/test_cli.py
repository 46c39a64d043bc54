"""The command line end to end, through a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import random_rgb, write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "explainrt", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_explain_all_methods_writes_files(tiny_model, tmp_path):
    img = write_image(tmp_path / "pic.png", random_rgb(50, 70))
    out = tmp_path / "out"
    proc = run_cli("explain", "--model", tiny_model[1], "--method", "all", img, "-o", str(out), "--json",
                   "-p", "n_masks=40", "--batch-size", "16", "--plain")
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["method"] for r in records] == ["sidu", "scorecam", "rise", "fem", "featurecam"]
    for r in records:
        assert r["label"].startswith("thing") and 0 <= r["probability"] <= 1 and r["forward_passes"] >= 1
        sal = np.load(out / f"pic.{r['method']}.npy")
        assert sal.shape == (32, 32) and 0 <= sal.min() and sal.max() <= 1
        import cv2

        png = cv2.imread(str(out / f"pic.{r['method']}.png"))
        assert png.shape == (50, 70, 3)  # the bare (--plain) overlay at the original size
    assert records[2]["forward_passes"] == 41
    assert (out / "pic.featurecam.vis.png").exists()


def test_explain_human_output(tiny_model, tmp_path):
    img = write_image(tmp_path / "a.png", random_rgb(32, 32))
    proc = run_cli("explain", "--model", tiny_model[1], "--method", "fem", img, "-o", str(tmp_path / "o"))
    assert "a: thing" in proc.stdout and "fem: 1 forward passes" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--method", "lime"], "unknown method 'lime'"),
    (["--target", "99"], "out of range"),
    (["-p", "n_masks=0", "--method", "rise"], "n_masks must be >= 1"),
    (["-p", "bogus=1"], "unknown parameter"),
])
def test_explain_bad_arguments_exit_nonzero_with_one_line(tiny_model, tmp_path, args, message):
    img = write_image(tmp_path / "a.png", random_rgb(32, 32))
    proc = run_cli("explain", "--model", tiny_model[1], img, "-o", str(tmp_path / "o"), *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("value,message", [
    ("1" * 5000, "parameter n_masks: 11111111111111111111... is not a usable value"),  # was a ValueError traceback
    ("[" * 1000 + "]" * 1000, "parameter n_masks: the value nests lists/objects more than 32 deep"),  # RecursionError
    ("2" * 20_000, "parameter n_masks: the value is 20000 characters long"),
])
def test_parameter_values_the_json_decoder_cannot_take_exit_2_with_one_line(tiny_model, tmp_path, value, message):
    img = write_image(tmp_path / "a.png", random_rgb(32, 32))
    proc = run_cli("explain", "--model", tiny_model[1], img, "-o", str(tmp_path / "o"), "--method", "rise",
                   "-p", f"n_masks={value}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_explain_corrupt_image(tiny_model, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    proc = run_cli("explain", "--model", tiny_model[1], str(bad), "-o", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "could not decode" in proc.stderr and "Traceback" not in proc.stderr


def test_truncated_png_is_one_error_line_per_image(tiny_model, tmp_path):
    """Our error only: no OpenCV warning line, and the path once."""
    good = write_image(tmp_path / "good.png", random_rgb(32, 32))
    data = open(good, "rb").read()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    proc = run_cli("explain", "--model", tiny_model[1], str(tmp_path / "cut.png"), good, "--method", "fem",
                   "-o", str(tmp_path / "o"), "--no-progress", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"explainrt: error: {tmp_path / 'cut.png'}: could not decode the image ({len(data) // 2} bytes); it is "
        "corrupt or not in a format OpenCV reads (PNG, JPEG, BMP, TIFF, WebP)"]


@pytest.mark.parametrize("command", [
    ["explain", "--method", "fem"], ["eval", "--methods", "fem"], ["export", "--onnx", "MODEL"],
])
def test_output_that_is_a_file_fails_before_any_work(tiny_model, tmp_path, command):
    img = write_image(tmp_path / "a.png", random_rgb(32, 32))
    afile = tmp_path / "afile"
    afile.write_text("x")
    command = [tiny_model[1] if c == "MODEL" else c for c in command]
    model = [] if command[0] == "export" else ["--model", tiny_model[1], img]
    target = str(afile / "x.onnx") if command[0] == "export" else str(afile)
    proc = run_cli(*command, *model, "-o", target, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "is an existing file" in proc.stderr or "cannot create" in proc.stderr


def test_bench_json_that_is_a_directory_fails_before_the_runs(tiny_model, tmp_path):
    proc = run_cli("bench", "--model", tiny_model[1], "--methods", "fem", "--json", str(tmp_path), check=False)
    assert proc.returncode == 2 and "is a directory" in proc.stderr and "Traceback" not in proc.stderr


def test_explain_model_without_activation_output(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    img = write_image(tmp_path / "a.png", random_rgb(8, 8))
    proc = run_cli("explain", "--model", str(path), img, "-o", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "no explainrt metadata" in proc.stderr


def test_export_onnx_surgery_cli(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.conftest import tiny_cnn

    src = str(tmp_path / "plain.onnx")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_cnn(), (torch.zeros(1, 3, 32, 32),), src, input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"c{i}" for i in range(5)) + "\n")
    dst = str(tmp_path / "exposed.onnx")
    proc = run_cli("export", "--onnx", src, "-o", dst, "--labels", str(labels), "--mean", "0", "0", "0",
                   "--std", "255", "255", "255")
    assert "12x8x8" in proc.stdout and "5 classes" in proc.stdout
    img = write_image(tmp_path / "a.png", random_rgb(32, 32))
    proc = run_cli("explain", "--model", dst, img, "--method", "scorecam", "-o", str(tmp_path / "o"))
    assert "a: c" in proc.stdout


@pytest.mark.slow
def test_export_builtin_model_cli(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    dst = str(tmp_path / "lite0.onnx")
    proc = run_cli("export", "efficientnet-lite0", "-o", dst)
    assert "1280x7x7" in proc.stdout and "1000 classes" in proc.stdout


def test_methods_lists_parameters():
    proc = run_cli("methods")
    assert "rise" in proc.stdout and "n_masks=4000" in proc.stdout and "threshold=0.5" in proc.stdout


def test_scoped_parameters_reach_one_method(tiny_model, tmp_path):
    """`fem.k` and `featurecam.k` are different parameters that share the paper's name."""
    img = write_image(tmp_path / "a.png", random_rgb(32, 32))
    out = tmp_path / "o"
    run_cli("explain", "--model", tiny_model[1], img, "-o", str(out), "--method", "fem,featurecam",
            "-p", "fem.k=2", "-p", "featurecam.k=0.5", "-p", "featurecam.base=fem")
    from explainrt import Explainer

    ex = Explainer(tiny_model[1])
    np.testing.assert_allclose(np.load(out / "a.fem.npy"), ex.explain(img, "fem", k=2).saliency, atol=1e-6)
    want = ex.explain(img, "featurecam", k=0.5, base="fem").saliency
    np.testing.assert_allclose(np.load(out / "a.featurecam.npy"), want, atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--method", "fem,bogus"], "unknown method 'bogus'"),
    (["-p", "lime.k=1"], "unknown method 'lime'"),
    (["-p", "fem.n_masks=3"], "unknown parameter 'fem.n_masks'"),
    (["--method", "all", "-p", "k=2"], "featurecam: parameter k must be <= 1"),  # only the last method refuses it
])
def test_methods_and_parameters_checked_before_any_image(tiny_model, tmp_path, args, message):
    imgs = [write_image(tmp_path / f"{i}.png", random_rgb(32, 32, seed=i)) for i in range(2)]
    out = tmp_path / "o"
    proc = run_cli("explain", "--model", tiny_model[1], *imgs, "-o", str(out), *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert not out.exists()  # nothing ran


def test_demo_unknown_image_name(tmp_path):
    proc = run_cli("demo", "--images", "notanimage", "-o", str(tmp_path), "--model", str(tmp_path / "m.onnx"),
                   check=False)
    assert proc.returncode == 2 and "notanimage" in proc.stderr and "Traceback" not in proc.stderr


def test_export_missing_labels_file(tmp_path):
    proc = run_cli("export", "--onnx", str(tmp_path / "x.onnx"), "--labels", str(tmp_path / "none.txt"),
                   "-o", str(tmp_path / "y.onnx"), check=False)
    assert proc.returncode == 2 and "labels file" in proc.stderr and "Traceback" not in proc.stderr


def test_two_images_with_one_stem_are_refused_before_any_work(tiny_model, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    imgs = [write_image(tmp_path / d / "x.png", random_rgb(32, 32)) for d in ("a", "b")]
    proc = run_cli("explain", "--model", tiny_model[1], *imgs, "--method", "fem", "-o", str(tmp_path / "o"),
                   check=False)
    assert proc.returncode == 2 and "would both write x.<method>.png" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_constant_map_is_pointed_out(tmp_path):
    """SIDU on a model whose activations never pass τ = 0.5: an all-zero map, and the line says why."""
    import torch

    from explainrt.export import export_torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Sigmoid(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-5.0)  # sigmoid(-5) = 0.007 everywhere: no SIDU mask
    path = str(tmp_path / "flat.onnx")
    export_torch(model, path, input_size=(8, 8), layer="1")
    img = write_image(tmp_path / "a.png", random_rgb(8, 8))
    proc = run_cli("explain", "--model", path, img, "--method", "sidu,fem", "-o", str(tmp_path / "o"), "--no-progress")
    sidu, fem, browse = proc.stdout.strip().splitlines()
    assert browse.startswith("browse ") and browse.endswith("index.html")
    assert "sidu:" in sidu and "constant map" in sidu
    assert "fem:" in fem
