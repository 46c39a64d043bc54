"""`explainrt eval` and `explainrt bench` end to end (subprocess) on a tiny model."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from explainrt import Explainer
from explainrt.imaging import write_png
from explainrt.metrics import insertion_deletion_curves

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "explainrt", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_png(d / f"{name}.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    (d / "notes.txt").write_text("not an image")
    return d


def test_eval_writes_table_json_csv_plot(tiny_model, image_dir, tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    np.save(refs / "a.npy", np.random.default_rng(1).random((8, 8)))
    out = tmp_path / "out"
    proc = run_cli("eval", "--model", tiny_model, "--methods", "fem,scorecam", str(image_dir), "-o", str(out),
                   "--step", "16", "--batch-size", "8", "--reference-dir", str(refs), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "insertion↑" in proc.stdout and "fem" in proc.stdout and "scorecam" in proc.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == ["a.png", "b.png"] and report["step"] == 16
    assert len(report["records"]) == 4
    rec = next(r for r in report["records"] if r["image"] == "a" and r["method"] == "scorecam")
    assert len(rec["curves"]["insertion"]["scores"]) == 16 * 16 // 16 + 1
    assert rec["similarity"] is not None and -1 <= rec["similarity"]["pearson"] <= 1
    assert next(r for r in report["records"] if r["image"] == "b")["similarity"] is None
    # The CLI's numbers are the API's.
    explainer = Explainer(tiny_model, batch_size=8)
    sal = explainer.explain(str(image_dir / "a.png"), "scorecam").saliency
    curves = insertion_deletion_curves(explainer, str(image_dir / "a.png"), sal, step=16)
    assert rec["metrics"]["insertion_auc"] == pytest.approx(curves["insertion"].auc, abs=1e-9)
    assert rec["metrics"]["deletion_auc"] == pytest.approx(curves["deletion"].auc, abs=1e-9)
    summary = report["summary"]["fem"]
    aucs = [r["metrics"]["deletion_auc"] for r in report["records"] if r["method"] == "fem"]
    assert summary["deletion_auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert summary["deletion_auc"]["std"] == pytest.approx(np.std(aucs))
    rows = list(csv.DictReader(open(out / "eval.csv")))
    assert len(rows) == 4 and {"insertion_auc", "deletion_auc", "map_right", "pearson"} <= set(rows[0])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_bad_input(tiny_model, tmp_path):
    proc = run_cli("eval", "--model", tiny_model, str(tmp_path / "missing"), "-o", str(tmp_path))
    assert proc.returncode == 2 and "not found" in proc.stderr
    proc = run_cli("eval", "--model", tiny_model, "--methods", "nope", str(tmp_path), "-o", str(tmp_path))
    assert proc.returncode == 2 and "unknown method" in proc.stderr


def test_bench_json_and_compare_without_torch_model(tiny_model, image_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--model", tiny_model, "--image", str(image_dir / "a.png"), "--methods", "fem,scorecam",
                   "--batch-sizes", "4,8", "--repeat", "3", "--warmup", "1", "--json", str(out), "--compare",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    from explainrt.metrics.peers import PEERS

    for peer in PEERS:
        assert (f"{peer.name} is not installed" in proc.stdout) == (not peer.available())
    assert "use --zoo" in proc.stdout
    report = json.loads(out.read_text())
    assert [(r["method"], r["batch_size"]) for r in report["results"]] == [
        ("fem", 4), ("fem", 8), ("scorecam", 4), ("scorecam", 8)]
    r = report["results"][2]
    assert len(r["times_s"]) == 3 and r["p50_s"] <= r["p90_s"] <= r["p99_s"] and r["forward_passes"] > 1
    assert r["passes_per_s"] == pytest.approx(r["forward_passes"] / r["p50_s"])
    assert report["machine"]["cpu"] and "numpy" in report["machine"]["libraries"]
    assert report["compare"] == []


def test_bench_needs_one_model():
    proc = run_cli("bench", "--methods", "fem")
    assert proc.returncode == 2 and "--model" in proc.stderr


def test_metric_modules_keep_heavy_imports_lazy():
    code = ("import sys, explainrt.cli, explainrt.metrics, explainrt.metrics.cli, explainrt.metrics.bench, "
            "explainrt.metrics.evaluate, explainrt.metrics.peers, explainrt.metrics.sanity; "
            "explainrt.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'scipy', 'pytorch_grad_cam') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
