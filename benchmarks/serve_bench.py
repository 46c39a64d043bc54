#!/usr/bin/env python
"""Latency/throughput of `explainrt serve` under a concurrency sweep (in the spirit of Triton's perf_analyzer).

Exports EfficientNet-Lite0 to a temp dir, starts a server on loopback (a subprocess by default,
`--inprocess` for one process), and for each method and concurrency level runs that many
clients back to back for `--duration` seconds (each client sends at least one request). It
reports p50/p90/p99 end-to-end latency and throughput per level, and the server overhead at
concurrency 1, measured two ways in the same run:

* ``overhead`` = p50 end to end − p50 of the in-process ``Explainer.explain`` on the same request,
  the two interleaved (in-process, remote, in-process, remote, ...) so both see the same machine;
* ``per-req ovh`` = p50 over requests of (end to end − the explainer time the server reports for
  that very request: preprocess + base pass + explain). This pairs each request with itself and
  is the steadier number on a busy machine; at higher concurrency it includes the queue wait.

    PYTHONPATH=. python benchmarks/serve_bench.py                       # fem + scorecam, 1/2/4/8
    PYTHONPATH=. python benchmarks/serve_bench.py --methods fem --levels 1,2,4,8,16 --duration 5
    PYTHONPATH=. python benchmarks/serve_bench.py --scenario mixed --baseline-tree /tmp/base   # vs an older server
    PYTHONPATH=. python benchmarks/serve_bench.py --scenario batching --levels 1,8,32,64 --duration 10

``mixed``: 32 clients, each request FEM (80 %), SIDU (10 %) or Score-CAM (10 %) with a 30 s
deadline; per method: completions/s, p50/p99, deadline misses; FEM's p99 against its solo p50
on the same server. ``batching``: FEM requests/s with cross-request batching off and on, the two
servers alternating level by level so both see the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

# Pause between the in-process and the remote half of a pair: ONNX Runtime's intra-op threads
# spin for a while after a run, and on a 2-core machine the spinning threads of one process
# would slow the other process's next run (an artefact of measuring, not server overhead).
SETTLE_S = 0.05
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def percentile(values, q):
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


def bench_image(size: int = 224) -> np.ndarray:
    """scikit-image's chelsea (a real photograph) resized to size×size RGB uint8; a gradient if skimage is absent."""
    import cv2

    try:
        from skimage import data

        img = data.chelsea()
    except ImportError:
        yy, xx = np.mgrid[0:300, 0:451]
        img = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=2).astype(np.uint8)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


class ServerProcess:
    """`python -m explainrt serve` on 127.0.0.1 with a free port; stopped with SIGTERM."""

    def __init__(self, models: str, workers: int, batch_size: int, queue_size: int, extra=(), tree: str = ROOT):
        env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "explainrt", "serve", "--models", models, "--host", "127.0.0.1", "--port", "0",
             "--workers", str(workers), "--batch-size", str(batch_size), "--queue-size", str(queue_size), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tree)
        line = self.proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not match:
            raise RuntimeError(f"server did not start: {line!r}")
        self.port = int(match.group(1))
        metrics = re.search(r"metrics on :(\d+)", line)
        self.metrics_port = int(metrics.group(1)) if metrics else None
        if "serving" not in self.proc.stdout.readline():
            raise RuntimeError("server did not load its model")

    def counter(self, name: str) -> float:
        """The sum of a Prometheus counter's samples on the server's /metrics (needs --metrics-port)."""
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return sum(float(v) for v in re.findall(rf"^{name}_total{{[^}}]*}} (\S+)$", text, re.M))

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


class InProcessServer:
    def __init__(self, models: str, workers: int, batch_size: int, queue_size: int, extra=(), tree: str = ROOT):
        from explainrt.server import ExplainServer, ServerConfig

        self.server = ExplainServer(ServerConfig(models=models, host="127.0.0.1", port=0, workers=workers,
                                                 batch_size=batch_size, queue_size=queue_size)).start()
        self.port = self.server.port

    def stop(self):
        self.server.stop(grace=5)


def _explainer_seconds(result) -> float:
    t = result.timings
    return t["preprocess_s"] + t["base_pass_s"] + t["explain_s"]


