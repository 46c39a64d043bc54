"""Explain and evaluate datasets on Ray Data (``pip install 'explainrt[ray]'``; Ray is imported lazily).

    import ray
    from explainrt.distributed import explain_dataset, summarise_explanations
    ray.init()                                   # or ray.init("auto") on a cluster
    ds = explain_dataset("models/lite0.onnx", "images/", ["fem", "sidu"], output="out/explanations")
    summarise_explanations(ds)                   # rows, errors, by method

Images are read as bytes (``ray.data.read_binary_files``) and decoded on the workers, so a
corrupt file among thousands becomes a row with its reason in the ``error`` column instead of
failing the job. Each Ray actor loads the engine once (``Explainer``) and explains its batches
image by image, with exactly the code of a single-process ``Explainer``: results are the same
numbers. CPU actors take ``threads`` CPUs each (ONNX Runtime's intra-op threads), GPU actors
(``device="cuda"``) one GPU each.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .. import outputs
from ..errors import ExplainRTError, InvalidInputError, require

IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in outputs.IMAGE_EXTENSIONS)  # Ray's form: no dot
TIMING_KEYS = ("preprocess_s", "base_pass_s", "explain_s", "total_s")
CURVE_MODES = ("insertion", "deletion")

ImagesInput = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Any]  # ... or a ray.data.Dataset


def _ray():
    return require("ray", "ray", "explainrt.distributed (explaining datasets on Ray)")


def init(address: Optional[str] = None, **options) -> None:
    """Connect to Ray unless already connected: ``address`` None or "" starts a local instance,
    "auto" joins the cluster of this machine, "ray://HOST:10001" a remote one."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address or None, **options)


def read_images(images: ImagesInput, concurrency: Optional[int] = None):
    """A ``ray.data.Dataset`` of ``bytes`` and ``path`` rows.

    ``images``: a directory or URI prefix Ray can read, one file, a list of them (files whose
    extension is not an image's are skipped), or an existing Dataset with a ``bytes`` column
    (encoded images) or an ``image`` column (uint8 H×W×3 arrays), and a ``path`` column naming
    each row (the results are keyed by it).
    Reads take no CPU slot (they are I/O), so that every CPU can hold an explaining actor;
    ``concurrency`` caps the read tasks running at once (each is a worker process: without a
    cap, Ray starts one per block, hundreds for a large directory).
    """
    ray = _ray()
    if isinstance(images, ray.data.Dataset):
        columns = images.columns(fetch_if_missing=True) or []
        if ("bytes" not in columns and "image" not in columns) or "path" not in columns:
            raise InvalidInputError(f"the Dataset has columns {columns}: it needs 'bytes' (encoded images) or "
                                    "'image' (uint8 H×W×3 arrays), and 'path' (a name for each row)")
        return images
    if isinstance(images, (str, os.PathLike)):
        paths = [os.fspath(images)]
    else:
        paths = [os.fspath(p) for p in images]
    if not paths:
        raise InvalidInputError("no images given")
    missing = [p for p in paths if "://" not in p and not os.path.exists(p)]
    if missing:
        raise InvalidInputError(f"image or directory not found: {missing[0]}" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    paths = [p if "://" in p else os.path.abspath(p) for p in paths]  # workers need not share our directory
    return ray.data.read_binary_files(paths, include_paths=True, num_cpus=0, concurrency=concurrency,
                                      file_extensions=[*IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS)])


def _decode(batch: Mapping[str, np.ndarray], i: int) -> tuple[str, np.ndarray]:
    """(path, RGB) of row ``i`` of a batch; InvalidInputError for bytes that are not an image."""
    from ..imaging import as_rgb_uint8, decode_image

    path = str(batch["path"][i])
    if "bytes" in batch:
        return path, decode_image(bytes(batch["bytes"][i]), name=path)
    return path, as_rgb_uint8(np.asarray(batch["image"][i]), name=path)


