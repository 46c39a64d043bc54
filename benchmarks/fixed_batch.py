"""A fixed-batch ONNX model three ways: rewritten to a dynamic batch, run at its fixed batch, dynamic export.

One small ShuffleNet-style CNN (channel shuffles by view/transpose/view, flatten by view) is
exported by ``torch.onnx.export(..., dynamo=False)`` twice: without ``dynamic_axes`` (batch 1
hard-coded in its Reshape constants, as users' files are) and with them. explainrt exports the
first with the batch rewrite (proven, dynamic batch) and with ``--keep-fixed-batch`` (run one
input per engine call), the second as it is. Each of the three explains the same image with the
same method, interleaved run by run in one process; the table gives p50 latency and masked
passes per second, and each path's speed relative to the dynamic export. Writes
benchmarks/out/fixed_batch.json.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/fixed_batch.py --threads 2
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
from explainrt.errors import require  # noqa: E402
from explainrt.export import expose_activation  # noqa: E402
from explainrt.export.batch_rewrite import describe_batch  # noqa: E402
from explainrt.metrics.base import format_rows  # noqa: E402
from explainrt.metrics.bench import describe_machine, format_machine  # noqa: E402


def shufflenet_like(torch, width: int = 48, classes: int = 100):
    """Stem, three stages of grouped conv + channel shuffle, a 4-D activation, flatten by view, linear head."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, groups=2, bias=False),
                                      nn.BatchNorm2d(c_out), nn.ReLU())

        def forward(self, x):
            x = self.conv(x)
            b, c, h, w = x.shape
            return x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU())
            self.stages = nn.Sequential(Block(width, width * 2, 2), Block(width * 2, width * 2, 1),
                                        Block(width * 2, width * 4, 2), Block(width * 4, width * 4, 1))
            self.act = nn.ReLU()
            self.pool = nn.AvgPool2d(4)
            self.fc = nn.Linear(width * 4 * 2 * 2, classes)

        def forward(self, x):
            x = self.act(self.stages(self.stem(x)))
            x = self.pool(x)
            return self.fc(x.view(x.size(0), -1))

    torch.manual_seed(0)
    return Net().eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="masked images per engine call (default 64)")
    parser.add_argument("--methods", default="rise,scorecam", help="methods (default rise,scorecam)")
    parser.add_argument("--n-masks", type=int, default=256, help="RISE masks (default 256)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per path and method, interleaved")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out", "fixed_batch.json"))
    args = parser.parse_args()

    torch = require("torch", "export", "this benchmark")
    model = shufflenet_like(torch)
    size = (args.size, args.size)
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        fixed_src, dynamic_src = os.path.join(tmp, "fixed.onnx"), os.path.join(tmp, "dynamic.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for path, kwargs in ((fixed_src, {}), (dynamic_src, {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}})):
                torch.onnx.export(model, (torch.zeros(1, 3, *size),), path, input_names=["x"], output_names=["y"],
                                  opset_version=17, dynamo=False, **kwargs)
        paths = {"rewritten": (fixed_src, True), "fixed-batch fallback": (fixed_src, False),
                 "dynamic export": (dynamic_src, True)}
        explainers, how = {}, {}
        for name, (src, rewrite) in paths.items():
            dst = os.path.join(tmp, name.replace(" ", "_") + ".out.onnx")
            meta = expose_activation(src, dst, rewrite_batch=rewrite)
            how[name] = describe_batch(meta)
            explainers[name] = Explainer(dst, batch_size=args.batch_size, threads=args.threads)
        params = {"rise": {"n_masks": args.n_masks}}
        times = {(n, m): [] for n in explainers for m in methods}
        passes = {}
        for method in methods:  # one warm-up each, then runs interleaved across the three paths
            for name, explainer in explainers.items():
                passes[(name, method)] = explainer.explain(image, method, **params.get(method, {})).forward_passes
            for _ in range(args.repeat):
                for name, explainer in explainers.items():
                    t0 = time.perf_counter()
                    explainer.explain(image, method, **params.get(method, {}))
                    times[(name, method)].append(time.perf_counter() - t0)

    rows, records = [], []
    for method in methods:
        base = float(np.median(times[("dynamic export", method)]))
        for name in explainers:
            p50 = float(np.median(times[(name, method)]))
            engine = explainers[name].engine
            record = {"path": name, "method": method, "engine_batch": engine.max_batch, "p50_s": p50,
                      "times_s": times[(name, method)], "forward_passes": passes[(name, method)],
                      "passes_per_s": passes[(name, method)] / p50, "speed_vs_dynamic": base / p50,
                      "batch": how[name]}
            records.append(record)
            rows.append([method, name, engine.max_batch, f"{p50 * 1000:.1f}", passes[(name, method)],
                         f"{record['passes_per_s']:.0f}", f"{record['speed_vs_dynamic']:.2f}x"])
    machine = describe_machine()
    print(format_machine(machine))
    print(f"model: ShuffleNet-style CNN {args.size}x{args.size}, onnxruntime CPU, {args.threads} threads, "
          f"batch_size {args.batch_size}, {args.repeat} interleaved runs each")
    for name, line in how.items():
        print(f"  {name}: {line}")
    print(format_rows(["method", "path", "engine batch", "p50 ms", "passes", "passes/s", "vs dynamic"], rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": machine, "args": vars(args), "rows": records}, fh,
                  indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
