"""explainrt.distributed on a local Ray (ray.init(num_cpus=2), no cluster): the same numbers as one process.

Ray starts once for the module (its start and each job's actors cost seconds); every test
compares with the single-process ``Explainer`` / ``evaluate`` on the same files, and a corrupt
file lands in the error column without failing the job.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")

from explainrt import Explainer  # noqa: E402
from explainrt.distributed import (evaluate_dataset, evaluation_records, explain_dataset,  # noqa: E402
                                   summarise_explanations)
from explainrt.errors import InvalidInputError  # noqa: E402
from explainrt.imaging import write_png  # noqa: E402
from explainrt.metrics import evaluate as ev  # noqa: E402

METHODS = ["fem", "sidu"]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # Ray's own, on copy


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Five small images of different sizes, a corrupt .png, and a text file (not an image: skipped)."""
    root = tmp_path_factory.mktemp("dataset")
    for i, (h, w) in enumerate([(40, 48), (32, 32), (50, 30), (36, 44), (64, 64)]):
        write_png(str(root / f"img{i}.png"), np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    (root / "notes.txt").write_text("not an image")
    return str(root)


def _images(image_dir):
    return sorted(os.path.join(image_dir, n) for n in os.listdir(image_dir) if n.startswith("img"))


def test_explain_dataset_equals_the_single_process_explainer(local_ray, tiny_model, image_dir):
    _, model = tiny_model
    ds = explain_dataset(model, image_dir, METHODS, params={"sidu": {"threshold": 0.4}}, threads=1,
                         rows_per_batch=2).materialize()  # Parquet output: the CLI test
    rows = {(r["path"], r["method"]): r for r in ds.take_all()}
    assert len(rows) == 6 * len(METHODS), "one row per image and method; notes.txt is not read"
    explainer = Explainer(model, threads=1)
    for path in _images(image_dir):
        for method in METHODS:
            want = explainer.explain(path, method, **({"threshold": 0.4} if method == "sidu" else {}))
            got = rows[(path, method)]
            assert got["error"] == ""
            assert (got["target"], got["label"], got["forward_passes"]) == (want.target, want.label,
                                                                            want.forward_passes)
            assert got["probability"] == float(want.probs[want.target])
            np.testing.assert_array_equal(got["saliency"], want.saliency)  # the same bytes, not close
    broken = os.path.join(image_dir, "broken.png")
    for method in METHODS:
        row = rows[(broken, method)]
        assert "could not decode the image" in row["error"] and "broken.png" in row["error"]
        assert np.isnan(row["saliency"]).all() and row["forward_passes"] == 0
    summary = summarise_explanations(ds)
    assert (summary["rows"], summary["images"], summary["failed_images"]) == (12, 6, 1)
    assert list(summary["errors"]) == [broken]
    assert summary["by_method"]["sidu"]["errors"] == 1 and summary["by_method"]["fem"]["mean_forward_passes"] == 1


def test_evaluate_dataset_reduces_to_the_eval_table(local_ray, tiny_model, image_dir):
    _, model = tiny_model
    ds = evaluate_dataset(model, image_dir, METHODS, step=64, threads=1).materialize()
    records, errors = evaluation_records(ds, METHODS)
    assert list(errors) == [os.path.join(image_dir, "broken.png")]
    reference = ev.evaluate(Explainer(model, threads=1), _images(image_dir), METHODS, step=64)
    assert [(r.image, r.method) for r in records] == [(r.image, r.method) for r in reference]
    for got, want in zip(records, reference):
        for mode in ("insertion", "deletion"):
            np.testing.assert_array_equal(got.curves[mode].scores, want.curves[mode].scores)
        assert got.explanation_map == want.explanation_map
        assert {k: v for k, v in got.values().items() if k != "explain_seconds"} == \
            {k: v for k, v in want.values().items() if k != "explain_seconds"}
    ours, theirs = ev.summarise(records), ev.summarise(reference)
    for method in METHODS:
        ours[method].pop("explain_seconds"), theirs[method].pop("explain_seconds")
    assert ours == theirs
    assert ev.mean_curves(records) == ev.mean_curves(reference)


def test_cli_explain_and_eval_with_ray(local_ray, tiny_model, image_dir, tmp_path, capsys):
    from explainrt.cli import main

    _, model = tiny_model
    out = tmp_path / "explain"
    assert main(["explain", "--ray", "--model", model, "--method", "fem", image_dir, "-o", str(out),
                 "--no-progress", "--threads", "1"]) == 1  # one image failed
    printed = capsys.readouterr()
    assert "6 images x 1 method on Ray: 6 rows, 1 image failed" in printed.out
    assert "broken.png: " in printed.err and "could not decode" in printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_images"] == 1 and summary["rows"] == 6
    import pyarrow.parquet as pq

    table = pq.read_table(str(out / "explanations"), columns=["method", "error", "saliency"]).to_pydict()
    assert table["method"] == ["fem"] * 6 and sum(e != "" for e in table["error"]) == 1
    assert {np.asarray(m).size for m in table["saliency"]} == {32 * 32}, "maps stored as tensors"

    out = tmp_path / "eval"
    assert main(["eval", "--ray", "--model", model, "--methods", "fem", image_dir, "-o", str(out), "--step", "64",
                 "--no-progress", "--threads", "1"]) == 1
    printed = capsys.readouterr().out
    assert "5 image(s), mean ± std over images" in printed and "1 image failed" in printed
    report = json.loads((out / "eval.json").read_text())
    reference = ev.summarise(ev.evaluate(Explainer(model, threads=1), _images(image_dir), ["fem"], step=64))
    assert report["summary"]["fem"]["deletion_auc"] == reference["fem"]["deletion_auc"]
    assert report["summary"]["fem"]["deletion_auc"]["n"] == 5
    assert list(report["errors"]) == [os.path.join(image_dir, "broken.png")]
    assert (out / "eval.csv").exists() and (out / "curves.png").exists()


def test_an_existing_dataset_of_arrays_is_explained_too(local_ray, tiny_model):
    _, model = tiny_model
    images = [np.random.default_rng(10 + i).integers(0, 256, (32, 40, 3), dtype=np.uint8) for i in range(3)]
    items = [{"image": im, "path": f"mem://{i}"} for i, im in enumerate(images)]
    rows = {r["path"]: r for r in explain_dataset(model, ray.data.from_items(items), "fem", threads=1).take_all()}
    explainer = Explainer(model, threads=1)
    for i, im in enumerate(images):
        np.testing.assert_array_equal(rows[f"mem://{i}"]["saliency"], explainer.explain(im, "fem").saliency)
    for columns in ({"x": 1}, {"image": images[0]}):  # no image column; no path
        with pytest.raises(InvalidInputError, match="needs 'bytes'.*and 'path'"):
            explain_dataset(model, ray.data.from_items([columns]), "fem")


def test_bad_arguments_fail_on_the_driver_with_one_line(local_ray, tiny_model, tmp_path):
    _, model = tiny_model
    with pytest.raises(InvalidInputError, match="unknown method 'nope'"):
        explain_dataset(model, str(tmp_path), ["nope"])
    with pytest.raises(InvalidInputError, match="image or directory not found"):
        explain_dataset(model, str(tmp_path / "missing"), ["fem"])
    with pytest.raises(InvalidInputError, match="model file not found"):
        explain_dataset(str(tmp_path / "m.onnx"), str(tmp_path), ["fem"])
    with pytest.raises(InvalidInputError, match="n_masks"):
        evaluate_dataset(model, str(tmp_path), ["rise"], params={"rise": {"n_masks": 0}})
