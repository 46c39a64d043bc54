"""`explainrt explain --ray` and `explainrt eval --ray`: the same commands on Ray Data (light to import)."""
from __future__ import annotations

import json
import os
import sys
import time

from ..errors import InvalidInputError

MAX_ERRORS_SHOWN = 20


def add_ray_options(p) -> None:
    """The --ray flags of `explain` and `eval` (nothing is imported until one is used)."""
    from ..cli import positive_int

    g = p.add_argument_group("Ray (pip install 'explainrt[ray]')")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: no ADDRESS starts a local Ray (or joins $RAY_ADDRESS), 'auto' joins this "
                        "machine's cluster, ray://HOST:10001 a remote one. IMAGES may be directories or URIs Ray "
                        "reads; results go to Parquet under -o, a corrupt image is recorded, not fatal")
    g.add_argument("--ray-actors", type=positive_int, default=None, metavar="N",
                   help="explaining actors (default: the cluster's CPUs / --threads, or one per GPU)")


def _start(args) -> None:
    from . import _ray, init

    init(args.ray)
    if args.no_progress:
        _ray().data.DataContext.get_current().enable_progress_bars = False


def _images_arg(images: list):
    return images[0] if len(images) == 1 else list(images)


def _report_errors(errors: dict) -> None:
    for path, reason in list(errors.items())[:MAX_ERRORS_SHOWN]:
        print(f"explainrt: error: {path}: {reason}", file=sys.stderr)
    if len(errors) > MAX_ERRORS_SHOWN:
        print(f"explainrt: … and {len(errors) - MAX_ERRORS_SHOWN} more failed images", file=sys.stderr)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _metadata(path: str):
    from ..export.metadata import load_onnx, read_metadata_props

    model = load_onnx(path)
    return read_metadata_props({p.key: p.value for p in model.metadata_props}, path)


def _one_target(args, meta):
    """`--target` (an index or label name) as the one class index Ray explains, or None (top-1)."""
    from ..cli import resolve_targets

    if not args.target:
        return None
    targets = resolve_targets(args.target, meta.labels, meta.num_classes)
    if len(targets) > 1:
        raise InvalidInputError(f"--ray explains one class per image (or each image's top-1); got {len(targets)} "
                                "targets: give one --target, or run without --ray for several")
    return targets[0]


def _methods(args, spec: str):
    """(methods, their -p parameters) of the command line; without Ray installed, first, the
    one-line error that names the extra."""
    from ..cli import params_by_method, parse_params
    from ..outputs import parse_methods
    from . import _ray

    _ray()
    methods = parse_methods(spec)
    return methods, params_by_method(parse_params(args.param), methods)


def _begin(args, rows_dir: str) -> str:
    """Create OUTPUT, start (or join) Ray; the path of the Parquet rows, OUTPUT/``rows_dir``."""
    from ..outputs import prepare_output_dir

    prepare_output_dir(args.output)
    out = os.path.join(args.output, rows_dir)
    if os.path.exists(out):
        raise InvalidInputError(f"{out} exists: give another -o (Ray's Parquet writer adds files to a directory)")
    _start(args)
    return out


def cmd_explain_ray(args) -> int:
    """`explain --ray`: Parquet rows under OUTPUT/explanations, the summary in OUTPUT/summary.json."""
    from ..cli import method_applies, methods_for_model
    from . import explain_dataset, summarise_explanations

    methods, params = _methods(args, args.method)
    meta = _metadata(args.model)
    methods = methods_for_model(args.method, methods, meta.name, lambda m: method_applies(m, params[m], meta))
    target = _one_target(args, meta)
    out = _begin(args, "explanations")
    t0 = time.perf_counter()
    ds = explain_dataset(args.model, _images_arg(args.images), methods, params=params, target=target, output=out,
                         batch_size=args.batch_size, backend=args.backend, device=args.device, threads=args.threads,
                         actors=args.ray_actors)
    seconds = time.perf_counter() - t0
    summary = {**summarise_explanations(ds), "seconds": seconds, "methods": methods, "output": out}
    summary["images_per_s"] = summary["images"] / seconds if seconds > 0 else None
    with open(os.path.join(args.output, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{_plural(summary['images'], 'image')} x {_plural(len(methods), 'method')} on Ray: "
              f"{summary['rows']} rows, {_plural(summary['failed_images'], 'image')} failed, {seconds:.1f} s "
              f"({summary['images_per_s']:.2f} images/s end to end)")
        for method, m in summary["by_method"].items():
            passes = "-" if m["mean_forward_passes"] is None else f"{m['mean_forward_passes']:.0f}"
            explain_s = "-" if m["mean_explain_s"] is None else f"{m['mean_explain_s'] * 1e3:.1f} ms"
            print(f"  {method}: {m['rows'] - m['errors']} explained, {m['errors']} failed, {passes} forward passes, "
                  f"{explain_s} per image")
        print(f"wrote {out} (Parquet) and {os.path.join(args.output, 'summary.json')}")
    _report_errors(summary["errors"])
    return 1 if summary["failed_images"] else 0


def cmd_eval_ray(args) -> int:
    """`eval --ray`: what `eval` writes (eval.json, with the failed images; eval.csv; curves.png), rows as Parquet."""
    from ..metrics import evaluate as ev
    from . import evaluate_dataset, evaluation_records

    if args.reference_dir:
        raise InvalidInputError("--reference-dir is not supported with --ray (reference maps would have to be on every "
                                "worker); run `eval` without --ray for similarity scores")
    methods, params = _methods(args, args.methods)
    out = _begin(args, "eval_rows")
    t0 = time.perf_counter()
    ds = evaluate_dataset(args.model, _images_arg(args.images), methods, params=params, step=args.step,
                          percentile=args.percentile, output=out, batch_size=args.batch_size, backend=args.backend,
                          device=args.device, threads=args.threads, actors=args.ray_actors)
    records, errors = evaluation_records(ds, methods)
    seconds = time.perf_counter() - t0
    if not records:
        _report_errors(errors)
        raise InvalidInputError(f"every image failed ({len(errors)}); the reasons are above")
    summary, curves = ev.summarise(records), ev.mean_curves(records)
    images = list(dict.fromkeys(r.image for r in records))
    info = {"model": args.model, "methods": methods, "params": params, "step": args.step,
            "percentile": args.percentile, "images": images, "backend": args.backend, "device": args.device,
            "batch_size": args.batch_size, "ray": args.ray or "local", "seconds": seconds, "errors": errors}
    files = ev.write_results(args.output, records, summary, curves, info,
                             title=f"{os.path.basename(args.model)}: {len(images)} image(s), step {args.step}")
    print(f"{len(images)} image(s), mean ± std over images (insertion/deletion step {args.step}, "
          f"explanation map above the {args.percentile:g}th percentile), on Ray in {seconds:.1f} s")
    print(ev.format_table(summary))
    if errors:
        print(f"{_plural(len(errors), 'image')} failed (reasons in eval.json)")
    print("wrote " + ", ".join([*files.values(), out + " (Parquet)"]))
    _report_errors(errors)
    return 1 if errors else 0
