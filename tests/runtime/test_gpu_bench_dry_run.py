"""benchmarks/gpu_bench.py --dry-run: the device benchmark's whole flow on the CPU (tiny sizes)."""
import importlib.util
import json
import os

import pytest

pytest.importorskip("torch")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def test_dry_run_writes_the_table_and_json(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "benchmarks", "gpu_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(tmp_path))  # the device tool's result folder is the default
    assert bench.main(["--dry-run", "--no-grad-cam"]) == 0
    (record_path,) = tmp_path.glob("gpu_bench-dryrun-*.json")
    record = json.loads(record_path.read_text())
    assert [r["method"] for r in record["results"]] == ["sidu", "scorecam", "rise", "fem"]
    assert all(r["forward_passes"] >= 1 and r["bare_engine_s"] > 0 for r in record["results"])
    table = next(tmp_path.glob("gpu_bench-dryrun-*.md")).read_text()
    assert "| tiny-cnn | fp32 | rise | 65 |" in table and "DRY RUN" in table
