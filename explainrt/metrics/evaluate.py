"""Evaluate methods over images: insertion/deletion, explanation-map scores, map similarity.

``evaluate`` explains every image with every method, then scores all of an image's maps in
shared engine batches. ``summarise`` gives mean ± std per method and metric; the writers
produce the JSON, CSV and curve plot of `explainrt eval`.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import time
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .._repr import CompactRepr
from ..errors import InvalidInputError, require
from ..imaging import read_image
from ..outputs import expand_image_dirs
from .base import format_rows
from .featurecam_scores import DEFAULT_PERCENTILE, ExplanationMapScore, explanation_map_scores, summarise_explanation_maps
from .insertion_deletion import DEFAULT_STEP, MODES, CausalCurve, insertion_deletion_curves
from .similarity import compare_maps, load_reference_map

log = logging.getLogger(__name__)

REFERENCE_EXTENSIONS = (".npy", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: (key, column title, higher is better?, shown as a percentage without std)
METRICS = (
    ("insertion_auc", "insertion↑", True, False),
    ("deletion_auc", "deletion↓", False, False),
    ("map_right", "expl-map right %", True, True),
    ("map_confidence", "expl-map conf", True, False),
    ("map_increase", "conf increase %", True, True),
    ("pearson", "pearson↑", True, False),
    ("sim", "SIM↑", True, False),
    ("kl", "KL↓", False, False),
    ("forward_passes", "passes", None, False),
    ("explain_seconds", "explain s", None, False),
)


@dataclasses.dataclass(repr=False)
class ImageEvaluation(CompactRepr):
    """Every score of one (image, method) pair."""

    image: str
    method: str
    target: int
    label: str
    probability: float
    forward_passes: int
    explain_seconds: float
    curves: dict  # mode -> CausalCurve
    explanation_map: ExplanationMapScore
    similarity: Optional[dict] = None

    def values(self) -> dict:
        """Flat metric values (the keys of ``METRICS``) for tables and CSV."""
        out = {"insertion_auc": self.curves["insertion"].auc if "insertion" in self.curves else None,
               "deletion_auc": self.curves["deletion"].auc if "deletion" in self.curves else None,
               "map_right": 100.0 * self.explanation_map.right,
               "map_confidence": self.explanation_map.map_prob,
               "map_increase": 100.0 * self.explanation_map.increase,
               "forward_passes": self.forward_passes, "explain_seconds": self.explain_seconds}
        out.update(self.similarity or {"pearson": None, "sim": None, "kl": None})
        return out

    def to_dict(self) -> dict:
        return {"image": self.image, "method": self.method, "target": self.target, "label": self.label,
                "probability": self.probability, "forward_passes": self.forward_passes,
                "explain_seconds": self.explain_seconds, "metrics": self.values(),
                "curves": {mode: curve.to_dict() for mode, curve in self.curves.items()},
                "explanation_map": self.explanation_map.to_dict(), "similarity": self.similarity}


def collect_images(paths: Sequence[str]) -> list[str]:
    """Image files from files and directories (a directory's images sorted by name)."""
    images = expand_image_dirs(list(paths))
    for path in images:
        if not os.path.isfile(path):
            raise InvalidInputError(f"image or directory not found: {path}")
    if not images:
        raise InvalidInputError("no images to evaluate")
    return images


def find_reference(reference_dir: str, image_path: str) -> Optional[str]:
    """``<reference_dir>/<image stem>.npy`` (or .png, …) when it exists."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for ext in REFERENCE_EXTENSIONS:
        candidate = os.path.join(reference_dir, stem + ext)
        if os.path.isfile(candidate):
            return candidate
    return None


def evaluate(explainer, images: Sequence[str], methods: Sequence[str], params: Optional[Mapping] = None,
             step: int = DEFAULT_STEP, percentile: float = DEFAULT_PERCENTILE, modes: Sequence[str] = MODES,
             reference_dir: Optional[str] = None,
             on_pair: Optional[Callable[[str, str], Callable]] = None,
             on_explained: Optional[Callable[[str, str, object, float], None]] = None) -> list[ImageEvaluation]:
    """Explain each image with each method and score every map.

    ``params``: ``{method: {param: value}}``. ``reference_dir``: where ``<stem>.npy|.png``
    reference maps are (images without one get no similarity scores). ``on_pair(image stem,
    stage)`` (stage: a method name, then "insertion/deletion") may return a progress callback
    ``(done, total)`` for that stage; it is closed afterwards when it has ``close()``.
    ``on_explained(image stem, method, explanation, seconds)`` sees each explanation (e.g. to write
    its overlay).
    """
    records = []
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        reference = find_reference(reference_dir, path) if reference_dir else None
        records.extend(evaluate_image(explainer, read_image(path), stem, methods, params, step=step,
                                      percentile=percentile, modes=modes,
                                      reference_map=load_reference_map(reference) if reference else None,
                                      on_pair=on_pair, on_explained=on_explained))
    return records


def evaluate_image(explainer, rgb: np.ndarray, stem: str, methods: Sequence[str], params: Optional[Mapping] = None,
                   step: int = DEFAULT_STEP, percentile: float = DEFAULT_PERCENTILE, modes: Sequence[str] = MODES,
                   reference_map: Optional[np.ndarray] = None,
                   on_pair: Optional[Callable[[str, str], Callable]] = None,
                   on_explained: Optional[Callable[[str, str, object, float], None]] = None) -> list[ImageEvaluation]:
    """``evaluate`` for one decoded image (uint8 RGB) named ``stem``: one record per method."""
    params = params or {}
    explained = {}
    for method in methods:
        t0 = time.perf_counter()
        with _progress(on_pair, stem, method) as progress:
            result = explainer.explain(rgb, method, progress=progress, **params.get(method, {}))
        explained[method] = (result, time.perf_counter() - t0)
        if on_explained is not None:
            on_explained(stem, method, result, explained[method][1])
    maps = {m: r.saliency for m, (r, _) in explained.items()}
    with _progress(on_pair, stem, "insertion/deletion") as progress:
        curves = insertion_deletion_curves(explainer, rgb, maps, step=step, modes=modes, progress=progress)
    map_scores = explanation_map_scores(explainer, rgb, maps, percentile=percentile)
    records = []
    for method, (result, seconds) in explained.items():
        records.append(ImageEvaluation(
            image=stem, method=method, target=result.target, label=result.label,
            probability=float(result.probs[result.target]), forward_passes=result.forward_passes,
            explain_seconds=seconds, curves=curves[method], explanation_map=map_scores[method],
            similarity=compare_maps(result.saliency, reference_map) if reference_map is not None else None))
    log.info("evaluated %s with %s", stem, ", ".join(methods))
    return records


@contextlib.contextmanager
def _progress(on_pair, stem: str, what: str):
    """The caller's progress callback for one stage, closed afterwards if it can be."""
    progress = on_pair(stem, what) if on_pair else None
    try:
        yield progress
    finally:
        if hasattr(progress, "close"):
            progress.close()


def _json_safe(value):
    """NaN/inf → None (JSON has no NaN; dashboards choke on it), recursively."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _by_method(records: Sequence[ImageEvaluation]) -> dict:
    grouped: dict = {}
    for r in records:
        grouped.setdefault(r.method, []).append(r)
    return grouped


def summarise(records: Sequence[ImageEvaluation]) -> dict:
    """``{method: {metric: {"mean", "std", "n"}}}`` over images, plus the seed-001 summary."""
    summary = {}
    for method, rows in _by_method(records).items():
        stats = {}
        for key, *_ in METRICS:
            vals = np.array([v for v in (r.values()[key] for r in rows) if v is not None], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            if vals.size:
                stats[key] = {"mean": float(vals.mean()), "std": float(vals.std()), "n": int(vals.size)}
        stats["explanation_map"] = summarise_explanation_maps([r.explanation_map for r in rows])
        summary[method] = stats
    return summary


def mean_curves(records: Sequence[ImageEvaluation]) -> dict:
    """``{method: {mode: {"fractions", "scores", "auc"}}}``: the curves averaged over images."""
    out = {}
    for method, rows in _by_method(records).items():
        for mode in rows[0].curves:
            curves: list[CausalCurve] = [r.curves[mode] for r in rows]
            lengths = {c.scores.size for c in curves}
            if len(lengths) != 1:
                log.warning("%s %s curves differ in length %s; not averaged", method, mode, sorted(lengths))
                continue
            mean = np.mean([c.scores for c in curves], axis=0)
            out.setdefault(method, {})[mode] = {
                "fractions": [float(v) for v in curves[0].fractions], "scores": [float(v) for v in mean],
                "auc": float(np.mean([c.auc for c in curves]))}
    return out


def format_table(summary: dict) -> str:
    """Mean ± std per method (rows) and metric (columns); percentages shown without std."""
    return format_rows(*table_rows(summary))


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """``format_table``'s header and rows of strings."""
    keys = [(k, title, pct) for k, title, _, pct in METRICS if any(k in s for s in summary.values())]
    header = ["method"] + [title for _, title, _ in keys]
    rows = []
    for method, stats in summary.items():
        row = [method]
        for key, _, pct in keys:
            s = stats.get(key)
            if s is None:
                row.append("-")
            elif pct:
                row.append(f"{s['mean']:.1f}")
            elif key == "forward_passes":
                row.append(f"{s['mean']:.0f}")
            else:
                row.append(f"{s['mean']:.4f} ± {s['std']:.4f}")
        rows.append(row)
    return header, rows


def write_results(output_dir: str, records: Sequence[ImageEvaluation], summary: dict, curves: dict, info: dict,
                  title: Optional[str] = None) -> dict:
    """`eval`'s files in ``output_dir`` (eval.json, eval.csv, curves.png); returns their paths by kind."""
    files = {"json": os.path.join(output_dir, "eval.json"), "csv": os.path.join(output_dir, "eval.csv"),
             "plot": os.path.join(output_dir, "curves.png")}
    write_json(files["json"], records, summary, curves, info)
    write_csv(files["csv"], records)
    plot_curves(files["plot"], curves, title=title)
    return files


def write_json(path: str, records: Sequence[ImageEvaluation], summary: dict, curves: dict, info: dict) -> None:
    """Everything: run info, per-method summary, mean curves, per-(image, method) records with curves."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        report = {**info, "summary": summary, "mean_curves": curves, "records": [r.to_dict() for r in records]}
        json.dump(_json_safe(report), fh, indent=1, allow_nan=False)


def write_csv(path: str, records: Sequence[ImageEvaluation]) -> None:
    """One row per (image, method) with every metric."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = ["image", "method", "target", "label", "probability", *[k for k, *_ in METRICS],
              "map_class", "map_kept_fraction"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in records:
            writer.writerow({"image": r.image, "method": r.method, "target": r.target, "label": r.label,
                             "probability": r.probability, **r.values(),
                             "map_class": r.explanation_map.map_class,
                             "map_kept_fraction": r.explanation_map.kept_fraction})


def plot_curves(path: str, curves: dict, title: Optional[str] = None) -> None:
    """PNG of the mean insertion and deletion curves per method (matplotlib, Agg backend)."""
    matplotlib = require("matplotlib", "eval", "plotting insertion/deletion curves")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(m in c for c in curves.values())]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for method, by_mode in curves.items():
            if mode in by_mode:
                c = by_mode[mode]
                ax.plot(c["fractions"], c["scores"], label=f"{method} (AUC {c['auc']:.3f})")
        ax.set_title(f"{mode} ({'higher' if mode == 'insertion' else 'lower'} is better)")
        ax.set_xlabel(f"fraction of pixels {'inserted' if mode == 'insertion' else 'deleted'}")
        ax.set_ylabel("mean p(class)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
