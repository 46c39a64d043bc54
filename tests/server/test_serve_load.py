"""Load on loopback: 32 concurrent clients, FEM and Score-CAM, bounded in count and time."""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import numpy as np

from explainrt import Explainer
from explainrt.client import ExplainClient
from serve_helpers import start_server, wait_for

CLIENTS = 32
REQUESTS_PER_CLIENT = 6  # alternating fem / scorecam: 192 requests per round


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _round(port: int, images: list) -> list:
    def one_client(i: int):
        outcomes = []
        with ExplainClient(f"127.0.0.1:{port}", timeout=60, retries=0, model="tiny") as c:
            for j in range(REQUESTS_PER_CLIENT):
                method = "fem" if (i + j) % 2 == 0 else "scorecam"
                image = images[(i + j) % len(images)]
                try:
                    result = c.explain(image, method)
                    outcomes.append((method, (i + j) % len(images), result.saliency))
                except Exception as exc:  # counted as a failure below
                    outcomes.append((method, -1, exc))
        return outcomes

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        return [o for outcomes in pool.map(one_client, range(CLIENTS)) for o in outcomes]


def test_32_concurrent_clients_no_failures_no_leaks(model_dir):
    rng = np.random.default_rng(7)
    images = [(rng.random((24 + 4 * k, 32, 3)) * 255).astype(np.uint8) for k in range(4)]
    with Explainer(os.path.join(model_dir, "tiny.onnx")) as local:
        expected = {(m, k): local.explain(img, m).saliency for m in ("fem", "scorecam") for k, img in enumerate(images)}
    baseline_threads = threading.active_count()
    srv = start_server(model_dir, workers=2, queue_size=64)
    try:
        _round(srv.port, images)  # warm-up: thread pools, allocator arenas
        rss_before = _rss_mib()
        t0 = time.perf_counter()
        outcomes = _round(srv.port, images) + _round(srv.port, images)
        seconds = time.perf_counter() - t0
        rss_growth = _rss_mib() - rss_before
        failures = [o for o in outcomes if o[1] == -1]
        assert not failures, f"{len(failures)} failed requests, e.g. {failures[0][2]!r}"
        assert len(outcomes) == 2 * CLIENTS * REQUESTS_PER_CLIENT
        for method, k, saliency in outcomes:  # answers belong to their own request, not a neighbour's
            np.testing.assert_allclose(saliency, expected[(method, k)], atol=1e-6)
        assert rss_growth < 64, f"RSS grew {rss_growth:.1f} MiB over {len(outcomes)} requests"
        assert seconds < 60
    finally:
        srv.stop(grace=5)
    assert wait_for(lambda: threading.active_count() <= baseline_threads, timeout=10), \
        f"threads leaked: {threading.active_count()} alive vs {baseline_threads} before the server " \
        f"({sorted(t.name for t in threading.enumerate())})"
