"""A black-box model (exported without an activation) behind the server: metadata lists only the
methods it can run, RISE works, and the methods that need a feature layer are INVALID_ARGUMENT
with the reason — never a TypeError from the cost model."""
from __future__ import annotations

import numpy as np
import pytest

from explainrt.client import ExplainClient, RemoteError

from serve_helpers import INPUT_HW, NUM_CLASSES, TinyNet, start_server


@pytest.fixture(scope="module")
def blackbox(tmp_path_factory):
    import torch

    from explainrt.export import export_torch

    root = tmp_path_factory.mktemp("blackbox")
    torch.manual_seed(0)
    export_torch(TinyNet(), str(root / "bb.onnx"), input_size=INPUT_HW, with_activation=False,
                 labels=[f"class-{i}" for i in range(NUM_CLASSES)], name="bb")
    srv = start_server(str(root))
    with ExplainClient(f"127.0.0.1:{srv.port}", timeout=30, retries=0) as client:
        yield srv, client, str(root / "bb.onnx")
    srv.stop(grace=0)


def test_blackbox_model_served(blackbox, image):
    from explainrt import Explainer

    server, client, path = blackbox
    meta = client.metadata("bb")
    assert meta.get("activation_output", "") == "" and sorted(meta["methods"]) == ["rise"]  # (featurecam only with base="rise")
    got = client.explain(image, "rise", model="bb", params={"n_masks": 50, "grid_size": 4, "seed": 3}, target=1)
    want = Explainer(path).explain(image, "rise", target=1, n_masks=50, grid_size=4, seed=3)
    assert got.forward_passes == want.forward_passes == 51
    np.testing.assert_allclose(got.saliency_maps, want.saliency_maps, atol=1e-5)
    for method in ("sidu", "scorecam", "fem", "featurecam"):
        with pytest.raises(RemoteError) as err:
            client.explain(image, method, model="bb")
        assert err.value.code == "INVALID_ARGUMENT", (method, err.value)
        assert "needs the activations of a feature layer" in str(err.value) and "use rise" in str(err.value)
    assert client.explain(image, "featurecam", model="bb",
                          params={"base": "rise", "base_params": {"n_masks": 20, "grid_size": 4}}).forward_passes == 21


def test_cli_method_all_skips_what_a_blackbox_cannot_run(blackbox, png_path, tmp_path, capsys):
    from explainrt.cli import main

    _, _, path = blackbox
    assert main(["explain", "--model", path, "--method", "all", "-p", "n_masks=30", "-p", "grid_size=4",
                 "--no-progress", "-o", str(tmp_path), png_path]) == 0
    captured = capsys.readouterr()
    assert "cannot run sidu, scorecam, fem, featurecam (a black-box model has no activation): skipping them; " \
           "running rise" in captured.err
    assert ".rise." in captured.out and ".sidu." not in captured.out


def test_client_method_all_skips_what_the_servers_model_cannot_run(blackbox, png_path, tmp_path, capsys):
    from explainrt.cli import main

    server, _, _ = blackbox
    assert main(["client", "--url", f"127.0.0.1:{server.port}", "--model", "bb", "--method", "all", "-p",
                 "n_masks=30", "-p", "grid_size=4", "--no-progress", "-o", str(tmp_path), png_path]) == 0
    captured = capsys.readouterr()
    assert "cannot run sidu, scorecam, fem, featurecam" in captured.err and "running rise" in captured.err
    assert ".rise." in captured.out and ".sidu." not in captured.out
