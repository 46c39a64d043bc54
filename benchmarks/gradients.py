"""Gradients of the deployed model: the torch engine vs the nn.Module, on EfficientNet-Lite0 + chelsea.

Three comparisons, each measured side by side in one process (runs interleaved, medians):

1. backward: the gradient of one class's logit at the input (weights frozen on both sides)
   through the torch engine's ONNX interpreter (``runtime.autograd``) vs the same through the
   nn.Module (forward + backward, batch 1 and 8); the ratio is the issue's bound (≤ 1.5×);
2. FGVis: iterations/s of ``Explainer.explain(method="fgvis")`` (deletion game, defence on and
   off) vs a plain torch autograd loop over the nn.Module (same mask, loss and Adam, no defence;
   the public unofficial FGVis is not on PyPI);
3. Grad-CAM: explainrt forward-only (the CAM head, ONNX Runtime), explainrt through the torch
   engine's autograd, and a plain autograd Grad-CAM on the nn.Module (hook on the explained
   layer, one backward per target, weights requiring grad as in pytorch-grad-cam); Pearson r
   of the maps;
4. where pytorch-grad-cam is installed (the README's bench environment): its GradCAM and
   GradCAMPlusPlus against explainrt's gradcam / gradcam++ on the same weights and layer, for
   the demo model and (with torchvision) a ResNet-18 (random weights, seeded): Pearson r of the
   maps and time, side by side.

On a shared machine the ratios move with the load: run it alone (several times).

Writes benchmarks/out/gradients.json.
    PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/gradients.py --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from explainrt import Explainer  # noqa: E402
from explainrt.errors import require  # noqa: E402
from explainrt.metrics.base import format_rows  # noqa: E402
from explainrt.metrics.bench import describe_machine, format_machine, sample_image  # noqa: E402
from explainrt.metrics.peers import zoo_torch_model  # noqa: E402
from explainrt.metrics.similarity import pearson  # noqa: E402


def interleaved(fns: dict, repeat: int, warmup: int = 1) -> dict:
    """Median seconds of each callable, runs interleaved so both see the same machine load."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def module_fgvis(torch, model, x, target, iterations, lam=1.0, lr=0.1):
    """The plain loop: FGVis's deletion game on the nn.Module (no defence)."""
    mask = torch.ones_like(x, requires_grad=True)
    opt = torch.optim.Adam([mask], lr=lr)
    for _ in range(iterations):
        p = torch.softmax(model(x * mask), 1)[0, target]
        loss = p - lam * mask.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            mask.clamp_(0, 1)
    return mask.detach()


def module_gradcam(torch, model, layer, x, targets):
    """Plain autograd Grad-CAM (as pytorch-grad-cam's GradCAM): ReLU(Σ mean(g)·A) per target."""
    import cv2

    store = {}

    def keep(_, __, out):
        out.retain_grad()
        store["a"] = out

    handle = layer.register_forward_hook(keep)
    maps = []
    try:
        for t in targets:
            model.zero_grad(set_to_none=True)
            model(x)[0, t].backward()
            a, g = store["a"][0].detach(), store["a"].grad[0]
            cam = torch.relu((g.mean(dim=(1, 2))[:, None, None] * a).sum(0)).numpy()
            cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
            maps.append(cv2.resize(cam, (x.shape[3], x.shape[2]), interpolation=cv2.INTER_LINEAR))
    finally:
        handle.remove()
    return np.stack(maps)


