#!/usr/bin/env python
"""Images/s of explainrt.distributed (Ray Data) against the plain single-process loop, side by side.

Exports EfficientNet-Lite0 (the demo model) to a temporary directory, writes N copies of the
four demo photographs (flipped and shifted so that no two files are the same), and for each
method times, in one run on one machine:

* ``loop``: one ``Explainer`` (``--threads`` ONNX Runtime threads, the whole machine) explaining
  the files one after another (model loaded and warmed up before the clock starts);
* ``ray AxT``: ``explain_dataset`` on a local ``ray.init(num_cpus=...)`` with A actors of T
  threads, end to end (the job: reading, actor start-up and model load, explaining, collecting).
  ``steady`` is the pool's rate once started: the rows finished after every actor had finished
  its first one, over the time from then to the last row (each row records when it finished).

On one small machine Ray can only match the loop (≈ 1× at best, minus its start-up): the point
is that the same code runs on a cluster, where throughput grows with the actors. On a cluster:
``ray.init("auto")`` (or RAY_ADDRESS) before ``explain_dataset``, or
``explainrt explain --ray auto --model /shared/lite0.onnx s3://bucket/images/ -o /shared/out``.

    PYTHONPATH=. python benchmarks/ray_bench.py                  # fem (256 images), sidu (8), 2 rounds (ABC, CBA)
    PYTHONPATH=. python benchmarks/ray_bench.py --images fem=128,sidu=16 --json benchmarks/out/ray.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _counts(text: str) -> dict[str, int]:
    out = {}
    for item in text.split(","):
        method, _, n = item.partition("=")
        out[method.strip()] = int(n)
    return out


def write_images(directory: str, count: int) -> list[str]:
    """``count`` PNG files: the demo photographs, flipped and rolled so each file differs."""
    from explainrt.cli import DEMO_IMAGES
    from explainrt.imaging import write_png
    from explainrt.metrics.bench import sample_image

    base = [sample_image(name) for name in DEMO_IMAGES]
    paths = []
    for i in range(count):
        rgb = base[i % len(base)]
        variant = i // len(base)
        rgb = np.roll(rgb[:, ::-1] if variant % 2 else rgb, shift=7 * variant, axis=1)
        path = os.path.join(directory, f"img{i:04d}.png")
        write_png(path, np.ascontiguousarray(rgb))
        paths.append(path)
    return paths


def time_loop(model: str, paths: list[str], method: str, threads: int) -> dict:
    from explainrt import Explainer

    explainer = Explainer(model, threads=threads)
    explainer.explain(paths[0], method)  # warm-up: the engine's first run
    t0 = time.perf_counter()
    for path in paths:
        explainer.explain(path, method)
    seconds = time.perf_counter() - t0
    explainer.close()
    return {"config": f"loop (1 process, {threads} threads)", "seconds": seconds, "images_per_s": len(paths) / seconds}


def time_ray(model: str, paths: list[str], method: str, actors: int, threads: int, rows_per_batch: int) -> dict:
    """The whole job; and its steady rate: rows done after every actor's first one, over the time they took."""
    from explainrt.distributed import explain_dataset

    t0 = time.perf_counter()
    ds = explain_dataset(model, paths, [method], threads=threads, actors=actors,
                         rows_per_batch=rows_per_batch).materialize()
    seconds = time.perf_counter() - t0
    rows = ds.select_columns(["error", "worker", "finished"]).take_all()
    assert len(rows) == len(paths) and not any(r["error"] for r in rows), "every image must be explained"
    workers = sorted({r["worker"] for r in rows})
    warm = max(min(r["finished"] for r in rows if r["worker"] == w) for w in workers)  # every actor has answered
    later = sorted(r["finished"] for r in rows if r["finished"] > warm)
    steady = len(later) / (later[-1] - warm) if len(later) >= 2 else float("nan")
    return {"config": f"ray {actors}x{threads} (actors x threads)", "seconds": seconds,
            "images_per_s": len(paths) / seconds, "steady_images_per_s": steady, "steady_rows": len(later),
            "rows_per_batch": rows_per_batch, "workers": workers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="fem=256,sidu=8", help="images per method (default fem=256,sidu=8)")
    parser.add_argument("--rows-per-batch", default="fem=16,sidu=1",
                        help="images per actor call (default fem=16: FEM takes milliseconds; sidu=1)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every config, in alternating order (median)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray and the loop")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "out", "ray_bench.json"))
    args = parser.parse_args()
    import ray

    from explainrt.export import export_zoo_model

    counts, batches = _counts(args.images), _counts(args.rows_per_batch)
    pools = sorted({(args.cpus, 1), (1, args.cpus)})  # (actors, threads): the same CPUs either way
    results = []
    with tempfile.TemporaryDirectory(prefix="explainrt-ray-bench-") as tmp:
        model = os.path.join(tmp, "lite0.onnx")
        export_zoo_model("efficientnet-lite0", model)
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_start = time.perf_counter() - t0
        ray.data.DataContext.get_current().enable_progress_bars = False
        for method, n in counts.items():
            directory = os.path.join(tmp, method)
            os.makedirs(directory)
            paths = write_images(directory, n)
            configs = [lambda: time_loop(model, paths, method, args.cpus)] + [
                (lambda a=a, t=t: time_ray(model, paths, method, a, t, batches.get(method, 4))) for a, t in pools]
            runs: list[list[dict]] = [[] for _ in configs]
            for r in range(args.rounds):  # ABC, CBA, ...: a load that drifts hits every config alike
                order = range(len(configs)) if r % 2 == 0 else reversed(range(len(configs)))
                for i in order:
                    runs[i].append(configs[i]())
            loop_s = [run["seconds"] for run in runs[0]]
            for config_runs in runs:
                seconds = [run["seconds"] for run in config_runs]
                row = {**config_runs[0], "method": method, "images": n, "rounds_s": seconds,
                       "seconds": float(np.median(seconds))}
                row["images_per_s"] = n / row["seconds"]
                paired = [ls / cs for ls, cs in zip(loop_s, seconds)]  # each round against its own loop
                row.update(vs_loop=float(np.median(loop_s)) / row["seconds"], vs_loop_range=[min(paired), max(paired)])
                if "steady_images_per_s" in row:
                    row["steady_images_per_s"] = float(np.median([run["steady_images_per_s"] for run in config_runs]))
                    row["steady_vs_loop"] = row["steady_images_per_s"] * float(np.median(loop_s)) / n
                results.append(row)
        ray.shutdown()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"machine: {machine}; ray {ray.__version__}, local ray.init(num_cpus={args.cpus}) took {ray_start:.1f} s")
    print(f"median of {args.rounds} rounds; 'rounds': each round against its own loop run")
    print(f"{'method':<6} {'images':>6}  {'config':<32} {'seconds':>8} {'images/s':>9} {'vs loop':>8} "
          f"{'rounds':>12} {'steady/s':>9} {'steady vs loop':>14}")
    for r in results:
        steady = (f"{r['steady_images_per_s']:>9.2f} {r['steady_vs_loop']:>13.2f}x" if "steady_images_per_s" in r
                  else f"{'-':>9} {'-':>14}")
        low, high = r["vs_loop_range"]
        print(f"{r['method']:<6} {r['images']:>6}  {r['config']:<32} {r['seconds']:>8.2f} {r['images_per_s']:>9.2f} "
              f"{r['vs_loop']:>7.2f}x {f'{low:.2f}-{high:.2f}x':>12} {steady}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump({"machine": machine, "ray": ray.__version__, "cpus": args.cpus, "ray_start_s": ray_start,
                   "rounds": args.rounds,
                   "results": results}, fh, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