def _reason(exc: BaseException) -> str:
    """The one-line reason recorded in the error column."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, ExplainRTError) else f"{type(exc).__name__}: {text}"


class _Worker:
    """Base of the actors: one ``Explainer`` per actor, loaded once."""

    def __init__(self, model: str, batch_size: int, backend: str, device: str, threads: int):
        from ..api import Explainer

        self.explainer = Explainer(model, batch_size=batch_size, backend=backend, device=device, threads=threads)
        self.hw = tuple(self.explainer.metadata.input_size)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.methods: list = []

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict:
        """Rows for a batch: ``_rows(path, rgb)`` per decoded image; an image that cannot be decoded
        (or whose ``_rows`` fails) gives one failed row per method, and the job goes on."""
        rows = []
        for i in range(len(next(iter(batch.values())))):
            path = str(batch["path"][i])
            try:
                path, rgb = _decode(batch, i)
                rows.extend(self._rows(path, rgb))
            except Exception as exc:  # noqa: BLE001 (recorded in the error column, the job goes on)
                rows.extend(self._failed(path, m, exc) for m in self.methods)
        return _columns(rows)


class ExplainBatch(_Worker):
    """``map_batches`` callable: one output row per (image, method)."""

    def __init__(self, model: str, methods: Sequence[str], params: Mapping, target: Optional[int], batch_size: int,
                 backend: str, device: str, threads: int):
        super().__init__(model, batch_size, backend, device, threads)
        self.methods, self.params, self.target = list(methods), dict(params), target

    def _rows(self, path: str, rgb: np.ndarray) -> list:
        rows = []
        for method in self.methods:  # one method's failure is that row's alone
            try:
                result = self.explainer.explain(rgb, method, target=self.target, **self.params.get(method, {}))
            except Exception as exc:  # noqa: BLE001
                rows.append(self._failed(path, method, exc))
                continue
            rows.append({"path": path, "method": method, "target": result.target, "label": result.label,
                         "probability": float(result.probs[result.target]),
                         "forward_passes": result.forward_passes, "saliency": result.saliency,
                         **{k: float(result.timings[k]) for k in TIMING_KEYS}, "error": "", "worker": self.name,
                         "finished": time.time()})
        return rows

    def _failed(self, path: str, method: str, exc: BaseException) -> dict:
        return {"path": path, "method": method, "target": -1, "label": "", "probability": float("nan"),
                "forward_passes": 0, "saliency": np.full(self.hw, np.nan, np.float32),
                **{k: float("nan") for k in TIMING_KEYS}, "error": _reason(exc), "worker": self.name,
                "finished": time.time()}


class EvaluateBatch(_Worker):
    """``map_batches`` callable: `explainrt eval`'s scores, one output row per (image, method)."""

    def __init__(self, model: str, methods: Sequence[str], params: Mapping, step: int, percentile: float,
                 batch_size: int, backend: str, device: str, threads: int):
        super().__init__(model, batch_size, backend, device, threads)
        self.methods, self.params, self.step, self.percentile = list(methods), dict(params), step, percentile
        from ..metrics.insertion_deletion import step_count

        self.pixels = self.hw[0] * self.hw[1]  # the curves are computed at the model's input size
        self.points = step_count(self.pixels, step) + 1  # scores per curve

    def _rows(self, path: str, rgb: np.ndarray) -> list:
        from ..metrics.evaluate import evaluate_image

        stem = os.path.splitext(os.path.basename(path))[0]
        records = evaluate_image(self.explainer, rgb, stem, self.methods, self.params, step=self.step,
                                 percentile=self.percentile)
        return [self._row(path, r) for r in records]

    def _row(self, path: str, r) -> dict:
        m = r.explanation_map
        return {"path": path, "image": r.image, "method": r.method, "target": r.target, "label": r.label,
                "probability": r.probability, "forward_passes": r.forward_passes,
                "explain_seconds": r.explain_seconds, "insertion_auc": r.curves["insertion"].auc,
                "deletion_auc": r.curves["deletion"].auc,
                **{f"{mode}_scores": np.asarray(r.curves[mode].scores, np.float64) for mode in CURVE_MODES},
                "curve_step": r.curves["deletion"].step, "curve_pixels": r.curves["deletion"].pixels,
                "map_original_class": m.original_class, "map_original_prob": m.original_prob,
                "map_class": m.map_class, "map_prob": m.map_prob, "map_kept_fraction": m.kept_fraction,
                "error": "", "worker": self.name}

    def _failed(self, path: str, method: str, exc: BaseException) -> dict:
        nan = float("nan")
        return {"path": path, "image": os.path.splitext(os.path.basename(path))[0], "method": method,
                "target": -1, "label": "", "probability": nan, "forward_passes": 0, "explain_seconds": nan,
                "insertion_auc": nan, "deletion_auc": nan,
                **{f"{mode}_scores": np.full(self.points, np.nan) for mode in CURVE_MODES},
                "curve_step": self.step, "curve_pixels": self.pixels, "map_original_class": -1,
                "map_original_prob": nan, "map_class": -1, "map_prob": nan,
                "map_kept_fraction": nan, "error": _reason(exc), "worker": self.name}


