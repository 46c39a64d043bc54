"""`explainrt eval` (faithfulness metrics over images) and `explainrt bench` (latency, peers)."""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile

from ..cli import add_engine_options, params_by_method, positive_int
from ..distributed.cli import add_ray_options
from ..errors import InvalidInputError

log = logging.getLogger(__name__)

DEFAULT_EVAL_METHODS = "sidu,rise,scorecam,fem"
DEFAULT_BENCH_METHODS = "sidu,scorecam,rise,fem"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidInputError(f"expected comma-separated integers (e.g. 8,16,32,64), got {text!r}") from None
    if not values or min(values) < 1:
        raise InvalidInputError(f"batch sizes must be integers >= 1, got {text!r}")
    return values


def _engine_options(args) -> dict:
    return {"threads": args.threads} if args.threads else {}


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from ..api import Explainer
    from ..cli import ProgressBar, parse_params
    from ..figures import caption
    from ..outputs import parse_methods, prepare_output_dir, write_result_files
    from . import evaluate as ev

    if args.step < 1:
        raise InvalidInputError(f"--step must be at least 1 pixel, got {args.step}")
    if args.ray is not None:  # explainrt.distributed: the same scores on Ray Data
        from ..distributed.cli import cmd_eval_ray

        return cmd_eval_ray(args)
    methods = parse_methods(args.methods)
    prepare_output_dir(args.output)
    params = params_by_method(parse_params(args.param), methods)
    if args.reference_dir and not os.path.isdir(args.reference_dir):
        raise InvalidInputError(f"--reference-dir {args.reference_dir} is not a directory")
    images = ev.collect_images(args.images)
    explainer = Explainer(args.model, batch_size=args.batch_size, backend=args.backend, device=args.device,
                          **_engine_options(args))
    show = not args.no_progress
    records = []
    written: dict = {}  # (image stem, method) -> overlay files
    originals: dict = {}

    def write_overlay(stem: str, method: str, result, _seconds: float) -> None:
        originals.setdefault(stem, result.image)
        written[stem, method] = write_result_files(
            os.path.join(args.output, "maps"), stem, method, result.saliency, result.image, result.visualization,
            caption=None if args.plain else caption(method, result.label, result.target,
                                                    float(result.probs[result.target]), result.forward_passes))

    with tqdm(total=len(images), desc="images", unit="image", file=sys.stderr, disable=None if show else True) as bar:
        for path in images:
            records.extend(ev.evaluate(explainer, [path], methods, params, step=args.step, percentile=args.percentile,
                                       reference_dir=args.reference_dir,
                                       on_pair=lambda stem, what: ProgressBar(f"{stem} {what}", show),
                                       on_explained=write_overlay))
            bar.update(1)
    summary = ev.summarise(records)
    curves = ev.mean_curves(records)
    meta = explainer.metadata
    info = {"model": args.model, "model_name": meta.name, "input_size": list(meta.input_size),
            "methods": methods, "params": params, "step": args.step, "percentile": args.percentile,
            "images": [os.path.basename(p) for p in images], "backend": explainer.engine.backend,
            "device": explainer.engine.device, "batch_size": explainer.batch_size}
    files = ev.write_results(args.output, records, summary, curves, info,
                             title=f"{meta.name or os.path.basename(args.model)}: {len(images)} image(s), step {args.step}")
    print(f"{len(images)} image(s), mean ± std over images (insertion/deletion step {args.step}, "
          f"explanation map above the {args.percentile:g}th percentile)")
    files["index"] = _eval_index(args, records, summary, written, originals, files["plot"],
                                 f"{meta.name or os.path.basename(args.model)}: {len(images)} image(s), "
                                 f"insertion/deletion step {args.step}, explanation map above the "
                                 f"{args.percentile:g}th percentile; {explainer.engine.backend} on "
                                 f"{explainer.engine.device}")
    print(ev.format_table(summary))
    print("wrote " + ", ".join(files.values()) + f" and the maps in {os.path.join(args.output, 'maps')}")
    return 0


def _eval_index(args, records, summary, written: dict, originals: dict, plot: str, note: str) -> str:
    """eval's index.html: the summary table, the mean curves, then a row per image with each overlay."""
    from ..report import ReportItem, image_link, table_html, write_index
    from . import evaluate as ev

    items = []
    for r in records:
        v = r.values()
        details = {k: f"{v[key]:.4f}" for k, key in (("insertion AUC", "insertion_auc"),
                                                     ("deletion AUC", "deletion_auc")) if v.get(key) is not None}
        items.append(ReportItem(r.image, r.method, r.target, r.label, r.probability, r.forward_passes,
                                r.explain_seconds, written.get((r.image, r.method), {}), details))
    sections = [("Mean ± std over images", table_html(*ev.table_rows(summary))),
                ("Insertion and deletion curves (mean over images)", image_link(plot, args.output, "mean curves"))]
    return write_index(args.output, "explainrt eval", items, originals, [note], sections)


