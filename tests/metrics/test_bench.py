"""Benchmark helpers: memory sampling, machine description, percentiles, torch peers."""
import importlib.util

import numpy as np
import pytest

from explainrt import Explainer
from explainrt.metrics.bench import LatencyStats, PeakMemory, describe_machine, time_explain


def test_peak_memory_sees_a_native_allocation():
    with PeakMemory() as memory:
        block = np.ones(80 * 2 ** 20 // 8)  # 80 MiB, touched
        del block
    assert memory.growth_mb is not None and memory.growth_mb > 60
    assert memory.peak_mb >= memory.growth_mb


def test_describe_machine():
    machine = describe_machine()
    assert machine["cpu"] and machine["cpus_usable"] >= 1
    assert {"numpy", "onnxruntime", "explainrt"} <= set(machine["libraries"])


def test_latency_stats_percentiles():
    stats = LatencyStats("sidu", "onnxruntime", "cpu", 8, 1, [1.0, 2.0, 3.0, 4.0, 10.0], 100, 300.0, 5.0, 1.0)
    d = stats.to_dict()
    assert d["p50_s"] == 3.0 and d["p90_s"] == pytest.approx(7.6) and d["p99_s"] == pytest.approx(9.76)
    assert d["passes_per_s"] == pytest.approx(100 / 3.0)


def test_time_explain_counts_passes(tiny_model):
    explainer = Explainer(tiny_model, batch_size=4)
    x = np.random.default_rng(0).normal(size=(1, 3, 16, 16)).astype(np.float32)
    stats = time_explain(explainer, x, "scorecam", warmup=0, repeat=2)
    assert stats.forward_passes == explainer.explain(x, "scorecam").forward_passes
    assert len(stats.times_s) == 2 and stats.batch_size == 4


def test_lite0_head_activation_wrapper():
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("efficientnet-lite-pytorch is not installed")
    from explainrt.metrics.peers import PassCounter, zoo_torch_model

    model, layer = zoo_torch_model("efficientnet-lite0")  # checks identical logits itself
    seen = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    counter = PassCounter(model)
    with torch.no_grad():
        model(torch.zeros(3, 3, 224, 224))
    handle.remove()
    counter.close()
    assert seen == [(3, 1280, 7, 7)]  # the head only, once per forward
    assert counter.count == 3


def test_gradcam_scorecam_matches_our_variant(tiny_model):
    """pytorch-grad-cam's weighting is ours with score='logit', channel_softmax=True (maps correlate)."""
    pytest.importorskip("pytorch_grad_cam")
    torch = pytest.importorskip("torch")
    from metric_models import TinyCNN

    from explainrt.metrics.peers import PEERS, time_peer
    from explainrt.metrics.similarity import pearson

    model = TinyCNN().eval()  # same seed as the exported tiny model
    x = np.random.default_rng(0).normal(size=(1, 3, 16, 16)).astype(np.float32)
    explainer = Explainer(tiny_model, batch_size=8)
    ours = explainer.explain(x, "scorecam", score="logit", channel_softmax=True)
    peer = next(p for p in PEERS if p.name == "grad-cam ScoreCAM")
    theirs = time_peer(peer, model, model.act2, x, ours.target, batch_size=8, warmup=0, repeat=1)
    assert theirs["forward_passes"] == 1 + 8  # base pass + every channel
    assert pearson(ours.saliency, theirs["saliency"]) > 0.9