def run_level(url: str, method: str, image: np.ndarray, concurrency: int, duration: float) -> dict:
    """``concurrency`` clients send requests back to back for ``duration`` s (at least one each)."""
    from explainrt.client import ExplainClient

    samples: list[tuple[float, float]] = []  # (end-to-end s, server explainer s)
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def client_loop():
        with ExplainClient(url, timeout=600, retries=0) as client:
            client.health()  # connect outside the measurement
            start.wait()
            end = time.perf_counter() + duration
            first = True
            while first or time.perf_counter() < end:
                first = False
                try:
                    result = client.explain(image, method)
                except Exception as exc:
                    with lock:
                        errors.append(str(exc))
                    continue
                with lock:
                    samples.append((result.latency_s, _explainer_seconds(result)))

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    e2e = [s[0] for s in samples]
    return {"method": method, "concurrency": concurrency, "requests": len(samples), "errors": len(errors),
            "wall_s": wall, "throughput_rps": len(samples) / wall,
            "p50_ms": percentile(e2e, 50) * 1e3, "p90_ms": percentile(e2e, 90) * 1e3,
            "p99_ms": percentile(e2e, 99) * 1e3,
            "per_request_overhead_p50_ms": percentile([a - b for a, b in samples], 50) * 1e3}


def measure_overhead(url: str, model: str, method: str, image: np.ndarray, batch_size: int,
                     duration: float) -> dict:
    """Concurrency 1, interleaved: in-process ``Explainer.explain``, then the same request through the server."""
    from explainrt import Explainer
    from explainrt.client import ExplainClient

    local, remote, paired = [], [], []
    from explainrt.server.config import ServerConfig

    same_engine = ServerConfig(models="").engine_options()  # the server's engine settings, for a fair baseline
    with Explainer(model, batch_size=batch_size, **same_engine) as explainer, \
            ExplainClient(url, timeout=600, retries=0) as client:
        explainer.explain(image, "fem")  # warm both sides cheaply
        client.explain(image, "fem")
        end = time.perf_counter() + duration
        while not local or time.perf_counter() < end:
            t0 = time.perf_counter()
            explainer.explain(image, method)
            local.append(time.perf_counter() - t0)
            time.sleep(SETTLE_S)
            result = client.explain(image, method)
            remote.append(result.latency_s)
            paired.append(result.latency_s - _explainer_seconds(result))
            time.sleep(SETTLE_S)
    return {"method": method, "pairs": len(local), "in_process_p50_ms": percentile(local, 50) * 1e3,
            "end_to_end_p50_ms": percentile(remote, 50) * 1e3,
            "overhead_p50_ms": (percentile(remote, 50) - percentile(local, 50)) * 1e3,
            "per_request_overhead_p50_ms": percentile(paired, 50) * 1e3,
            "in_process_ms": [t * 1e3 for t in local], "end_to_end_ms": [t * 1e3 for t in remote]}


