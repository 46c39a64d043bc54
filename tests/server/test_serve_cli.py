"""`explainrt client` writes what `explainrt explain` writes; `serve`/`client` parse their options."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from explainrt.cli import build_parser, main


def _files(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_client_writes_the_same_files_as_explain(server, model_dir, png_path, tmp_path, capsys):
    local_dir, remote_dir = tmp_path / "local", tmp_path / "remote"
    methods = "fem,scorecam,featurecam"
    assert main(["explain", png_path, "--model", os.path.join(model_dir, "tiny.onnx"), "--method", methods,
                 "-o", str(local_dir), "--no-progress", "--json"]) == 0
    local_lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["client", png_path, "--url", f"127.0.0.1:{server.port}", "--model", "tiny", "--method", methods,
                 "-o", str(remote_dir), "--no-progress", "--json"]) == 0
    remote_lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert _files(local_dir) == _files(remote_dir) == [
        "index.html", "picture.featurecam.npy", "picture.featurecam.png", "picture.featurecam.vis.png",
        "picture.fem.npy", "picture.fem.png", "picture.scorecam.npy", "picture.scorecam.png"]
    for name in _files(local_dir):
        if name == "index.html":  # its title and times differ
            continue
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(remote_dir / name), np.load(local_dir / name), atol=1e-6)
        else:
            assert (remote_dir / name).read_bytes() == (local_dir / name).read_bytes(), name
    for local, remote in zip(local_lines, remote_lines):
        for key in ("image", "method", "target", "label", "forward_passes", "top_k"):
            assert remote[key] == local[key], key
        assert remote["probability"] == pytest.approx(local["probability"], abs=1e-6)
        assert remote["files"] == {k: v.replace(str(local_dir), str(remote_dir)) for k, v in local["files"].items()}


def test_client_line_output_and_per_item_errors(server, png_path, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    code = main(["client", png_path, str(bad), "--url", f"127.0.0.1:{server.port}", "--model", "tiny",
                 "--method", "fem", "-o", str(tmp_path / "out"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.startswith("picture: class-") and "fem: 1 forward passes" in out
    assert "bad.png (fem): INVALID_ARGUMENT" in err and "could not decode" in err


def test_client_single_failure_exits_2_and_list_models(server, png_path, tmp_path, capsys):
    assert main(["client", png_path, "--url", f"127.0.0.1:{server.port}", "--model", "nope", "--method", "fem",
                 "-o", str(tmp_path), "--no-progress"]) == 2
    assert "NOT_FOUND: unknown model 'nope'" in capsys.readouterr().err
    assert main(["client", "--url", f"127.0.0.1:{server.port}", "--list-models"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing] == ["tiny", "tiny2"]
    assert main(["client", "--url", f"127.0.0.1:{server.port}", "--list-models", "--json"]) == 0
    models = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [m["name"] for m in models] == ["tiny", "tiny2"] and models[0]["num_classes"] >= 1
    assert len(models[0]["input_size"]) == 2
    assert main(["client", "--url", f"127.0.0.1:{server.port}", "--health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_serve_options_and_their_defaults():
    args = build_parser().parse_args(["serve", "--models", "m", "--port", "0", "--metrics-port", "9100",
                                      "--workers", "3", "--queue-size", "5", "--batch-size", "32"])
    assert (args.port, args.metrics_port, args.workers, args.queue_size, args.batch_size) == (0, 9100, 3, 5, 32)
    defaults = build_parser().parse_args(["serve", "--models", "m"])
    assert (defaults.port, defaults.workers, defaults.queue_size, defaults.max_message_mib) == (50051, 2, 64, 64)


@pytest.fixture
def restore_logging():
    """`serve` installs its structured log handler on the root logger; put pytest's back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_serve_rejects_a_directory_without_models(tmp_path, capsys, restore_logging):
    assert main(["serve", "--models", str(tmp_path), "--host", "127.0.0.1", "--port", "0"]) == 2
    assert "no exported model could be loaded" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--port", "99999"], "a port is 0..65535"), (["--metrics-port", "-1"], "a port is 0..65535"),
    (["--threads", "0"], "must be at least 1"),
])
def test_serve_flags_out_of_range(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--models", str(tmp_path), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_serve_on_a_port_in_use_says_so(server, model_dir, capsys, restore_logging):
    assert main(["serve", "--models", model_dir, "--host", "127.0.0.1", "--port", str(server.port)]) == 2
    err = capsys.readouterr().err
    assert f"could not listen on 127.0.0.1:{server.port}" in err and "Traceback" not in err


def test_client_timeout_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["client", "--url", "127.0.0.1:1", "--timeout", "-1", "x.png"])
    assert "must be a positive number" in capsys.readouterr().err


def test_client_reports_each_items_own_time(server, png_path, tmp_path, capsys):
    """A stream's items are sent at once: an item's seconds must not include the items before it."""
    import json

    assert main(["client", png_path, "--url", f"127.0.0.1:{server.port}", "--model", "tiny", "--method", "rise,fem",
                 "-p", "rise.n_masks=8000", "-o", str(tmp_path), "--no-progress", "--json"]) == 0
    records = {r["method"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert records["fem"]["seconds"] < records["rise"]["seconds"] / 4


def test_health_exit_code_and_models_given_as_a_file(server, model_dir, tmp_path, capsys, restore_logging):
    import os

    assert main(["client", "--url", f"127.0.0.1:{server.port}", "--health", "--model", "nope"]) == 1
    assert capsys.readouterr().out.strip() == "SERVICE_UNKNOWN"
    assert main(["serve", "--models", os.path.join(model_dir, "tiny.onnx"), "--port", "0"]) == 2
    assert "--models takes a directory" in capsys.readouterr().err


@pytest.mark.parametrize("ext", [".bmp", ".webp", ".tif"])
def test_client_sends_what_explain_reads(server, model_dir, tmp_path, capsys, ext):
    """A BMP/WebP/TIFF file (the server takes PNG and JPEG only) is converted by the client; with
    --send-tensor the pixels go as a tensor; either way the maps (of both --target classes) equal
    the local API's on the same file."""
    import cv2

    rgb = np.random.default_rng(3).integers(0, 256, (40, 44, 3), dtype=np.uint8)
    path = str(tmp_path / f"pic{ext}")
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []  # lossless WebP
    assert cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    for flag in ([], ["--send-tensor"]):
        out = tmp_path / ("tensor" if flag else "remote")
        assert main(["client", path, "--url", f"127.0.0.1:{server.port}", "--model", "tiny", "--method", "fem",
                     "--target", "0,1", "-o", str(out), "--no-progress", "--json", *flag]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["target"] for r in lines] == [0, 1]
    from explainrt import Explainer

    want = Explainer(os.path.join(model_dir, "tiny.onnx")).explain(path, "fem", target=[0, 1]).saliency_maps
    for out in ("remote", "tensor"):
        for i, t in enumerate((0, 1)):
            np.testing.assert_allclose(np.load(tmp_path / out / f"pic.fem.{t}.npy"), want[i], atol=1e-5)
