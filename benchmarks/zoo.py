"""Export and explain torchvision classifiers (random weights; nothing downloaded).

Per model: both export routes (``export_torch``, and ``export --onnx`` on a plain
``torch.onnx.export``) and the tensor each chose with its layout; parity (relative max error):
torch logits vs ONNX Runtime, the two routes' activations vs each other, and the torch engine
(explainrt's interpreter) vs ONNX Runtime; which methods ran and gave finite maps (FEM and a
small RISE by default; SIDU and Score-CAM, C masked passes each, with ``--all-methods``); seconds.
Prints a table and writes benchmarks/out/zoo.json.

Needs torchvision beside explainrt (the README's bench venv):
    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/zoo.py [--models resnet18,vit_b_16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from explainrt import Explainer  # noqa: E402
from explainrt.export import expose_activation, export_torch  # noqa: E402
from explainrt.metrics.base import format_rows  # noqa: E402
from explainrt.metrics.bench import describe_machine, format_machine  # noqa: E402
from explainrt.runtime.ort_engine import OnnxRuntimeEngine  # noqa: E402
from explainrt.runtime.torch_engine import TorchEngine  # noqa: E402

# The 20 architectures of issue 10; --models all takes every torchvision classifier.
MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_large",
          "densenet121", "vgg11", "efficientnet_b0", "efficientnet_v2_s", "convnext_tiny", "regnet_y_400mf",
          "squeezenet1_0", "shufflenet_v2_x1_0", "googlenet", "inception_v3", "mnasnet0_5", "vit_b_16", "swin_t",
          "maxvit_t"]
TOLERANCE = 1e-3


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))


def input_size(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def check_model(name, tmp, methods, torch, torchvision) -> dict:
    size = input_size(name)
    row = {"model": name, "input": size}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    torch_path, onnx_path, plain = (os.path.join(tmp, f"{name}.{k}.onnx") for k in ("torch", "onnx", "plain"))
    try:
        meta = export_torch(model, torch_path, input_size=(size, size))
        row["export_torch"] = "ok"
    except Exception as exc:
        row["export_torch"] = f"failed: {exc}"
        return row
    row.update(tensor=meta.activation_layer, layout=meta.activation_layout, shape="x".join(map(str, meta.activation_shape)))
    ort_out = OnnxRuntimeEngine(torch_path, max_batch=2).infer(x)
    row["torch_vs_ort_logits"] = relative_error(ort_out[meta.logits_output], logits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(1, 3, size, size),), plain, input_names=["image"],
                              output_names=["scores"], dynamic_axes={"image": {0: "n"}, "scores": {0: "n"}},
                              opset_version=17, dynamo=False)
        meta2 = expose_activation(plain, onnx_path)
        onnx_act = OnnxRuntimeEngine(onnx_path, max_batch=2).infer(x)[meta2.activation_output]
        row.update(export_onnx="ok", onnx_tensor=meta2.activation_layer, onnx_layout=meta2.activation_layout,
                   routes_activation_err=relative_error(onnx_act, ort_out[meta.activation_output])
                   if onnx_act.shape == ort_out[meta.activation_output].shape else f"shape {onnx_act.shape}")
    except Exception as exc:
        row["export_onnx"] = f"failed: {type(exc).__name__}: {exc}"
    try:
        engine_out = TorchEngine(torch_path, max_batch=2, device="cpu").infer(x)
        row["torch_engine"] = "ok"
        row["torch_engine_logits_err"] = relative_error(engine_out[meta.logits_output], ort_out[meta.logits_output])
        row["torch_engine_activation_err"] = relative_error(engine_out[meta.activation_output],
                                                            ort_out[meta.activation_output])
    except Exception as exc:
        row["torch_engine"] = f"failed: {exc}"
    image = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    explainer = Explainer(torch_path, batch_size=16)
    done = []
    for method, params in methods:
        try:
            sal = explainer.explain(image, method, **params).saliency
            done.append(method if np.isfinite(sal).all() else f"{method}:nan")
        except Exception as exc:
            done.append(f"{method}:failed({type(exc).__name__})")
    row["methods"] = " ".join(done)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names, or 'all'")
    parser.add_argument("--all-methods", action="store_true", help="also SIDU and Score-CAM (C passes each)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out", "zoo.json"))
    args = parser.parse_args()

    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    names = torchvision.models.list_models(module=torchvision.models) if args.models == "all" else \
        args.models.split(",")
    methods = [("fem", {}), ("rise", {"n_masks": 32, "grid_size": 7})]
    if args.all_methods:
        methods += [("sidu", {}), ("scorecam", {})]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = check_model(name, tmp, methods, torch, torchvision)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            for f in os.listdir(tmp):
                os.remove(os.path.join(tmp, f))

    def err(v):
        return v if isinstance(v, str) else ("ok " if v <= TOLERANCE else "BAD ") + f"{v:.0e}"

    header = ["model", "export torch / onnx", "tensor (layout, CxHxW)", "onnx route tensor", "torch≈ORT",
              "routes≈", "torch engine", "methods", "s"]
    table = [[r["model"], f"{r.get('export_torch', '-')[:6]} / {r.get('export_onnx', '-')[:6]}",
              f"{r.get('tensor')} ({r.get('layout')}, {r.get('shape')})", f"{r.get('onnx_tensor', '-')}"[-42:],
              err(r["torch_vs_ort_logits"]) if "torch_vs_ort_logits" in r else "-",
              err(r["routes_activation_err"]) if "routes_activation_err" in r else "-",
              (f"{err(r['torch_engine_logits_err'])}/{err(r['torch_engine_activation_err'])}"
               if r.get("torch_engine") == "ok" else r.get("torch_engine", "-")[:30]),
              r.get("methods", "-"), r.get("seconds", "-")] for r in rows]
    machine = describe_machine()
    print(format_machine(machine))
    print(format_rows(header, table))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "tolerance": TOLERANCE, "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
