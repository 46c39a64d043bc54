"""Command line: `explainrt export | explain | demo | …` (`explainrt -h`)."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
import time
from typing import Optional

from .errors import ExplainRTError, InvalidInputError

log = logging.getLogger(__name__)

# Modules that add their own subcommands with `register(subparsers)`; heavy imports stay lazy.
COMMAND_MODULES: list[str] = ["explainrt.runtime.cli", "explainrt.server.cli", "explainrt.metrics.cli"]

DEMO_IMAGES = ("chelsea", "coffee", "astronaut", "rocket")


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
                                 prefix_tokens=args.prefix_tokens, with_activation=not args.no_activation, **kwargs)
    if meta.has_activation:
        view = "" if meta.activation_layout == "NCHW" else \
            f" from {meta.activation_layout} {'x'.join(map(str, meta.explained_shape))}" + \
            (f", dropped tokens {meta.dropped_tokens}" if meta.dropped_tokens else "")
        activation = (f"activation {meta.activation_output} {'x'.join(map(str, meta.activation_shape))} "
                      f"({meta.activation_layer}{view})")
    else:
        activation = "no activation (black-box: rise and the metrics)"
    print(f"wrote {args.output}: input {meta.input_name} {meta.channels}x{meta.input_size[0]}x{meta.input_size[1]}, "
          f"{activation}, {meta.num_classes} classes")
    return 0


def _explain_images(args, images: list[str]) -> int:
    from . import Explainer
    from .outputs import (dumps, output_stems, parse_methods, prepare_output_dir, result_line, result_record,
                          write_result_files)

    methods = parse_methods(args.method)
    params = params_by_method(parse_params(args.param), methods)  # bad parameters fail before any image is read
    stems = output_stems(images)
    prepare_output_dir(args.output)
    explainer = Explainer(args.model, batch_size=args.batch_size, backend=args.backend, device=args.device,
                          **({"threads": args.threads} if args.threads else {}))
    show_bar = not args.no_progress
    failures = 0
    for path, stem in zip(images, stems):
        for method in methods:
            bar = ProgressBar(f"{stem} {method}", show_bar)
            t0 = time.perf_counter()
            try:
                result = explainer.explain(path, method, target=args.target, progress=bar, **params[method])
            except InvalidInputError as exc:
                bar.close()
                if len(images) == 1:
                    raise
                message = " ".join(str(exc).split())
                print(f"explainrt: error: {'' if path in message else path + ': '}{message}", file=sys.stderr)
                failures += 1
                break
            finally:
                bar.close()
            seconds = time.perf_counter() - t0
            files = write_result_files(args.output, stem, method, result.saliency, result.image, result.visualization)
            prob = float(result.probs[result.target])
            if args.json:
                print(dumps(result_record(path, method, result.target, result.label, prob, result.forward_passes,
                                          seconds, files, [[c, round(p, 6)] for c, p in result.top_k(5)])))
            else:
                print(result_line(stem, method, result.target, result.label, prob, result.forward_passes, seconds,
                                  files, result.saliency))
    return 1 if failures else 0


def params_by_method(params: dict, methods: list[str]) -> dict[str, dict]:
    """Each method's `-p` parameters, every value checked by the method before any work starts."""
    from .explainers import METHODS

    picked = {}
    for method in methods:
        picked[method] = method_params(params, method)
        try:
            METHODS[method].create(**picked[method])
        except InvalidInputError as exc:
            raise InvalidInputError(f"{method}: {exc}") from None
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
    if args.target is not None and args.target < 0:
        raise InvalidInputError(f"--target must be a class index >= 0, got {args.target}")
    return _explain_images(args, args.images)


def cmd_methods(args) -> int:
    from .explainers import METHODS

    for name, cls in METHODS.items():
        params = ", ".join(f"{k}={v!r}" for k, v in cls.parameters().items())
        print(f"{name:<11} {params}")
    return 0


def cmd_demo(args) -> int:
    """Export EfficientNet-Lite0 (once), write scikit-image photographs, explain them with every method."""
    from .imaging import write_png

    from .metrics.bench import sample_image
    from .outputs import prepare_output_dir

    prepare_output_dir(args.output)
    model = args.model
    if not os.path.isfile(model):
        print(f"exporting efficientnet-lite0 to {model} …", file=sys.stderr)
        from .export import export_zoo_model

        export_zoo_model("efficientnet-lite0", model)
    image_dir = os.path.join(args.output, "images")
    os.makedirs(image_dir, exist_ok=True)
    images = []
    for name in args.images:
        path = os.path.join(image_dir, f"{name}.png")
        write_png(path, sample_image(name))
        images.append(path)
    args.model = model
    return _explain_images(args, images)


def add_request_options(p) -> None:
    """What to explain and where the files go: shared by `explain`, `demo` and `client`."""
    p.add_argument("--method", default="all",
                   help="sidu|scorecam|rise|fem|featurecam|gradcam|gradcam++|xgradcam|layercam|fgvis|all "
                        "(all: the five forward-only methods), or a comma list (default: all)")
    p.add_argument("-o", "--output", default="out", help="output directory (default: out)")
    p.add_argument("--target", type=int, default=None, help="class to explain (default: the top-1 class)")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                   help="method parameter, repeatable (e.g. -p n_masks=2000 -p threshold=0.1); see `explainrt methods`")
    p.add_argument("--json", action="store_true", help="print one JSON object per result")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_explain_options(p) -> None:
    add_request_options(p)
    p.add_argument("--batch-size", type=positive_int, default=64, help="masked images per engine call (default 64)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch", "tensorrt"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="explainrt", description=__doc__)
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
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("explain", help="explain images with one or more methods")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", required=True, help="exported .onnx model")
    _add_explain_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="explain scikit-image photographs with the built-in EfficientNet-Lite0")
    p.add_argument("--model", default=os.path.join("models", "lite0.onnx"), help="where the demo model is (exported if missing)")
    p.add_argument("--images", nargs="+", default=list(DEMO_IMAGES), help="scikit-image data names")
    _add_explain_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list methods and their parameters")
    p.set_defaults(func=cmd_methods)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
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
