"""The torch engine's ONNX → torch path: explainrt's interpreter vs the onnx2torch converter.

For each model (exported with ``export_torch``, random weights): op coverage (ONNX ops the
interpreter lacks; whether onnx2torch converts the graph), parity with ONNX Runtime (max abs
error of logits and activation, relative to the output's max magnitude), and CPU time of one
batch (median of ``--repeat`` runs, ORT, the interpreter and onnx2torch measured side by side
in this process). Prints a table and writes benchmarks/out/torch_engine_backends.json.

Models: ``--models tiny`` (default) are the tests' small ViT (class token, registers), Swin-like
NHWC model and residual CNN; ``--models torchvision`` the torchvision classifiers named in
``TORCHVISION`` (needs torchvision, e.g. the README's bench venv). onnx2torch is optional: when
it does not import, its columns say why.

    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/torch_engine_backends.py --models torchvision
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from explainrt.errors import ExplainRTError  # noqa: E402
from explainrt.export import export_torch  # noqa: E402
from explainrt.metrics.base import format_rows  # noqa: E402
from explainrt.metrics.bench import describe_machine, format_machine  # noqa: E402
from explainrt.runtime.onnx_torch import TorchGraph, supported_ops  # noqa: E402

TORCHVISION = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "vit_b_16",
               "swin_t", "maxvit_t"]


def tiny_models():
    from tests.transformer_models import ResidualCNN, TinySwin, TinyViT

    return {"tiny-vit": (TinyViT(), 32), "tiny-vit-registers": (TinyViT(registers=4), 32),
            "tiny-swin-nhwc": (TinySwin(), 32), "residual-cnn": (ResidualCNN(), 32)}


def torchvision_models(names):
    import torchvision

    out = {}
    for name in names:
        size = 224
        out[name] = (getattr(torchvision.models, name)(weights=None), size)
    return out


def _median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _relative_error(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(float(np.abs(want).max()), 1e-12))


def fold_initializer_identities(model):
    """A copy of ``model`` where Identity nodes that alias an initializer are replaced by a copy of it.

    torch.onnx dedupes equal weights (common with random init) and reads the duplicates through
    Identity nodes; onnx2torch 1.5.15 looks weights up among initializers only and fails on them.
    """
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            alias = onnx.TensorProto()
            alias.CopyFrom(inits[node.input[0]])
            alias.name = node.output[0]
            model.graph.initializer.append(alias)
            inits[alias.name] = alias
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _onnx2torch():
    try:
        import onnx2torch

        return onnx2torch, None
    except Exception as exc:  # not installed, or its torchvision import fails
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def bench_model(name, model, size, batch, repeat, tmp, torch, ort, onnx, ort_options):
    path = os.path.join(tmp, f"{name}.onnx")
    row = {"model": name}
    t0 = time.perf_counter()
    try:
        meta = export_torch(model.eval(), path, input_size=(size, size))
    except ExplainRTError as exc:
        row["export"] = f"failed: {exc}"
        return row
    row.update(export_s=round(time.perf_counter() - t0, 2), tensor=meta.activation_layer,
               layout=meta.activation_layout, activation_shape=list(meta.activation_shape))
    graph = onnx.load(path)
    outputs = [meta.logits_output, meta.activation_output]
    row["onnx_ops"] = sorted({n.op_type for n in graph.graph.node})
    row["interpreter_missing_ops"] = sorted(set(row["onnx_ops"]) - set(supported_ops()))
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    sess = ort.InferenceSession(path, ort_options, providers=["CPUExecutionProvider"])
    want = dict(zip(outputs, sess.run(outputs, {meta.input_name: x})))
    row["ort_s"] = _median_seconds(lambda: sess.run(outputs, {meta.input_name: x}), repeat)
    xt = torch.from_numpy(x)
    # the interpreter
    if row["interpreter_missing_ops"]:
        row["interpreter"] = "missing ops"
    else:
        interp = TorchGraph(graph)
        with torch.no_grad():
            got = interp.run({meta.input_name: xt}, outputs)
            row["interpreter_logits_err"] = _relative_error(got[outputs[0]].numpy(), want[outputs[0]])
            row["interpreter_activation_err"] = _relative_error(got[outputs[1]].numpy(), want[outputs[1]])
            row["interpreter_s"] = _median_seconds(lambda: interp.run({meta.input_name: xt}, outputs), repeat)
        row["interpreter"] = "ok"
    # onnx2torch
    converter, why = _onnx2torch()
    if converter is None:
        row["onnx2torch"] = f"unavailable ({why})"
        return row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = converter.convert(graph).eval()
                row["onnx2torch_needs_identity_folding"] = False
            except KeyError:  # a weight read through an Identity node: retry on the folded graph
                module = converter.convert(fold_initializer_identities(graph)).eval()
                row["onnx2torch_needs_identity_folding"] = True
        names = [o.name for o in graph.graph.output]
        with torch.no_grad():
            result = module(xt)
            result = dict(zip(names, result if isinstance(result, (tuple, list)) else [result]))
            row["onnx2torch_logits_err"] = _relative_error(result[outputs[0]].numpy(), want[outputs[0]])
            row["onnx2torch_activation_err"] = _relative_error(result[outputs[1]].numpy(), want[outputs[1]])
            row["onnx2torch_s"] = _median_seconds(lambda: module(xt), repeat)
        row["onnx2torch"] = "ok"
    except Exception as exc:
        row["onnx2torch"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    return row


def _cell(row, key, fmt):
    return fmt(row[key]) if key in row else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny", help="'tiny', 'torchvision', or comma-separated torchvision names")
    parser.add_argument("--batch", type=int, default=8, help="images per timed batch (default 8)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per backend (default 5)")
    # 1 thread by default: on a shared 2-core machine torch's second OpenMP thread waits for a core
    # and makes tiny ops 100x slower (measured: 6 ms vs 1 s for the tiny Swin), which times the load, not the code
    parser.add_argument("--threads", type=int, default=1, help="ORT and torch CPU threads (default 1)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out", "torch_engine_backends.json"))
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    ort.set_default_logger_severity(3)
    ort_options = ort.SessionOptions()
    ort_options.intra_op_num_threads = args.threads
    if args.models == "tiny":
        models = tiny_models()
    else:
        models = torchvision_models(TORCHVISION if args.models == "torchvision" else args.models.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, size) in models.items():
            row = bench_model(name, model, size, args.batch, args.repeat, tmp, torch, ort, onnx, ort_options)
            rows.append(row)
            print(f"{name}: {row.get('interpreter', row.get('export'))} / onnx2torch {row.get('onnx2torch')}",
                  file=sys.stderr)
    converter, why = _onnx2torch()
    code = {"interpreter_lines": sum(1 for _ in open(os.path.join(REPO, "explainrt", "runtime", "onnx_torch.py")))}
    if converter is not None:
        root = os.path.dirname(converter.__file__)
        code["onnx2torch_lines"] = sum(sum(1 for _ in open(os.path.join(d, f))) for d, _, fs in os.walk(root)
                                       for f in fs if f.endswith(".py"))
        code["onnx2torch_version"] = getattr(converter, "__version__", "?")
    machine = describe_machine()
    header = ["model", "tensor (layout)", "interp. missing ops", "interp. err logits/act", "onnx2torch",
              "o2t err logits/act", f"ORT ms (b{args.batch})", "interp. ms", "o2t ms"]
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
    table = [[r["model"], f"{r.get('tensor')} ({r.get('layout')})", ",".join(r.get("interpreter_missing_ops", [])) or "-",
              f"{_cell(r, 'interpreter_logits_err', '{:.1e}'.format)}/{_cell(r, 'interpreter_activation_err', '{:.1e}'.format)}",
              r.get("onnx2torch", "-")[:40] + (" (folded)" if r.get("onnx2torch_needs_identity_folding") else ""),
              f"{_cell(r, 'onnx2torch_logits_err', '{:.1e}'.format)}/{_cell(r, 'onnx2torch_activation_err', '{:.1e}'.format)}",
              _cell(r, "ort_s", ms), _cell(r, "interpreter_s", ms), _cell(r, "onnx2torch_s", ms)] for r in rows]
    print(format_machine(machine))
    print(f"torch {torch.__version__}, {args.threads} threads; code: {code}")
    print(format_rows(header, table))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "torch": torch.__version__, "threads": args.threads, "batch": args.batch,
                   "code": code, "onnx2torch_unavailable": why, "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