def peer_rows(torch, module, layer, onnx_path: str, rgb, targets, repeat: int, threads: int, name: str):
    """pytorch-grad-cam vs explainrt (forward-only where the model has a CAM head, else the torch
    engine's autograd) on ``module``/``layer`` and its export: (table rows, record)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ours_explainer = Explainer(onnx_path, threads=threads)
    autograd = Explainer(onnx_path, backend="torch", threads=threads)
    x = torch.from_numpy(ours_explainer.prepare(rgb).x).expand(len(targets), -1, -1, -1).contiguous()
    rows, record = [], {}
    for method, peer_cls in (("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus)):
        peer = peer_cls(model=module, target_layers=[layer])
        maps = {}

        def run(key, fn):
            def call():
                maps[key] = fn()
            return call

        fns = {"peer": run("peer", lambda: peer(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets]))}
        head = ours_explainer.metadata.cam_head is not None
        fns["ours"] = run("ours", lambda: (ours_explainer if head else autograd).explain(
            rgb, method, target=targets).saliency_maps)
        t = interleaved(fns, repeat)
        r = [pearson(maps["ours"][i], maps["peer"][i]) for i in range(len(targets))]
        path = "forward-only (ORT, CAM head)" if head else "torch-engine autograd"
        record[method] = {"seconds": t, "pearson": r, "path": path}
        rows.append([f"{name}: {method}, {len(targets)} targets, {path}", f"{t['ours'] * 1e3:.1f} ms",
                     f"{t['peer'] * 1e3:.1f} ms", f"{t['ours'] / t['peer']:.2f}x",
                     f"vs pytorch-grad-cam {peer_cls.__name__}: r = {min(r):.4f} (min over targets)"])
    return rows, record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="chelsea")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default 2)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20, help="FGVis iterations per timed run")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out", "gradients.json"))
    args = parser.parse_args()

    torch = require("torch", "export", "this benchmark")
    torch.set_num_threads(args.threads)
    from explainrt.export import export_zoo_model
    from explainrt.runtime.autograd import GradientGraph
    from explainrt.runtime.torch_engine import TorchEngine

    rgb = sample_image(args.image)
    machine = describe_machine()
    model, layer = zoo_torch_model("efficientnet-lite0")
    model.requires_grad_(False)  # input gradients only, as the engine's graph (its weights are constants)
    rows, record = [], {"machine": machine, "model": "efficientnet-lite0", "image": args.image,
                        "threads": args.threads, "repeat": args.repeat}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lite0.onnx")
        export_zoo_model("efficientnet-lite0", path)
        ort = Explainer(path, threads=args.threads)
        engine = TorchEngine(path, device="cpu", threads=args.threads)
        gexp = Explainer(engine)
        graph = GradientGraph(engine)
        x1 = torch.from_numpy(ort.prepare(rgb).x)
        target = int(np.argmax(ort.predict(rgb)))
        logits = ort.metadata.logits_output

        # 1. backward through the interpreter vs the module
        record["backward"] = []
        for batch in (1, 8):
            xb = x1.expand(batch, -1, -1, -1).contiguous()

            def ours():
                x = xb.clone().requires_grad_(True)
                graph.forward(x, [logits])[logits][:, target].sum().backward()

            def theirs():
                x = xb.clone().requires_grad_(True)
                model(x)[:, target].sum().backward()

            t = interleaved({"ours": ours, "module": theirs}, args.repeat)
            ratio = t["ours"] / t["module"]
            record["backward"].append({"batch": batch, "explainrt_s": t["ours"], "module_s": t["module"],
                                       "ratio": ratio})
            rows.append([f"forward+backward, batch {batch}", f"{t['ours'] * 1e3:.1f} ms", f"{t['module'] * 1e3:.1f} ms",
                         f"{ratio:.2f}x", "torch engine / nn.Module"])

        # 2. FGVis iterations/s
        n = args.iterations
        t = interleaved({
            "defence": lambda: gexp.explain(rgb, "fgvis", target=target, iterations=n),
            "no_defence": lambda: gexp.explain(rgb, "fgvis", target=target, iterations=n, defence=False),
            "module": lambda: module_fgvis(torch, model, x1, target, n),
        }, args.repeat)
        record["fgvis"] = {k: {"seconds": v, "iterations_per_s": n / v} for k, v in t.items()}
        record["fgvis"]["iterations"] = n
        for key, label in (("defence", "explainrt fgvis (defence)"), ("no_defence", "explainrt fgvis (no defence)")):
            rows.append([f"FGVis {n} it, {label}", f"{n / t[key]:.2f} it/s", f"{n / t['module']:.2f} it/s",
                         f"{t[key] / t['module']:.2f}x", "vs plain autograd loop on nn.Module"])

        # 3. Grad-CAM (the module's weights require grad again, as pytorch-grad-cam runs it)
        model.requires_grad_(True)
        targets = [target] + [c for c in (281, 285, 287) if c != target][:2]
        no_head = copy.deepcopy(ort.metadata)
        no_head.cam_head = None
        slow = Explainer(TorchEngine(path, device="cpu", metadata=no_head))
        maps = {}

        def run(key, fn):
            def call():
                maps[key] = fn()
            return call

        t = interleaved({
            "cam_head": run("cam_head", lambda: ort.explain(rgb, "gradcam", target=targets).saliency_maps),
            "autograd": run("autograd", lambda: slow.explain(rgb, "gradcam", target=targets).saliency_maps),
            "module": run("module", lambda: module_gradcam(torch, model, layer, x1, targets)),
        }, args.repeat)
        r = {k: [pearson(maps[k][i], maps["module"][i]) for i in range(len(targets))] for k in ("cam_head", "autograd")}
        record["gradcam"] = {"targets": targets, "seconds": t, "pearson_vs_module": r}
        rows.append([f"Grad-CAM {len(targets)} targets, forward-only (ORT, CAM head)", f"{t['cam_head'] * 1e3:.1f} ms",
                     f"{t['module'] * 1e3:.1f} ms", f"{t['cam_head'] / t['module']:.2f}x",
                     f"r = {min(r['cam_head']):.4f} (min over targets)"])
        rows.append([f"Grad-CAM {len(targets)} targets, torch-engine autograd", f"{t['autograd'] * 1e3:.1f} ms",
                     f"{t['module'] * 1e3:.1f} ms", f"{t['autograd'] / t['module']:.2f}x",
                     f"r = {min(r['autograd']):.4f}"])

        # 4. pytorch-grad-cam itself, where installed
        try:
            import pytorch_grad_cam  # noqa: F401
        except ImportError:
            print("pytorch-grad-cam is not installed: no side-by-side rows with it (see the README's bench "
                  "environment)", file=sys.stderr)
        else:
            record["pytorch_grad_cam"] = {}
            peer, rec = peer_rows(torch, model, layer, path, rgb, targets, args.repeat, args.threads,
                                  "efficientnet-lite0")
            rows += peer
            record["pytorch_grad_cam"]["efficientnet-lite0"] = rec
            try:
                import torchvision
            except ImportError:
                print("torchvision is not installed: no ResNet rows", file=sys.stderr)
            else:
                from explainrt.export import export_torch

                torch.manual_seed(0)
                resnet = torchvision.models.resnet18(weights=None).eval()
                resnet_path = os.path.join(tmp, "resnet18.onnx")
                export_torch(resnet, resnet_path, layer="layer4")
                peer, rec = peer_rows(torch, resnet, resnet.layer4, resnet_path, rgb, targets, args.repeat,
                                      args.threads, "resnet18 (random weights)")
                rows += peer
                record["pytorch_grad_cam"]["resnet18"] = rec

    print(format_machine(machine))
    print(format_rows(["measurement", "explainrt", "peer", "time ratio (explainrt/peer)", "note"], rows))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(record, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
