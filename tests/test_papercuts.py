"""The newcomer's papercuts of issue 13, each pinned: file modes, the Python API's messages and
``Explanation.save``, `serve` failing before "listening", `bench` plots and quiet peers."""
from __future__ import annotations

import json
import os
import stat
import sys
import types
import warnings

import numpy as np
import pytest

from tests.conftest import random_rgb, tiny_cnn, write_image
from tests.test_cli import run_cli


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_exported_onnx_follows_the_umask(tmp_path, umask, mode):
    from explainrt.export import export_torch

    old = os.umask(umask)
    try:
        path = tmp_path / "m.onnx"
        export_torch(tiny_cnn(), str(path), input_size=(32, 32))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_float_image_array_error_names_its_shape(tiny_model):
    from explainrt import Explainer, InvalidInputError

    ex = Explainer(tiny_model[1])
    with pytest.raises(InvalidInputError) as err:
        ex.explain(np.random.default_rng(0).random((224, 224, 3)), "fem")
    message = str(err.value)
    assert "(224, 224, 3)" in message and "(1, 224, 224, 3)" not in message and "uint8" in message


def test_api_warns_about_a_constant_map_and_saves(tiny_model, tmp_path):
    import cv2
    import torch

    from explainrt import ConstantMapWarning, Explainer
    from explainrt.export import export_torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Sigmoid(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-5.0)  # no activation above SIDU's threshold anywhere
    flat = str(tmp_path / "flat.onnx")
    export_torch(model, flat, input_size=(8, 8), layer="1")
    with pytest.warns(ConstantMapWarning, match="constant"):
        result = Explainer(flat).explain(random_rgb(8, 8), "sidu")
    assert result.constant_targets == [result.target]

    ex = Explainer(tiny_model[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstantMapWarning)
        result = ex.explain(random_rgb(40, 30), "fem", target=[1, 2])
    assert result.constant_targets == []
    files = result.save(str(tmp_path / "saved"), name="pic")
    assert sorted(files) == [1, 2]
    np.testing.assert_array_equal(np.load(files[2]["npy"]), result.saliency_maps[1])
    assert cv2.imread(files[1]["png"]).shape[0] > 40  # captioned
    plain = ex.explain(random_rgb(40, 30), "fem").save(str(tmp_path / "plain"), name="pic", plain=True)
    assert cv2.imread(next(iter(plain.values()))["png"]).shape == (40, 30, 3)


def test_serve_without_models_fails_before_listening(tmp_path):
    pytest.importorskip("grpc")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("serve", "--models", str(empty), "--port", "0", check=False)
    assert proc.returncode == 2 and "no exported model could be loaded" in proc.stderr
    assert "listening" not in proc.stdout


def test_bench_writes_a_plot_beside_its_json(tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    import cv2

    out = tmp_path / "bench.json"
    img = write_image(tmp_path / "a.png", random_rgb(32, 32))
    proc = run_cli("bench", "--model", tiny_model[1], "--image", img, "--methods", "fem,sidu", "--batch-sizes", "2,4",
                   "--repeat", "2", "--warmup", "0", "--json", str(out), "--no-progress")
    assert f"wrote {tmp_path / 'bench.png'}" in proc.stdout
    report = json.loads(out.read_text())
    assert len(report["results"]) == 4
    plot = cv2.imread(str(tmp_path / "bench.png"))
    assert plot is not None and plot.shape[1] > 800 and plot.std() > 10


def test_quiet_peer_bars_disables_a_grad_cam_modules_tqdm(monkeypatch):
    import tqdm

    from explainrt.metrics.peers import quiet_peer_bars

    fake = types.ModuleType("pytorch_grad_cam.score_cam")
    fake.tqdm = tqdm
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam.score_cam", fake)
    with quiet_peer_bars(True):
        assert fake.tqdm is not tqdm and fake.tqdm.tqdm(range(3)).disable
    assert fake.tqdm is tqdm
    with quiet_peer_bars(False):
        assert fake.tqdm is tqdm