def run_mixed(url: str, image: np.ndarray, clients: int, duration: float, mix: dict, deadline: float,
              seed: int = 0, warmup: float = 0.0) -> dict:
    """``clients`` clients send back to back for ``duration`` s, each request's method drawn from ``mix``.

    Every request has a ``deadline`` (s). Returns per-method latency percentiles, completions per
    second, deadline misses and other errors by code, over the requests sent after the first
    ``warmup`` seconds (the burst of every client's first request at once is not steady state).
    """
    from explainrt.client import ExplainClient, RemoteError

    names, weights = zip(*mix.items())
    weights = np.asarray(weights, np.float64) / sum(weights)
    latencies: dict = {m: [] for m in names}
    codes: dict = {m: {} for m in names}
    server_side: dict = {m: [] for m in names}  # (queue_s, base_pass_s, total_s) the server reports
    lock = threading.Lock()

    def client_loop(index: int):
        rng = np.random.default_rng(seed + index)
        with ExplainClient(url, timeout=deadline, retries=0) as client:
            client.health()
            start.wait()
            begin = time.perf_counter()
            end = begin + warmup + duration
            while time.perf_counter() < end:
                method = names[int(rng.choice(len(names), p=weights))]
                t0 = time.perf_counter()
                counted = t0 - begin >= warmup
                try:
                    result = client.explain(image, method, timeout=deadline)
                    code = "OK"
                except RemoteError as exc:
                    code = exc.code
                if not counted:
                    continue
                with lock:
                    codes[method][code] = codes[method].get(code, 0) + 1
                    if code == "OK":
                        latencies[method].append(time.perf_counter() - t0)
                        server_side[method].append((result.timings["queue_s"], result.timings["base_pass_s"],
                                                    result.timings["total_s"]))

    health_ms: list = []
    probing = threading.Event()

    def health_probe():
        """A liveness probe's view: grpc.health.v1 Check every 100 ms while the load runs."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            start.wait()
            time.sleep(warmup)
            while not probing.is_set():
                t0 = time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    health_ms.append((time.perf_counter() - t0) * 1e3)
                except grpc.RpcError:
                    health_ms.append(float("inf"))
                time.sleep(0.1)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    start = threading.Barrier(clients + 2)
    probe = threading.Thread(target=health_probe)
    probe.start()
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter() + warmup
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    probing.set()
    probe.join()
    per_method = {}
    for m in names:
        lat = latencies[m]
        per_method[m] = {"ok": len(lat), "ok_per_s": len(lat) / wall, "codes": codes[m],
                         "deadline_exceeded": codes[m].get("DEADLINE_EXCEEDED", 0),
                         "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
                         "queue_p50_ms": percentile([t[0] for t in server_side[m]], 50) * 1e3,
                         "base_pass_p50_ms": percentile([t[1] for t in server_side[m]], 50) * 1e3,
                         "server_p50_ms": percentile([t[2] for t in server_side[m]], 50) * 1e3}
    return {"clients": clients, "wall_s": wall, "warmup_s": warmup, "mix": mix, "deadline_s": deadline,
            "methods": per_method, "health_checks": len(health_ms), "health_p50_ms": percentile(health_ms, 50),
            "health_p99_ms": percentile(health_ms, 99), "health_max_ms": max(health_ms, default=float("nan"))}


def solo_p50(url: str, image: np.ndarray, method: str, count: int = 20) -> float:
    """p50 latency (ms) of ``method`` with no other traffic."""
    from explainrt.client import ExplainClient

    with ExplainClient(url, timeout=600, retries=0) as client:
        client.explain(image, method)
        return percentile([client.explain(image, method).latency_s for _ in range(count)], 50) * 1e3


def scenario_mixed(args, models, image) -> list:
    """The issue's mixed load (80 % FEM, 10 % SIDU, 10 % Score-CAM) on each server variant in turn."""
    mix = {"fem": 0.8, "sidu": 0.1, "scorecam": 0.1}
    variants = [("this server", ROOT, [])]
    if args.baseline_tree:
        variants.insert(0, ("baseline " + os.path.basename(os.path.normpath(args.baseline_tree)), args.baseline_tree, []))
    rows = []
    for label, tree, extra in variants:
        server = ServerProcess(models, args.workers, args.batch_size, queue_size=64, extra=extra, tree=tree)
        try:
            url = f"127.0.0.1:{server.port}"
            solo = solo_p50(url, image, "fem")
            result = run_mixed(url, image, args.mixed_clients, args.mixed_duration, mix, args.deadline,
                               warmup=args.warmup)
        finally:
            server.stop()
        result.update(server=label, fem_solo_p50_ms=solo)
        rows.append(result)
        fem = result["methods"]["fem"]
        print(f"mixed {label}: fem p50 {fem['p50_ms']:.0f} ms p99 {fem['p99_ms']:.0f} ms (solo {solo:.1f}), "
              f"{fem['deadline_exceeded']} fem past the deadline", file=sys.stderr)
    return rows


def print_mixed(rows) -> None:
    header = (f"{'server':<22} {'method':<9} {'ok':>5} {'ok/s':>6} {'p50 ms':>9} {'p99 ms':>9} {'p99/solo':>8} "
              f"{'missed':>6} {'queue p50':>9} {'server p50':>10} {'other errors':<14}")
    print(header)
    print("-" * len(header))
    for row in rows:
        for method, m in row["methods"].items():
            ratio = m["p99_ms"] / row["fem_solo_p50_ms"] if method == "fem" else float("nan")
            other = {k: v for k, v in m["codes"].items() if k not in ("OK", "DEADLINE_EXCEEDED")}
            print(f"{row['server']:<22} {method:<9} {m['ok']:>5} {m['ok_per_s']:>6.2f} {m['p50_ms']:>9.0f} "
                  f"{m['p99_ms']:>9.0f} {ratio:>8.1f} {m['deadline_exceeded']:>6} {m['queue_p50_ms']:>9.0f} "
                  f"{m['server_p50_ms']:>10.0f} {json.dumps(other):<14}")
    for row in rows:
        print(f"{row['server']}: health Check every 100 ms during the load: {row['health_checks']} checks, "
              f"p50 {row['health_p50_ms']:.1f} ms, p99 {row['health_p99_ms']:.1f} ms, max {row['health_max_ms']:.1f} ms")
    if rows:
        print(f"{rows[0]['clients']} clients, requests sent after a {rows[0]['warmup_s']:g} s warm-up, over "
              f"{rows[0]['wall_s']:.0f} s until the last finished; deadline {rows[0]['deadline_s']:g} s; "
              "p99/solo = FEM p99 under the mix / FEM p50 alone on the same server; missed = DEADLINE_EXCEEDED; "
              "queue and server p50: what the server reports (waiting for a worker; arrival to response)")


