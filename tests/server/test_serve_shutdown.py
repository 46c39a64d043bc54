"""Graceful shutdown: in-flight requests finish, new ones get UNAVAILABLE, the process exits cleanly."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from explainrt.client import ExplainClient, RemoteError
from serve_helpers import start_server, wait_for

GOOD = np.full((20, 20, 3), 128, np.uint8)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RISE = {"method": "rise", "params": {"n_masks": 12_000, "grid_size": 2}}  # ~1 s each on the tiny model


def _explain_in_background(client, results, key):
    def run():
        try:
            results[key] = client.explain(GOOD, **RISE)
        except Exception as exc:  # recorded for the assertions
            results[key] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _running_requests(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return float(re.search(r"^explainrt_requests_running (\S+)$", text, re.M).group(1))


def test_stop_drains_in_flight_requests(single_model_dir):
    srv = start_server(single_model_dir, workers=1, queue_size=4)
    results: dict = {}
    with ExplainClient(f"127.0.0.1:{srv.port}", timeout=30, retries=0) as c:
        threads = [_explain_in_background(c, results, "running")]
        assert wait_for(lambda: srv.scheduler.running == 1)
        threads.append(_explain_in_background(c, results, "queued"))
        assert wait_for(lambda: srv.scheduler.depth == 1)
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 30})
        stopper.start()
        assert wait_for(lambda: not srv.scheduler.accepting)
        with pytest.raises(RemoteError) as err:
            c.explain(GOOD, "fem")
        assert err.value.code == "UNAVAILABLE" and "shutting down" in err.value.message
        assert c.health() == "NOT_SERVING" and c.health("tiny") == "NOT_SERVING"  # still answering while draining
        for thread in threads:
            thread.join(30)
        stopper.join(30)
    assert results["running"].forward_passes == 12_001
    assert results["queued"].forward_passes == 12_001, "a queued request is in flight too: it completes"
    assert srv.wait(0)


def test_a_request_sent_just_after_the_drain_still_gets_unavailable(single_model_dir):
    """Once the last explanation is answered the server lingers, refusing with UNAVAILABLE (which
    clients retry elsewhere), instead of stopping gRPC under a caller (CANCELLED, not retried)."""
    srv = start_server(single_model_dir, workers=1)
    results: dict = {}
    with ExplainClient(f"127.0.0.1:{srv.port}", timeout=30, retries=0) as c:
        thread = _explain_in_background(c, results, "running")
        assert wait_for(lambda: srv.scheduler.running == 1)
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 30})
        stopper.start()
        thread.join(30)
        assert results["running"].forward_passes == 12_001
        codes = []
        for _ in range(5):  # the client backs off between retries; each retry must still be answered
            with pytest.raises(RemoteError) as err:
                c.explain(GOOD, "fem")
            codes.append(err.value.code)
            time.sleep(0.05)
        assert codes == ["UNAVAILABLE"] * 5
        stopper.join(30)
    assert srv.wait(0)


def test_sigterm_completes_in_flight_requests_then_exits(single_model_dir):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "explainrt", "serve", "--models", single_model_dir, "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--workers", "2", "--grace", "20", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        listening = proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+) \(.*\), metrics on http://127\.0\.0\.1:(\d+)/metrics",
                          listening)
        assert match, f"unexpected first line {listening!r}; stderr: {proc.stderr.read() if proc.poll() else ''}"
        port, metrics_port = int(match.group(1)), int(match.group(2))
        assert "serving tiny" in proc.stdout.readline()
        results: dict = {}
        with ExplainClient(f"127.0.0.1:{port}", timeout=30, retries=0) as c:
            assert c.health() == "SERVING"
            threads = [_explain_in_background(c, results, i) for i in range(2)]
            assert wait_for(lambda: _running_requests(metrics_port) == 2, timeout=10)
            proc.send_signal(signal.SIGTERM)
            codes = []
            t_end = time.monotonic() + 10
            while time.monotonic() < t_end and "UNAVAILABLE" not in codes:  # until the handler has run
                try:
                    c.explain(GOOD, "fem")
                    codes.append("OK")
                except RemoteError as exc:
                    codes.append(exc.code)
            assert codes[-1] == "UNAVAILABLE", codes
            for thread in threads:
                thread.join(30)
        assert proc.wait(timeout=30) == 0
        assert [results[i].forward_passes for i in range(2)] == [12_001, 12_001]
        log = proc.stderr.read()
        assert '"event": "signal", "signal": "SIGTERM"' in log
        assert '"event": "draining"' in log and '"event": "stopped"' in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