def _bench_image(spec: str):
    """A file path, or the name of a scikit-image photograph (e.g. chelsea)."""
    if os.path.isfile(spec):
        return spec
    from .bench import sample_image

    return sample_image(spec)


def _compare(args, model_path: str, image, methods: list, rows: list, threads) -> list:
    """Time the installed peers on the zoo model's torch module; our time over theirs per peer."""
    import numpy as np

    from ..api import Explainer
    from ..errors import require
    from . import peers as pr

    installed = []
    for peer in pr.PEERS:
        why = peer.missing()
        if why is None:
            installed.append(peer)
        else:
            print(f"compare: {peer.name} is not installed or does not import ({why}); skipped. Install it in a "
                  f"separate environment, not this one (pip would replace the pinned CPU torch with a CUDA build): "
                  f"see README.md, 'Evaluate and benchmark': a .venv-bench of its own")
    if not args.zoo:
        print("compare: peers run on the framework model; use --zoo efficientnet-lite0 (not --model) to compare")
        return []
    wanted = [p for p in installed if p.ours in methods]
    for peer in installed:
        if peer.ours not in methods:
            print(f"compare: {peer.name} is compared with {peer.ours}, which is not in --methods; skipped")
    if not wanted:
        return []
    torch = require("torch", "export", "the torch peers")
    if threads:
        torch.set_num_threads(int(threads))
    model, layer = pr.zoo_torch_model(args.zoo)
    explainer = Explainer(model_path, batch_size=1, max_batch=1, **({"threads": threads} if threads else {}))
    x = explainer.prepare(image).x
    target = int(explainer.predict(image).argmax())
    explainer.close()
    results = []
    for peer in wanted:
        with pr.quiet_peer_bars(args.no_progress):
            theirs = pr.time_peer(peer, model, layer, x, target, batch_size=args.peer_batch_size, warmup=0,
                                  repeat=args.peer_repeat)
        their_p50 = float(np.median(theirs["times"]))
        for ours in (r for r in rows if r.method == peer.ours):
            results.append({"peer": peer.name, "note": peer.note, "peer_batch_size": args.peer_batch_size,
                            "peer_p50_s": their_p50, "peer_forward_passes": theirs["forward_passes"],
                            "peer_times_s": theirs["times"], "method": ours.method, "batch_size": ours.batch_size,
                            "ours_p50_s": ours.p50, "ours_forward_passes": ours.forward_passes,
                            "ours_over_theirs": ours.p50 / their_p50, "speedup": their_p50 / ours.p50})
    return results


def _format_compare(results: list) -> str:
    from .base import format_rows

    header = ["peer", "vs", "batch ours/theirs", "ours p50 s", "theirs p50 s", "ours/theirs", "speedup",
              "passes ours/theirs"]
    body = [[r["peer"], r["method"], f"{r['batch_size']}/{r['peer_batch_size']}", f"{r['ours_p50_s']:.3f}",
             f"{r['peer_p50_s']:.3f}", f"{r['ours_over_theirs']:.3f}", f"{r['speedup']:.1f}x",
             f"{r['ours_forward_passes']}/{r['peer_forward_passes']}"] for r in results]
    return format_rows(header, body)