def scenario_batching(args, models, image, levels) -> list:
    """FEM requests/s at each concurrency, cross-request batching off and on, the two alternated per level."""
    servers = {"off": ServerProcess(models, args.workers, args.batch_size, queue_size=max(64, 2 * max(levels)),
                                    extra=["--max-queue-delay-ms", "off"]),
               "on": ServerProcess(models, args.workers, args.batch_size, queue_size=max(64, 2 * max(levels)),
                                   extra=["--max-queue-delay-ms", str(args.queue_delay_ms), "--metrics-port", "0"])}
    rows = []
    try:
        for concurrency in levels:
            row = {"concurrency": concurrency}
            for label, server in servers.items():
                before = (server.counter("explainrt_batched_rows"), server.counter("explainrt_batched_engine_calls")) \
                    if server.metrics_port else None
                r = run_level(f"127.0.0.1:{server.port}", "fem", image, concurrency, args.duration)
                if before is not None:  # images per engine call of the batcher during this level
                    rows_run = server.counter("explainrt_batched_rows") - before[0]
                    calls = server.counter("explainrt_batched_engine_calls") - before[1]
                    r["images_per_engine_call"] = rows_run / calls if calls else float("nan")
                row[label] = r
            rows.append(row)
            print(f"batching c={concurrency}: off {row['off']['throughput_rps']:.1f}/s, "
                  f"on {row['on']['throughput_rps']:.1f}/s", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    return rows


def print_batching(rows, delay_ms: float) -> None:
    header = (f"{'clients':>7} {'off req/s':>9} {'on req/s':>9} {'on/off':>6} {'off p50':>8} {'on p50':>8} "
              f"{'off p99':>8} {'on p99':>8} {'err':>3} {'img/call':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        off, on = row["off"], row["on"]
        print(f"{row['concurrency']:>7} {off['throughput_rps']:>9.1f} {on['throughput_rps']:>9.1f} "
              f"{on['throughput_rps'] / off['throughput_rps']:>6.2f} {off['p50_ms']:>8.1f} {on['p50_ms']:>8.1f} "
              f"{off['p99_ms']:>8.1f} {on['p99_ms']:>8.1f} {off['errors'] + on['errors']:>3} "
              f"{on.get('images_per_engine_call', float('nan')):>8.2f}")
    print(f"FEM (1 forward pass per request); on = --max-queue-delay-ms {delay_ms:g}, off = --max-queue-delay-ms off; "
          "the two servers alternate level by level; latencies in ms; img/call = images per engine call of the "
          "batching server's batcher (base passes of different requests merged)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="fem,scorecam")
    parser.add_argument("--levels", default="1,2,4,8", help="concurrency levels")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per level (each client sends >= 1)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default=None, help="an exported .onnx (default: export EfficientNet-Lite0)")
    parser.add_argument("--inprocess", action="store_true", help="run the server in this process")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out"))
    parser.add_argument("--scenario", default="sweep", choices=("sweep", "mixed", "batching", "all"),
                        help="sweep: per-method concurrency sweep + overhead; mixed: 80/10/10 FEM/SIDU/Score-CAM "
                             "load; batching: FEM req/s with cross-request batching off vs on (--levels)")
    parser.add_argument("--mixed-clients", type=int, default=32)
    parser.add_argument("--mixed-duration", type=float, default=60.0)
    parser.add_argument("--deadline", type=float, default=30.0, help="per-request deadline of the mixed load (s)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="mixed load: seconds of load before requests are counted (every client's first request "
                             "arrives at once)")
    parser.add_argument("--queue-delay-ms", type=float, default=2.0, help="--max-queue-delay-ms of the batching run")
    parser.add_argument("--baseline-tree", default=None,
                        help="a checkout of an earlier explainrt (e.g. `git worktree add /tmp/base 1c50bde`) whose "
                             "server runs the mixed load first, for a side-by-side comparison")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    levels = [int(c) for c in args.levels.split(",")]
    image = bench_image()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally blocks: stop the server
    with tempfile.TemporaryDirectory() as models:
        model = os.path.join(models, "lite0.onnx")
        if args.model:
            os.symlink(os.path.abspath(args.model), model)
        else:
            from explainrt.export import export_zoo_model

            print("exporting efficientnet-lite0 …", file=sys.stderr)
            export_zoo_model("efficientnet-lite0", model)
        mixed, batching = [], []
        if args.scenario in ("mixed", "all"):
            mixed = scenario_mixed(args, models, image)
        if args.scenario in ("batching", "all"):
            batching = scenario_batching(args, models, image, levels)
        server_cls = InProcessServer if args.inprocess else ServerProcess
        rows, overheads = [], []
        if args.scenario not in ("sweep", "all"):
            methods = []
        server = server_cls(models, args.workers, args.batch_size, queue_size=max(64, 2 * max(levels))) \
            if methods else None
        try:
            for method in methods:
                url = f"127.0.0.1:{server.port}"
                overheads.append(measure_overhead(url, model, method, image, args.batch_size, args.duration))
                print(f"{method} overhead: {overheads[-1]['overhead_p50_ms']:.2f} ms "
                      f"({overheads[-1]['pairs']} pairs)", file=sys.stderr)
                for concurrency in levels:
                    rows.append(run_level(url, method, image, concurrency, args.duration))
                    print(f"{method} c={concurrency}: {rows[-1]['requests']} requests, "
                          f"p50 {rows[-1]['p50_ms']:.1f} ms", file=sys.stderr)
        finally:
            if server is not None:
                server.stop()

    if mixed:
        print_mixed(mixed)
        print()
    if batching:
        print_batching(batching, args.queue_delay_ms)
        print()
    if not methods:
        return _write(args, rows, overheads, mixed, batching)
    header = (f"{'method':<9} {'conc':>4} {'reqs':>5} {'err':>3} {'thru/s':>8} {'p50 ms':>9} {'p90 ms':>9} "
              f"{'p99 ms':>9} {'per-req ovh':>11}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['method']:<9} {row['concurrency']:>4} {row['requests']:>5} {row['errors']:>3} "
              f"{row['throughput_rps']:>8.2f} {row['p50_ms']:>9.1f} {row['p90_ms']:>9.1f} {row['p99_ms']:>9.1f} "
              f"{row['per_request_overhead_p50_ms']:>11.2f}")
    print()
    header = f"{'method':<9} {'pairs':>5} {'in-process p50':>14} {'end-to-end p50':>14} {'overhead':>9} {'per-req ovh':>11}"
    print(header)
    print("-" * len(header))
    for row in overheads:
        print(f"{row['method']:<9} {row['pairs']:>5} {row['in_process_p50_ms']:>14.2f} {row['end_to_end_p50_ms']:>14.2f} "
              f"{row['overhead_p50_ms']:>9.2f} {row['per_request_overhead_p50_ms']:>11.2f}")
    print("ms; image 224x224 uint8 RGB in, float32 224x224 map back; overhead = end-to-end p50 − in-process "
          "p50 (interleaved, concurrency 1); per-req ovh = p50 of (end to end − server-reported explainer time).")
    return _write(args, rows, overheads, mixed, batching)


def _write(args, rows, overheads, mixed, batching) -> int:
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    path = os.path.join(args.out, f"serve_bench-{args.scenario}-{stamp}.json")
    with open(path, "w") as fh:
        json.dump({"date": stamp, "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                   "load_average_at_end": os.getloadavg(),
                   "server": "in-process" if args.inprocess else "subprocess", "workers": args.workers,
                   "batch_size": args.batch_size, "duration_s": args.duration, "model": "efficientnet-lite0"
                   if not args.model else args.model, "image": "224x224 uint8", "rows": rows,
                   "overhead": overheads, "scenario": args.scenario, "mixed": mixed, "batching": batching},
                  fh, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
