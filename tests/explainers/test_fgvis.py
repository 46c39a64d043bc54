"""FGVis (seed 004) on the exported graph: the games find planted evidence, the defence works.

The model is a small CNN trained here on red/blue squares over grey noise
(``gradient_models``). Masks are checked through ONNX Runtime too: the deletion game's
``x·m`` must lose the class, the preservation game's keep it.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from explainrt import Explainer
from explainrt.errors import InvalidInputError
from explainrt.explainers.driver import Cancelled
from explainrt.export import export_torch

torch = pytest.importorskip("torch")

from tests.explainers.gradient_models import CLASSES, MEAN, SIZE, SQUARE, STD, planted, trained_square_model  # noqa: E402


@pytest.fixture(scope="module")
def square_model(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster than several contending ones
    try:
        model = trained_square_model(torch)
    finally:
        torch.set_num_threads(threads)
    path = str(tmp_path_factory.mktemp("fgvis") / "squares.onnx")
    export_torch(model, path, input_size=(SIZE, SIZE), mean=MEAN, std=STD, labels=CLASSES)
    return model, path


@pytest.fixture(scope="module")
def grad(square_model):
    threads = torch.get_num_threads()
    yield Explainer(square_model[1], backend="torch", device="cpu", threads=1)  # tiny convs: one thread
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ort(square_model):
    return Explainer(square_model[1])


def _inside_outside(sal, corner):
    y0, x0 = corner
    inside = np.zeros(sal.shape, bool)
    inside[y0:y0 + SQUARE, x0:x0 + SQUARE] = True
    return float(sal[inside].mean()), float(sal[~inside].mean())


def _normalised(img):
    return ((img.astype(np.float32) - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).transpose(2, 0, 1)[None]


def test_model_learned_the_squares(ort):
    rng = np.random.default_rng(7)
    for label in (0, 1, 2):
        for _ in range(3):
            img, _ = planted(label, rng)
            assert int(np.argmax(ort.predict(img))) == label


@pytest.mark.parametrize("game", ["deletion", "preservation"])
def test_game_mask_finds_the_planted_square(grad, ort, game):
    img, corner = planted(0, np.random.default_rng(3))
    result = grad.explain(img, "fgvis", target=0, game=game, iterations=100)
    sal = result.saliency
    assert sal.shape == (SIZE, SIZE) and 0.0 <= sal.min() and sal.max() <= 1.0
    inside, outside = _inside_outside(sal, corner)
    assert inside > 0.6 and outside < 0.05, (game, inside, outside)
    m = result.masks[0]
    assert result.masks.shape == (1, 3, SIZE, SIZE) and m.min() >= 0.0 and m.max() <= 1.0
    # the mask is a valid model input: x·m through another engine (ONNX Runtime)
    p_red = ort.predict(_normalised(img) * m[None])[0]
    if game == "deletion":
        assert p_red < 0.3, p_red  # the few deleted pixels took the class away …
        assert (1.0 - m).mean() < 0.15  # … and they are few
    else:
        assert p_red > 0.6, p_red  # the few kept pixels hold the class
        assert m.mean() < 0.15
    # the explanation image: e = m·x (preservation), x·(1 − m) (deletion), as RGB
    assert result.explanations.shape == (1, SIZE, SIZE, 3) and result.explanations.dtype == np.uint8
    assert result.visualization is not None and np.array_equal(result.visualization, result.explanations[0])
    shown = (1.0 - m) if game == "deletion" else m
    want = np.clip(np.rint((_normalised(img)[0] * shown).transpose(1, 2, 0) * STD + np.asarray(MEAN)), 0, 255)
    assert np.abs(result.explanations[0].astype(int) - want).max() <= 1


@pytest.mark.parametrize("game,score_high", [("generation", True), ("repression", False)])
def test_zero_initialised_games(grad, game, score_high):
    img, corner = planted(1, np.random.default_rng(4))
    result = grad.explain(img, "fgvis", target=1, game=game, iterations=80)
    score = result.extras["explanation_score"]
    assert (score > 0.6) if score_high else (score < 0.2), (game, score)
    inside, outside = _inside_outside(result.saliency, corner)
    assert inside > outside + 0.3, (game, inside, outside)


def test_single_channel_mask_and_targets_batched(grad):
    img, _ = planted(0, np.random.default_rng(5))
    one = grad.explain(img, "fgvis", target=[0, 2], channels=1, iterations=30)
    assert one.masks.shape == (2, 1, SIZE, SIZE)
    for i, t in enumerate((0, 2)):  # each target's mask is optimised on its own (a batch row) …
        alone = grad.explain(img, "fgvis", target=t, channels=1, iterations=30)
        # … up to float rounding of batched vs single convolutions, which Adam's normalised steps
        # amplify where the gradient is ~0
        np.testing.assert_allclose(one.masks[i], alone.masks[0], atol=0.03)


def test_defence_against_manufactured_evidence(grad):
    """Seed 004 Table 1: generation game, no sparsity loss, target = the absent colour."""
    rates = {}
    for defence in (False, True):
        made, trials = 0, 6
        rng = np.random.default_rng(11)
        for trial in range(trials):
            label = trial % 2
            img, _ = planted(label, rng)
            absent = 1 - label  # the other colour: no pixel of the grey noise holds it
            result = grad.explain(img, "fgvis", target=absent, game="generation", lam=0.0, iterations=100,
                                  defence=defence)
            made += result.extras["explanation_score"] > 0.5
        rates[defence] = made / trials
    print(f"absent class manufactured: {rates[False]:.0%} of trials without the defence, "
          f"{rates[True]:.0%} with it")
    assert rates[False] >= 5 / 6 and rates[True] <= 1 / 6, rates


def test_gradient_filter_matches_a_clamp_layer_reference(square_model, grad):
    """The engine's filtered gradient equals torch autograd through the module with Eq. 5's clipping
    layer (identity forward, clamp gradient) after each ReLU."""
    from explainrt.runtime.autograd import GradientGraph

    module = square_model[0]
    rng = np.random.default_rng(2)
    img, _ = planted(0, rng)
    x = torch.from_numpy(_normalised(img))
    e = (x * torch.from_numpy(rng.uniform(0, 1.3, x.shape).astype(np.float32))).requires_grad_(True)

    originals = []
    relus = [m for m in module if isinstance(m, torch.nn.ReLU)]
    handles = [r.register_forward_hook(lambda m, i, o: originals.append(o.detach())) for r in relus]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    bounds = iter([(o.clamp(max=0), o.clamp(min=0)) for o in originals])

    def clip(m, i, o):
        lo, hi = next(bounds)
        c = torch.clamp(o, lo, hi)
        return o.detach() + c - c.detach()

    handles = [r.register_forward_hook(clip) for r in relus]
    try:
        torch.softmax(module(e), 1)[0, 0].backward()
    finally:
        for h in handles:
            h.remove()
    want = e.grad.clone()

    g = GradientGraph(grad.engine)
    assert len(g.nonlinear) == 3  # the three ReLUs (the last one is also the explained activation)
    e2 = e.detach().clone().requires_grad_(True)
    probs = g.forward(e2, [grad.metadata.probs_output], g.bounds(x))[grad.metadata.probs_output]
    probs[0, 0].backward()
    assert want.abs().max() > 0 and (want == 0).float().mean() > 0.05  # the filter did cut some paths
    torch.testing.assert_close(e2.grad, want, rtol=1e-4, atol=1e-6)


def test_progress_over_iterations_and_cancel(grad):
    img, _ = planted(0, np.random.default_rng(6))
    seen = []
    grad.explain(img, "fgvis", target=0, iterations=7, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 7) for i in range(8)]
    cancel = threading.Event()

    def stop_at_3(done, total):
        if done == 3:
            cancel.set()

    with pytest.raises(Cancelled, match="after 3 of 50"):
        grad.explain(img, "fgvis", target=0, iterations=50, progress=stop_at_3, cancel=cancel)


def test_needs_the_torch_engine_and_checks_parameters(grad, ort):
    img, _ = planted(0, np.random.default_rng(6))
    with pytest.raises(InvalidInputError, match="backend='torch'"):
        ort.explain(img, "fgvis", iterations=2)
    for bad in ({"game": "hide"}, {"channels": 2}, {"iterations": 0}, {"lr": 0}, {"lam": -1}, {"defence": "yes"}):
        with pytest.raises(InvalidInputError):
            grad.explain(img, "fgvis", **bad)


def test_cli_explains_with_fgvis(square_model, tmp_path, capsys):
    import json

    import cv2

    from explainrt.cli import main

    img, corner = planted(0, np.random.default_rng(3))
    path = str(tmp_path / "red.png")
    cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    threads = torch.get_num_threads()
    try:
        code = main(["explain", "--model", square_model[1], "--backend", "torch", "--method", "fgvis",
                     "-p", "iterations=100", "-p", "game=preservation", "--target", "0", "--threads", "1", path,
                     "-o", str(tmp_path / "out"), "--json", "--no-progress", "--plain"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert code == 0, out.err
    record = json.loads(out.out)
    assert record["method"] == "fgvis" and record["forward_passes"] == 1 + 100 + 1
    sal = np.load(tmp_path / "out" / "red.fgvis.npy")
    inside, outside = _inside_outside(sal, corner)
    assert inside > 0.6 and outside < 0.05
    assert cv2.imread(str(tmp_path / "out" / "red.fgvis.vis.png")).shape == (SIZE, SIZE, 3)  # the explanation e (bare: --plain)
    code = main(["explain", "--model", square_model[1], "--method", "fgvis", path, "-o", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert code == 2 and "backend='torch'" in err and len(err.strip().splitlines()) == 1


def test_server_runs_fgvis_on_the_torch_engine_and_refuses_it_on_ort(square_model, tmp_path):
    threads = torch.get_num_threads()
    pytest.importorskip("grpc")
    import os

    from explainrt.client import ExplainClient, RemoteError
    from explainrt.server import ExplainServer, ServerConfig

    models = tmp_path / "models"
    models.mkdir()
    os.link(square_model[1], models / "squares.onnx")
    img, corner = planted(0, np.random.default_rng(3))
    for backend in ("torch", "onnxruntime"):
        server = ExplainServer(ServerConfig(models=str(models), host="127.0.0.1", port=0, metrics_port=None,
                                            workers=1, backend=backend, threads=1)).start()
        try:
            with ExplainClient(f"127.0.0.1:{server.port}", timeout=60, model="squares") as client:
                if backend == "onnxruntime":
                    with pytest.raises(RemoteError, match="backend='torch'") as err:
                        client.explain(img, "fgvis", target=0)
                    assert err.value.code == "INVALID_ARGUMENT"
                    continue
                result = client.explain(img, "fgvis", target=0, params={"iterations": 100, "game": "deletion"})
                inside, outside = _inside_outside(result.saliency_maps[0], corner)
                assert inside > 0.6 and outside < 0.05
                assert result.visualization.shape == (SIZE, SIZE, 3)
                with pytest.raises(RemoteError, match="game"):
                    client.explain(img, "fgvis", params={"game": "hide"})
        finally:
            server.stop(grace=0)
            torch.set_num_threads(threads)


class _Mixed(torch.nn.Module):
    """SiLU (exported as x·Sigmoid(x)), HardSwish, ReLU6 (Clip) and a squeeze-excitation gate."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = (torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1),
                                     torch.nn.Conv2d(8, 8, 3, padding=1))
        self.se1, self.se2 = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 8, 1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        x = torch.nn.functional.silu(self.c1(x))
        x = torch.nn.functional.hardswish(self.c2(x))
        x = torch.nn.functional.relu6(self.c3(x))
        gate = torch.sigmoid(self.se2(torch.relu(self.se1(x.mean(dim=(2, 3), keepdim=True)))))
        return self.fc((x * gate).mean(dim=(2, 3)))


def test_nonlinearities_found_in_the_onnx_graph(tmp_path):
    from explainrt.runtime.autograd import nonlinearity_outputs
    from explainrt.runtime.torch_engine import TorchEngine

    path = str(tmp_path / "mixed.onnx")
    export_torch(_Mixed().eval(), path, input_size=(16, 16), mean=MEAN, std=STD)
    graph = TorchEngine(path, device="cpu").graph
    producer = {o: n for n in graph.nodes for o in n.outputs}
    found = sorted(producer[name].op_type for name in nonlinearity_outputs(graph))
    # SiLU's Mul (not its Sigmoid gate), HardSwish, Clip, the SE block's Relu and Sigmoid gate;
    # not the final Softmax, nor the Mul applying the SE gate to the features
    assert found == ["Clip", "HardSwish", "Mul", "Relu", "Sigmoid"], found
    silu = next(producer[n] for n in nonlinearity_outputs(graph) if producer[n].op_type == "Mul")
    assert producer[silu.inputs[1]].op_type == "Sigmoid" or producer[silu.inputs[0]].op_type == "Sigmoid"