def _columns(rows: list[dict]) -> dict:
    """Rows as a batch of columns; arrays of one shape become tensor columns."""
    if not rows:
        return {}
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if isinstance(values[0], np.ndarray):
            out[key] = np.stack(values)
        elif isinstance(values[0], str):
            out[key] = np.array(values, dtype=object)
        else:
            out[key] = np.array(values)
    return out


def _actors(ray, actors: Optional[int], threads: int, device: str) -> int:
    """Default pool size: one actor per GPU, or per ``threads`` CPUs of the cluster."""
    if actors is not None:
        if actors < 1:
            raise InvalidInputError(f"actors must be >= 1, got {actors}")
        return int(actors)
    resources = ray.cluster_resources()
    if device == "cuda":
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1) // threads))


def _threads(threads: Optional[int]) -> int:
    """ONNX Runtime threads per actor, which is also the CPUs it reserves (default 1)."""
    if threads is None:
        return 1
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InvalidInputError(f"threads must be an integer >= 1 (or None), got {threads!r}")
    return int(threads)


def _map(images, cls, args: tuple, *, actors, threads: int, device, rows_per_batch: int, output: Optional[str]):
    ray = _ray()
    if rows_per_batch < 1:
        raise InvalidInputError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    size = _actors(ray, actors, threads, device)
    ds = read_images(images, concurrency=size).map_batches(
        cls, fn_constructor_args=args, batch_size=rows_per_batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size),
        **({"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": threads}))
    if output is None:
        return ds
    ds.write_parquet(output)
    return ray.data.read_parquet(output)


def _check(model: str, methods: Union[str, Sequence[str]], params: Optional[Mapping]) -> tuple[list[str], dict, str]:
    """Methods, parameters and the model's absolute path, checked on the driver before any actor starts."""
    from ..explainers import METHODS
    from ..outputs import parse_methods

    methods = parse_methods(methods) if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InvalidInputError(f"unknown method {unknown[0] if unknown else '(none)'!r}; choose from "
                                f"{', '.join(METHODS)}")
    params = {m: dict((params or {}).get(m, {})) for m in methods}
    for m in methods:
        try:
            METHODS[m].create(**params[m])
        except InvalidInputError as exc:
            raise InvalidInputError(f"{m}: {exc}") from None
    if not os.path.isfile(model):
        raise InvalidInputError(f"model file not found: {model} (on a cluster, put it where every node and this "
                                "driver read it)")
    return methods, params, os.path.abspath(model)


def explain_dataset(model: str, images: ImagesInput, methods: Union[str, Sequence[str]] = "sidu", *,
                    params: Optional[Mapping[str, Mapping]] = None, target: Optional[int] = None,
                    output: Optional[str] = None, batch_size: int = 64, backend: str = "onnxruntime",
                    device: str = "cpu", threads: Optional[int] = None, actors: Optional[int] = None,
                    rows_per_batch: int = 4):
    """Explain every image with every method on Ray; a ``ray.data.Dataset`` of one row per (image, method).

    Columns: path, method, target, label, probability, forward_passes, saliency (a float32
    H×W tensor at the model's input size; NaN where the row failed), preprocess_s, base_pass_s,
    explain_s, total_s, error ("" or the reason the image failed), worker (host:pid of the actor),
    finished (when the row was done, seconds since the epoch).

    ``model`` must be readable by every worker (a shared path). ``params``: ``{method: {param:
    value}}``; ``target``: a class index (default: each image's top-1). ``output``: a directory
    to write Parquet files to (the returned Dataset then reads them back); without it the
    Dataset is lazy (``.write_parquet``, ``.iter_batches``, ...). ``threads``: CPUs (ONNX Runtime
    threads) per actor; ``actors``: pool size (default: every CPU, or one actor per GPU);
    ``rows_per_batch``: images handed to an actor at a time.
    """
    methods, params, model = _check(model, methods, params)
    threads = _threads(threads)
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 0):
        raise InvalidInputError(f"target must be a class index >= 0 (or None), got {target!r}")
    return _map(images, ExplainBatch, (str(model), methods, params, target, batch_size, backend, device, threads),
                actors=actors, threads=threads, device=device, rows_per_batch=rows_per_batch, output=output)


