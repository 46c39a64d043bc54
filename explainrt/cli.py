"""Command line: `explainrt export | explain | demo | …` (`explainrt -h`)."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import math
import os
import sys
import time
from typing import Optional

from .errors import ExplainRTError, InvalidInputError
from .outputs import expand_image_dirs

log = logging.getLogger(__name__)

# Modules that add their own subcommands with `register(subparsers)`; heavy imports stay lazy.
COMMAND_MODULES: list[str] = ["explainrt.runtime.cli", "explainrt.server.cli", "explainrt.metrics.cli"]

#: scikit-image photographs EfficientNet-Lite0 classifies right: Egyptian cat 0.78, espresso 0.91, moped 0.50,
#: tripod 0.95 (astronaut and rocket, shown before, came out "bobsled" and "drilling platform")
DEMO_IMAGES = ("chelsea", "coffee", "motorcycle_left", "camera")
DEMO_RISE_MASKS = 500  # the demo's RISE: an eighth of the default 4000 masks, stated when it runs
DEFAULT_METHOD = "sidu"  # `explain` without --method: quick (a few hundred passes), the project's first method


def _bounded(kind: type, low: float, high: Optional[float] = None, above: bool = False, bounds: str = ""):
    """An argparse type: ``kind(text)``, finite, >= ``low`` (> when ``above``), <= ``high``."""
    expected = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if above else value >= low) and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"{bounds}, got {text}")
        return value

    return parse


positive_int = _bounded(int, 1, bounds="must be at least 1")
non_negative_int = _bounded(int, 0, bounds="must be 0 or more")
at_least_one = _bounded(float, 1, bounds="must be at least 1")
positive_float = _bounded(float, 0, above=True, bounds="must be a positive number")
port_number = _bounded(int, 0, 65535, bounds="a port is 0..65535 (0 picks a free one)")


MAX_PARAM_CHARS = 10_000  # a parameter value: far above any real one (base_params included)
MAX_PARAM_DEPTH = 32  # nesting of a JSON value (base_params is one level)


def _json_depth(text: str) -> int:
    """How deeply ``[``/``{`` nest in ``text`` outside JSON strings (a cheap scan before decoding)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_param_value(key: str, value: str):
    """One `-p` value: a JSON literal when it parses as one, else the string; InvalidInputError when it is
    too long, nested too deeply or holds a number too long to convert (never a ValueError/RecursionError)."""
    if len(value) > MAX_PARAM_CHARS:
        raise InvalidInputError(f"parameter {key}: the value is {len(value)} characters long, over the limit of "
                                f"{MAX_PARAM_CHARS}; no parameter needs that much")
    if ("[" in value or "{" in value) and _json_depth(value) > MAX_PARAM_DEPTH:
        raise InvalidInputError(f"parameter {key}: the value nests lists/objects more than {MAX_PARAM_DEPTH} deep; "
                                "parameters are numbers, strings, booleans or one flat mapping (base_params)")
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
    except (ValueError, RecursionError) as exc:  # a number of thousands of digits: Python refuses to convert it
        raise InvalidInputError(f"parameter {key}: {value[:20]}... is not a usable value ({exc.__class__.__name__}: "
                                f"{str(exc).split(';')[0]}); give a number of ordinary size") from None


def parse_params(items) -> dict:
    """`-p key=value` pairs; values are JSON literals when they parse (numbers, true/false), else strings.

    Raises InvalidInputError for an item without ``=``, and for values too long, too deeply nested or
    with numbers too long to convert.
    """
    params = {}
    for item in items or []:
        if "=" not in item:
            raise InvalidInputError(f"parameter {item!r} must look like name=value (e.g. -p n_masks=2000)")
        key, value = item.split("=", 1)
        params[key.strip()] = parse_param_value(key.strip(), value)
    return params


class ProgressBar:
    """A tqdm bar over masked passes, re-created per (image, method)."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total == 0:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="pass", leave=False, file=sys.stderr,
                             disable=None)  # None: off when stderr is not a terminal
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_export(args) -> int:
    from .export import expose_activation, export_zoo_model, load_labels
    from .export.batch_rewrite import describe_batch

    from .outputs import prepare_output_file

    if bool(args.model) == bool(args.onnx):
        raise InvalidInputError("give either a built-in model name (e.g. efficientnet-lite0) or --onnx IN.onnx")
    prepare_output_file(args.output)
    if args.model:
        meta = export_zoo_model(args.model, args.output)
    else:
        kwargs = {}
        if args.mean:
            kwargs["mean"] = args.mean
        if args.std:
            kwargs["std"] = args.std
        meta = expose_activation(args.onnx, args.output, activation=args.activation, input_size=args.input_size,
                                 labels=load_labels(args.labels) if args.labels else None, grid=args.grid,
                                 prefix_tokens=args.prefix_tokens, with_activation=not args.no_activation,
                                 rewrite_batch=not args.keep_fixed_batch, **kwargs)
    if meta.has_activation:
        view = "" if meta.activation_layout == "NCHW" else \
            f" from {meta.activation_layout} {'x'.join(map(str, meta.explained_shape))}" + \
            (f", dropped tokens {meta.dropped_tokens}" if meta.dropped_tokens else "")
        activation = (f"activation {meta.activation_output} {'x'.join(map(str, meta.activation_shape))} "
                      f"({meta.activation_layer}{view})")
    else:
        activation = "no activation (black-box: rise and the metrics)"
    print(f"wrote {args.output}: input {meta.input_name} {meta.channels}x{meta.input_size[0]}x{meta.input_size[1]}, "
          f"{activation}, {meta.num_classes} classes; {describe_batch(meta)}")
    return 0


def warn(message: str) -> None:
    """A one-line warning on stderr: the command goes on."""
    print(f"explainrt: warning: {message}", file=sys.stderr)


def resolve_targets(values: Optional[list[str]], labels: Optional[list[str]],
                    num_classes: Optional[int] = None) -> Optional[list[int]]:
    """Class indices for the `--target` values (repeatable; each a class index, a label name in any
    case, or a comma list of these); duplicates dropped. None when none was given (the top-1 class)."""
    if not values:
        return None
    by_name: dict[str, list[int]] = {}
    for i, name in enumerate(labels or []):
        by_name.setdefault(name.strip().lower(), []).append(i)
    specs = []
    for value in values:  # a label may itself hold a comma: the whole value is tried as one first
        specs.extend([value] if value.strip().lower() in by_name else value.split(","))
    out = []
    for spec in (s.strip() for s in specs):
        if spec.lstrip("-").isdigit():
            index = int(spec)
            if index < 0:
                raise InvalidInputError(f"--target must be a class index >= 0, got {index}")
            if num_classes is not None and index >= num_classes:
                raise InvalidInputError(f"--target {index} is out of range: the model has {num_classes} classes "
                                        f"(0..{num_classes - 1})")
        else:
            found = by_name.get(spec.lower())
            if not found:
                known = "the model has no labels" if not labels else f"labels are e.g. {labels[0]!r}"
                raise InvalidInputError(f"--target {spec!r} is neither a class index nor a label of the model "
                                        f"({known})")
            if len(found) > 1:
                raise InvalidInputError(f"--target {spec!r} names classes {', '.join(map(str, found))}; "
                                        "give the index")
            index = found[0]
        if index not in out:
            out.append(index)
    return out


@dataclasses.dataclass
class RunRecord:
    """What `explain`/`demo` did, for the summary and index.html."""

    items: list = dataclasses.field(default_factory=list)  # report.ReportItem
    originals: dict = dataclasses.field(default_factory=dict)  # image name -> RGB
    seconds_by_method: dict = dataclasses.field(default_factory=dict)
    failures: int = 0


def write_explanation(args, path: str, stem: str, method: str, targets, labels, probs, maps, image, visualization,
                      forward_passes: int, seconds: float, top, run: RunRecord, replica: str = "") -> None:
    """Write and print one explanation (every class of it): files, a line or JSON object per class.
    ``replica``: the server replica that answered (`client` over several), added to each line."""
    from .outputs import dumps, result_line, result_record, write_targets
    from .report import ReportItem

    written = write_targets(args.output, stem, method, targets, labels, probs, maps, image, visualization,
                            forward_passes, args.plain)
    for target, label, prob, saliency, files in zip(targets, labels, probs, maps, written):
        run.items.append(ReportItem(stem, method, target, label, float(prob), forward_passes, seconds, files))
        if args.json:
            record = result_record(path, method, target, label, float(prob), forward_passes, seconds, files, top)
            print(dumps({**record, "replica": replica} if replica else record))
        else:
            line = result_line(stem, method, target, label, float(prob), forward_passes, seconds, files, saliency)
            print(f"{line} [{replica}]" if replica else line)


def method_applies(method: str, params: dict, meta) -> bool:
    """Whether ``method`` (with ``params``) can explain a model with ``meta`` (a black box cannot give activations)."""
    from .explainers import METHODS, check_applicable

    try:
        check_applicable(method, METHODS[method].create(**params), meta)
    except InvalidInputError:
        return False
    return True


def methods_for_model(spec: str, methods: list[str], model: Optional[str], applies) -> list[str]:
    """`--method all` on a model that cannot run some of them (a black box): those are skipped with a
    note on stderr (named ones are not: their error says why). ``applies(method) -> bool``."""
    if "all" not in spec.split(","):
        return methods
    kept = [m for m in methods if applies(m)]
    if len(kept) < len(methods):
        skipped = [m for m in methods if m not in kept]
        print(f"explainrt: {model or 'the model'} cannot run {', '.join(skipped)} (a black-box model has no "
              f"activation): skipping them; running {', '.join(kept) or 'nothing'}", file=sys.stderr)
    return kept


def _explain_images(args, images: list[str], params: Optional[dict] = None) -> RunRecord:
    """Explain every image with every method of `--method`, writing files and index.html."""
    from . import Explainer
    from .outputs import output_stems, parse_methods, prepare_output_dir

    methods = parse_methods(args.method)
    if params is None:
        params = parse_params(args.param)
    params = params_by_method(params, methods)  # bad parameters fail before any image is read
    images = expand_image_dirs(images)
    stems = output_stems(images)
    prepare_output_dir(args.output)
    explainer = Explainer(args.model, batch_size=args.batch_size, backend=args.backend, device=args.device,
                          **({"threads": args.threads} if args.threads else {}))
    meta = explainer.metadata
    methods = methods_for_model(args.method, methods, meta.name, lambda m: method_applies(m, params[m], meta))
    targets = resolve_targets(args.target, meta.labels, meta.num_classes)
    show_bar = not args.no_progress
    run = RunRecord()
    for path, stem in zip(images, stems):
        for method in methods:
            bar = ProgressBar(f"{stem} {method}", show_bar)
            t0 = time.perf_counter()
            try:
                result = explainer.explain(path, method, target=targets, progress=bar, **params[method])
            except InvalidInputError as exc:
                bar.close()
                if len(images) == 1:
                    raise
                message = " ".join(str(exc).split())
                print(f"explainrt: error: {'' if path in message else path + ': '}{message}", file=sys.stderr)
                run.failures += 1
                break
            finally:
                bar.close()
            seconds = time.perf_counter() - t0
            run.seconds_by_method[method] = run.seconds_by_method.get(method, 0.0) + seconds
            if result.image is not None:
                run.originals.setdefault(stem, result.image)
            write_explanation(args, path, stem, method, result.targets, result.labels,
                              [result.probs[t] for t in result.targets], result.saliency_maps, result.image,
                              result.visualization, result.forward_passes, seconds,
                              [[c, round(p, 6)] for c, p in result.top_k(5)], run)
    return run


def write_run_index(args, run: RunRecord, title: str, notes: list[str]) -> Optional[str]:
    """index.html for a run that explained something; its path (printed unless --json)."""
    from .report import write_index

    if not run.items:
        return None
    path = write_index(args.output, title, run.items, run.originals, notes)
    if not args.json:
        print(f"browse {path}")
    return path


def params_by_method(params: dict, methods: list[str]) -> dict[str, dict]:
    """Each method's `-p` parameters, every value checked by the method before any work starts.

    A parameter that none of ``methods`` takes (``-p sidu.threshold=0.2`` with `--method fem`)
    is warned about on stderr: it would have no effect.
    """
    from .explainers import METHODS

    picked = {}
    for method in methods:
        picked[method] = method_params(params, method)
        try:
            METHODS[method].create(**picked[method])
        except InvalidInputError as exc:
            raise InvalidInputError(f"{method}: {exc}") from None
    for key, value in params.items():
        if not any(method_params({key: value}, m) for m in methods):
            scope = key.rpartition(".")[0]
            warn(f"-p {key} is ignored: " + (f"{scope} is not among the methods run ({', '.join(methods)})" if scope
                                             else f"none of the methods run ({', '.join(methods)}) takes it"))
    return picked


def method_params(params: dict, method: str) -> dict:
    """The `-p` parameters that ``method`` takes, so `--method all -p n_masks=…` works.

    ``method.name=value`` applies to one method only (e.g. `-p featurecam.k=0.5 -p fem.k=2`,
    since Feature CAM's blend weight and FEM's k-sigma share the paper's name ``k``).
    """
    from .explainers import METHODS

    known_anywhere = {name for cls in METHODS.values() for name in cls.parameters()}
    picked = {}
    for key, value in params.items():
        scope, _, name = key.rpartition(".")
        if scope and scope not in METHODS:
            raise InvalidInputError(f"parameter {key!r}: unknown method {scope!r}; choose from {', '.join(METHODS)}")
        if name not in (METHODS[scope].parameters() if scope else known_anywhere):
            raise InvalidInputError(f"unknown parameter {key!r}; see `explainrt methods`")
        if scope == method or (not scope and name in METHODS[method].parameters()):
            picked[name] = value
    return picked


def cmd_explain(args) -> int:
    if args.ray is not None:  # explainrt.distributed: the same explanations on Ray Data
        from .distributed.cli import cmd_explain_ray

        return cmd_explain_ray(args)
    run = _explain_images(args, args.images)
    write_run_index(args, run, f"explainrt explain: {os.path.basename(args.model)}",
                    [f"method {args.method}, backend {args.backend} on {args.device}, batch size {args.batch_size}"])
    return 1 if run.failures else 0


def cmd_methods(args) -> int:
    from .explainers import METHODS

    for name, cls in METHODS.items():
        params = ", ".join(f"{k}={v!r}" for k, v in cls.parameters().items())
        print(f"{name:<11} {params}")
    return 0


def _seconds(t0: float) -> float:
    return time.perf_counter() - t0


def cmd_demo(args) -> int:
    """Export EfficientNet-Lite0 (once), write scikit-image photographs, explain them with every method;
    say how long each step took, and write index.html."""
    from .imaging import write_png

    from .metrics.bench import sample_image
    from .outputs import parse_methods, prepare_output_dir

    t_start = time.perf_counter()
    prepare_output_dir(args.output)
    steps = []
    if not os.path.isfile(args.model):
        print(f"exporting efficientnet-lite0 to {args.model} …", file=sys.stderr)
        from .export import export_zoo_model

        t0 = time.perf_counter()
        export_zoo_model("efficientnet-lite0", args.model)
        steps.append(f"export {_seconds(t0):.1f} s")
    t0 = time.perf_counter()
    image_dir = os.path.join(args.output, "images")
    os.makedirs(image_dir, exist_ok=True)
    images = []
    for name in args.images:
        path = os.path.join(image_dir, f"{name}.png")
        write_png(path, sample_image(name))
        images.append(path)
    steps.append(f"photos {_seconds(t0):.1f} s")
    params, notes = parse_params(args.param), []
    if "rise" in parse_methods(args.method) and not {"n_masks", "rise.n_masks"} & set(params):
        params["rise.n_masks"] = DEMO_RISE_MASKS
        notes.append(f"RISE runs {DEMO_RISE_MASKS} masks in the demo (its default is 4000, which takes most of the "
                     "time on a CPU); -p rise.n_masks=4000 for the full method")
        print(f"demo: {notes[-1]}", file=sys.stderr)
    t0 = time.perf_counter()
    run = _explain_images(args, images, params)
    per_method = ", ".join(f"{m} {s:.1f} s" for m, s in run.seconds_by_method.items())
    steps.append(f"{len(run.items)} explanations {_seconds(t0):.1f} s ({per_method})")
    notes.append(f"model {args.model}; backend {args.backend} on {args.device}, batch size {args.batch_size}")
    write_run_index(args, run, "explainrt demo: EfficientNet-Lite0 on scikit-image photographs", notes)
    summary = f"demo: done in {_seconds(t_start):.1f} s: " + ", ".join(steps)
    print(summary, file=sys.stderr if args.json else sys.stdout)
    return 1 if run.failures else 0


def add_request_options(p, default_method: str = DEFAULT_METHOD) -> None:
    """What to explain and where the files go: shared by `explain`, `demo` and `client`."""
    quick = " (SIDU: a few hundred forward passes; RISE alone takes 4000)" if default_method == "sidu" else ""
    p.add_argument("--method", default=default_method,
                   help="sidu|scorecam|rise|fem|featurecam|gradcam|gradcam++|xgradcam|layercam|fgvis|all "
                        f"(all: the five forward-only methods), or a comma list (default: {default_method}{quick})")
    p.add_argument("-o", "--output", default="out", help="output directory (default: out)")
    p.add_argument("--target", action="append", metavar="CLASS",
                   help="class to explain: an index, a label name (e.g. 'Egyptian cat') or a comma list; "
                        "repeatable for several classes (default: the top-1 class)")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                   help="method parameter, repeatable: NAME=VALUE for every method that takes NAME, "
                        "METHOD.NAME=VALUE for one (e.g. -p n_masks=2000 -p sidu.threshold=0.1); values are JSON "
                        "literals or strings; see `explainrt methods`")
    p.add_argument("--plain", action="store_true",
                   help="bare overlay PNGs: no caption (method, class, probability) and no colour bar")
    p.add_argument("--json", action="store_true", help="print one JSON object per result")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_engine_options(p) -> None:
    """Which engine runs the model: shared by `explain`, `demo`, `eval` and `bench`."""
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch", "tensorrt"),
                   help="engine that runs the model: ONNX Runtime (default), torch (onnx2torch), or a TensorRT plan")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where it runs (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="intra-op threads (default: the engine's own)")


def _add_explain_options(p, default_method: str = DEFAULT_METHOD) -> None:
    add_request_options(p, default_method)
    p.add_argument("--batch-size", type=positive_int, default=64, help="masked images per engine call (default 64)")
    add_engine_options(p)


EPILOG = """\
a first run:
  explainrt demo                                  photographs explained with every method -> out/demo/index.html
  explainrt export --onnx net.onnx --labels labels.txt -o models/net.onnx
  explainrt explain --model models/net.onnx cat.jpg --method sidu,fem -o out
  explainrt methods                               every method's parameters (-p NAME=VALUE, -p METHOD.NAME=VALUE)
`explainrt COMMAND -h` describes a command; README.md walks through each.
"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .distributed.cli import add_ray_options

    parser = argparse.ArgumentParser(
        prog="explainrt", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Visual explanations (SIDU, Score-CAM, RISE, FEM, Feature CAM) of image classifiers exported\n"
                    "to ONNX, run as batched forward passes through ONNX Runtime, torch or TensorRT; also a gRPC\n"
                    "server (serve/client), faithfulness metrics (eval) and benchmarks (bench).")
    parser.add_argument("--version", action="version", version=f"explainrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a model to ONNX with activation outputs and metadata")
    p.add_argument("model", nargs="?", help="built-in model name: efficientnet-lite0")
    p.add_argument("--onnx", help="an existing ONNX classifier to expose an activation of")
    p.add_argument("--activation", help="tensor name to expose (default: the last feature map before global "
                   "pooling, or a transformer's last patch tokens)")
    p.add_argument("--grid", type=int, nargs=2, metavar=("h", "w"),
                   help="patch grid of a token tensor named with --activation (default: detected)")
    p.add_argument("--prefix-tokens", type=int, metavar="K",
                   help="leading class/register tokens to drop from a token tensor (default: detected)")
    p.add_argument("--no-activation", action="store_true",
                   help="a black-box model: expose no activation (RISE and the metrics only)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="input size when the ONNX one is dynamic")
    p.add_argument("--mean", type=float, nargs=3, help="RGB mean, 0-255 scale (default ImageNet)")
    p.add_argument("--std", type=float, nargs=3, help="RGB std, 0-255 scale (default ImageNet)")
    p.add_argument("--labels", help="text file with one class label per line")
    p.add_argument("--keep-fixed-batch", action="store_true",
                   help="with --onnx: do not rewrite a fixed batch axis; run the model at its fixed batch")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("explain", help="explain images with one or more methods")
    p.add_argument("images", nargs="+", help="image files, or directories of them")
    p.add_argument("--model", required=True, help="exported .onnx model")
    _add_explain_options(p)
    add_ray_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="explain scikit-image photographs with the built-in EfficientNet-Lite0")
    p.add_argument("--model", default=os.path.join("models", "lite0.onnx"), help="where the demo model is (exported if missing)")
    p.add_argument("--images", nargs="+", default=list(DEMO_IMAGES), metavar="NAME",
                   help=f"scikit-image photographs (default: {' '.join(DEMO_IMAGES)}; also e.g. astronaut and "
                        "rocket, which it gets wrong, or any other scikit-image data name)")
    _add_explain_options(p, default_method="all")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list methods and their parameters")
    p.set_defaults(func=cmd_methods)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    import warnings

    from .api import ConstantMapWarning

    warnings.simplefilter("ignore", ConstantMapWarning)  # each result line says so itself
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ExplainRTError as exc:
        print(f"explainrt: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("explainrt: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("explainrt: error: out of memory; ask for less work at once (fewer masks, a smaller --batch-size)",
              file=sys.stderr)
        return 1
    except OSError as exc:  # a file or port the command needs: the OS's reason is the message
        print(f"explainrt: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
