"""explainrt (ONNX Runtime, CPU) vs pytorch-grad-cam's ScoreCAM (torch, CPU) on EfficientNet-Lite0 + chelsea.

Times explainrt's Score-CAM and SIDU at batch 32 and 64 and, in the same process on the
same model and image, pytorch-grad-cam's ScoreCAM (batch_size 32). Prints p50 latency,
forward passes, the speed-up, and the Pearson correlation of our Score-CAM map with
theirs: our default (softmax probability weights, masks upsampled with align_corners=False)
and our pytorch-grad-cam-like variant (score='logit', channel_softmax=True); their masks are
upsampled with align_corners=True and combined at 7×7 before resizing, so the maps differ a
little even with the same weighting. Writes benchmarks/out/cpu_vs_gradcam.json.

Needs grad-cam (and so torchvision) beside explainrt, e.g. the bench venv:
    PYTHONPATH=$PWD /work/main/.venv-bench/bin/python benchmarks/cpu_vs_gradcam.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from explainrt import Explainer  # noqa: E402
from explainrt.errors import require  # noqa: E402
from explainrt.metrics.base import format_rows  # noqa: E402
from explainrt.metrics.bench import describe_machine, format_machine, sample_image, time_explain  # noqa: E402
from explainrt.metrics.peers import PEERS, time_peer, zoo_torch_model  # noqa: E402
from explainrt.metrics.similarity import pearson  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="chelsea", help="scikit-image photograph (default chelsea)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime and torch threads (default 2)")
    parser.add_argument("--batch-sizes", default="32,64", help="explainrt batch sizes (default 32,64)")
    parser.add_argument("--peer-batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5, help="timed explainrt runs per configuration")
    parser.add_argument("--peer-repeat", type=int, default=1, help="timed pytorch-grad-cam runs (each ~1 min on 2 cores)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out", "cpu_vs_gradcam.json"))
    args = parser.parse_args()

    torch = require("torch", "export", "this benchmark")
    require("pytorch_grad_cam", "bench", "this benchmark")
    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rgb = sample_image(args.image)
    machine = describe_machine()

    with tempfile.TemporaryDirectory() as tmp:
        from explainrt.export import export_zoo_model

        path = os.path.join(tmp, "lite0.onnx")
        export_zoo_model("efficientnet-lite0", path)
        rows, ours_maps = [], {}
        for bs in batch_sizes:
            explainer = Explainer(path, batch_size=bs, max_batch=max(batch_sizes), threads=args.threads)
            for method in ("scorecam", "sidu"):
                stats = time_explain(explainer, rgb, method, warmup=1, repeat=args.repeat)
                rows.append(("explainrt (ORT CPU)", method, stats.batch_size, stats.p50, stats.percentile(90),
                             stats.forward_passes))
            if not ours_maps:
                ours_maps["scorecam"] = explainer.explain(rgb, "scorecam")
                ours_maps["scorecam_gradcam_like"] = explainer.explain(rgb, "scorecam", score="logit",
                                                                       channel_softmax=True)
                x = explainer.prepare(rgb).x
            explainer.close()

        model, layer = zoo_torch_model("efficientnet-lite0")
        target = ours_maps["scorecam"].target
        peer = next(p for p in PEERS if p.name == "grad-cam ScoreCAM")
        theirs = time_peer(peer, model, layer, x, target, batch_size=args.peer_batch_size, warmup=0,
                           repeat=args.peer_repeat)
    their_p50 = float(np.median(theirs["times"]))
    rows.append(("pytorch-grad-cam 1.5.7 (torch CPU)", "scorecam", args.peer_batch_size, their_p50,
                 float(np.percentile(theirs["times"], 90)), theirs["forward_passes"]))

    correlation = {name: pearson(result.saliency, theirs["saliency"]) for name, result in ours_maps.items()}
    print(format_machine(machine))
    print(f"EfficientNet-Lite0, {args.image}, class {target} ({ours_maps['scorecam'].label}), {args.threads} threads; "
          f"explainrt: 1 warm-up + {args.repeat} runs, pytorch-grad-cam: {args.peer_repeat} run(s)\n")
    table = [[impl, method, str(bs), f"{p50:.3f}", f"{p90:.3f}", str(passes), f"{passes / p50:.0f}",
              f"{their_p50 / p50:.1f}x"] for impl, method, bs, p50, p90, passes in rows]
    print(format_rows(["implementation", "method", "batch", "p50 s", "p90 s", "passes", "passes/s",
                       "grad-cam ScoreCAM time / this"], table))
    print(f"\nPearson r of our Score-CAM vs pytorch-grad-cam's: default {correlation['scorecam']:.4f}, "
          f"score=logit+channel_softmax {correlation['scorecam_gradcam_like']:.4f}")
    best = min(p50 for impl, method, _, p50, _, _ in rows if impl.startswith("explainrt") and method == "scorecam")
    print(f"Score-CAM speed-up (best explainrt batch): {their_p50 / best:.1f}x (target >= 10x)")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"machine": machine, "image": args.image, "target": target, "threads": args.threads,
                   "rows": [dict(zip(("implementation", "method", "batch_size", "p50_s", "p90_s", "forward_passes"), r))
                            for r in rows],
                   "gradcam_times_s": theirs["times"], "pearson_vs_gradcam": correlation,
                   "scorecam_speedup": their_p50 / best}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