def cmd_bench(args) -> int:
    from tqdm import tqdm

    from ..cli import parse_params
    from ..outputs import parse_methods, prepare_output_file
    from . import bench

    if bool(args.model) == bool(args.zoo):
        raise InvalidInputError("give either --model M.onnx or --zoo efficientnet-lite0")
    if args.repeat < 1 or args.warmup < 0 or args.peer_repeat < 1:
        raise InvalidInputError("--repeat and --peer-repeat must be >= 1 and --warmup >= 0")
    methods = parse_methods(args.methods)
    for path in (args.json, args.plot):
        if path:
            prepare_output_file(path)
    params = params_by_method(parse_params(args.param), methods)
    batch_sizes = _int_list(args.batch_sizes)
    image = _bench_image(args.image)
    machine = bench.describe_machine()
    with tempfile.TemporaryDirectory(prefix="explainrt-bench-") as tmp:
        model_path = args.model
        if args.zoo:
            from ..export import export_zoo_model

            model_path = os.path.join(tmp, f"{args.zoo}.onnx")
            print(f"exporting {args.zoo} to a temporary ONNX file …", file=sys.stderr)
            export_zoo_model(args.zoo, model_path)
        total = len(methods) * len(batch_sizes)
        with tqdm(total=total, desc="bench", unit="config", file=sys.stderr,
                  disable=None if not args.no_progress else True) as bar:
            rows = bench.run_bench(model_path, image, methods, batch_sizes, backend=args.backend, device=args.device,
                                   threads=args.threads, warmup=args.warmup, repeat=args.repeat, params=params,
                                   on_result=lambda stats: bar.update(1))
        compare = _compare(args, model_path, image, methods, rows, args.threads) if args.compare else []
    print(bench.format_machine(machine))
    print(f"model: {args.model or args.zoo}, image: {args.image}, {args.warmup} warm-up + {args.repeat} timed runs, "
          f"threads: {args.threads or 'ORT default'}")
    print("memory: RSS sampled from /proc/self/statm every 1 ms (peak; growth over the RSS before the runs) "
          "and ru_maxrss growth")
    print(bench.format_bench_table(rows))
    if compare:
        print()
        print(_format_compare(compare))
    plot = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    if plot:
        bench.plot_bench(plot, rows, machine, title=f"{args.model or args.zoo}, image {args.image}: "
                                                    f"{args.warmup} warm-up + {args.repeat} timed runs")
        print(f"wrote {plot}")
    if args.json:
        report = {"machine": machine, "model": args.model or args.zoo, "image": args.image, "methods": methods,
                  "params": params, "batch_sizes": batch_sizes, "threads": args.threads, "warmup": args.warmup,
                  "repeat": args.repeat, "results": [r.to_dict() for r in rows], "compare": compare}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


def register(subparsers) -> None:
    """Add `eval` and `bench` to the explainrt command line."""
    p = subparsers.add_parser("eval", help="faithfulness metrics (insertion/deletion, explanation maps, similarity)")
    p.add_argument("images", nargs="+", help="image files or directories of images")
    p.add_argument("--model", required=True, help="exported .onnx model")
    p.add_argument("--methods", default=DEFAULT_EVAL_METHODS, help=f"comma list or 'all' (default {DEFAULT_EVAL_METHODS})")
    p.add_argument("-o", "--output", default="eval_out",
                   help="output directory for eval.json, eval.csv, curves.png, index.html and the maps (maps/)")
    p.add_argument("--step", type=int, default=224, help="pixels inserted/deleted per step (default 224)")
    p.add_argument("--percentile", type=float, default=80.0,
                   help="explanation-map threshold percentile (Feature CAM's evaluation; default 80)")
    p.add_argument("--reference-dir", help="directory of reference maps <image stem>.npy|.png for Pearson/SIM/KL")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE", help="method parameter, repeatable")
    p.add_argument("--plain", action="store_true", help="bare overlay PNGs (no caption, no colour bar)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per engine call (default 64)")
    _engine_arguments(p)
    add_ray_options(p)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("bench", help="latency per method, backend and batch size; --compare with peers")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="exported .onnx model")
    src.add_argument("--zoo", help="built-in model (efficientnet-lite0), exported to a temporary file; "
                                   "needed by --compare")
    p.add_argument("--image", default="chelsea", help="image file or scikit-image photograph name (default chelsea)")
    p.add_argument("--methods", default=DEFAULT_BENCH_METHODS, help=f"comma list or 'all' (default {DEFAULT_BENCH_METHODS})")
    p.add_argument("--batch-sizes", default="64", help="comma list to sweep, e.g. 8,16,32,64 (default 64)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration (default 1)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per configuration (default 5)")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE", help="method parameter, repeatable")
    p.add_argument("--json", help="write the results as JSON to this file (and a plot beside it, as .png)")
    p.add_argument("--plot", help="write the latency and passes/s plot to this PNG (default: beside --json)")
    p.add_argument("--compare", action="store_true",
                   help="also time installed peers (pytorch-grad-cam ScoreCAM/FEM, Captum Occlusion) on the torch model")
    p.add_argument("--peer-batch-size", type=int, default=32, help="peers' batch size (default 32)")
    p.add_argument("--peer-repeat", type=int, default=1,
                   help="timed runs per peer, after one warm-up batch (default 1: grad-cam ScoreCAM takes ~1 min "
                        "on 2 cores)")
    _engine_arguments(p)
    p.set_defaults(func=cmd_bench)


def _engine_arguments(p) -> None:
    add_engine_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