def evaluate_dataset(model: str, images: ImagesInput, methods: Union[str, Sequence[str]] = "sidu,rise,scorecam,fem",
                     *, params: Optional[Mapping[str, Mapping]] = None, step: int = 224, percentile: float = 80.0,
                     output: Optional[str] = None, batch_size: int = 64, backend: str = "onnxruntime",
                     device: str = "cpu", threads: Optional[int] = None, actors: Optional[int] = None,
                     rows_per_batch: int = 2):
    """`explainrt eval`'s scores on Ray: a ``ray.data.Dataset`` of one row per (image, method).

    Columns: path, image, method, target, label, probability, forward_passes, explain_seconds,
    insertion_auc, deletion_auc, insertion_scores and deletion_scores (the curves),
    map_original_class, map_original_prob, map_class, map_prob, map_kept_fraction (the
    explanation-map score), error, worker. ``evaluation_records`` turns them back into
    ``ImageEvaluation`` records, whose ``metrics.evaluate.summarise`` is the table of `eval`.
    Other arguments as ``explain_dataset``.
    """
    methods, params, model = _check(model, methods, params)
    threads = _threads(threads)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise InvalidInputError(f"step must be an integer >= 1 pixel, got {step!r}")
    return _map(images, EvaluateBatch, (str(model), methods, params, int(step), float(percentile), batch_size,
                                        backend, device, threads),
                actors=actors, threads=threads, device=device, rows_per_batch=rows_per_batch, output=output)


def _rows(ds, columns: Sequence[str]) -> dict:
    """Every value of ``columns`` of a (small-columned) Dataset, as NumPy arrays."""
    parts: dict = {c: [] for c in columns}
    for batch in ds.select_columns(list(columns)).iter_batches(batch_format="numpy", batch_size=4096):
        for c in columns:
            parts[c].append(batch[c])
    return {c: np.concatenate(v) if v else np.array([]) for c, v in parts.items()}


def summarise_explanations(ds) -> dict:
    """Rows, images and errors of an ``explain_dataset`` result, overall and by method."""
    cols = _rows(ds, ["path", "method", "error", "forward_passes", "explain_s"])
    failed = cols["error"] != ""
    by_method = {}
    for method in dict.fromkeys(cols["method"].tolist()):
        sel = cols["method"] == method
        ok = sel & ~failed
        by_method[method] = {"rows": int(sel.sum()), "errors": int((sel & failed).sum()),
                             "mean_forward_passes": float(cols["forward_passes"][ok].mean()) if ok.any() else None,
                             "mean_explain_s": float(cols["explain_s"][ok].mean()) if ok.any() else None}
    errors = dict(zip(cols["path"][failed].tolist(), cols["error"][failed].tolist()))
    return {"rows": int(cols["path"].size), "images": len(set(cols["path"].tolist())),
            "failed_images": len(errors), "errors": errors, "by_method": by_method}


def evaluation_records(ds, methods: Optional[Sequence[str]] = None) -> tuple[list, dict]:
    """(``ImageEvaluation`` records of the rows that succeeded, in path then method order; {path: error}).

    The records are what a single-process `explainrt eval` builds, so ``summarise``,
    ``mean_curves``, ``write_json``/``write_csv``/``plot_curves`` of ``metrics.evaluate`` apply.
    """
    from ..metrics.evaluate import ImageEvaluation
    from ..metrics.featurecam_scores import ExplanationMapScore
    from ..metrics.insertion_deletion import CausalCurve

    rows = ds.drop_columns(["worker"]).take_all()
    order = {m: i for i, m in enumerate(methods or dict.fromkeys(r["method"] for r in rows))}
    rows.sort(key=lambda r: (r["path"], order.get(r["method"], len(order))))
    errors = {r["path"]: r["error"] for r in rows if r["error"]}
    records = []
    for r in rows:
        if r["error"]:
            continue
        curves = {mode: CausalCurve(mode=mode, target=int(r["target"]), step=int(r["curve_step"]),
                                    pixels=int(r["curve_pixels"]), scores=np.asarray(r[f"{mode}_scores"], np.float64))
                  for mode in CURVE_MODES}
        records.append(ImageEvaluation(
            image=r["image"], method=r["method"], target=int(r["target"]), label=r["label"],
            probability=float(r["probability"]), forward_passes=int(r["forward_passes"]),
            explain_seconds=float(r["explain_seconds"]), curves=curves,
            explanation_map=ExplanationMapScore(int(r["map_original_class"]), float(r["map_original_prob"]),
                                                int(r["map_class"]), float(r["map_prob"]),
                                                float(r["map_kept_fraction"]))))
    return records, errors


__all__ = ["init", "read_images", "explain_dataset", "evaluate_dataset", "summarise_explanations",
           "evaluation_records", "ExplainBatch", "EvaluateBatch"]
