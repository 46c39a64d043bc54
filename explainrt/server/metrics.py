"""Prometheus metrics of one server (its own registry, so several servers can share a process).

Masked passes per second: ``rate(explainrt_masked_passes_total[1m])`` in PromQL, or the gauge
``explainrt_masked_passes_per_second`` (the last 10 s, for a glance at the raw endpoint).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Optional

from ..errors import require
from .logs import log_event

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RateMeter:
    """Events per second over the last ``window`` seconds."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self._events: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def add(self, count: float, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._events.append((now, count))
            self._trim(now)

    def rate(self, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(count for _, count in self._events) / self.window

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()


class ServerMetrics:
    """Request counts and latencies by RPC, explanation method and status code; queue and pass counters."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float]):
        prom = require("prometheus_client", "serve", "the server's metrics")
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "explainrt_requests", "Requests (stream items count one each) by RPC, method and gRPC status code",
            ["rpc", "method", "code"], registry=self.registry)
        self.latency = prom.Histogram(
            "explainrt_request_latency_seconds", "Server-side latency from arrival to response, by RPC and method",
            ["rpc", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = prom.Histogram(
            "explainrt_queue_wait_seconds", "Time requests wait for a worker, by method", ["method"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = prom.Counter(
            "explainrt_batched_rows", "Rows (images) the cross-request batcher sent through the engine",
            ["model"], registry=self.registry)
        self.batch_calls = prom.Counter(
            "explainrt_batched_engine_calls", "Engine calls made by the cross-request batcher", ["model"],
            registry=self.registry)
        self.batch_merged = prom.Counter(
            "explainrt_batched_merged_calls", "Engine calls of requests that shared an engine batch with another "
            "request's", ["model"], registry=self.registry)
        self.masked_passes = prom.Counter(
            "explainrt_masked_passes", "Masked forward passes run (rate() gives passes per second)",
            ["model", "method"], registry=self.registry)
        self.pass_rate = RateMeter()
        prom.Gauge("explainrt_masked_passes_per_second", "Masked forward passes per second over the last 10 s",
                   registry=self.registry).set_function(self.pass_rate.rate)
        self.forward_passes = prom.Counter(
            "explainrt_forward_passes", "Forward passes of completed requests, base passes included",
            ["model", "method"], registry=self.registry)
        depth = prom.Gauge("explainrt_queue_depth", "Requests waiting for a worker", registry=self.registry)
        depth.set_function(queue_depth)
        busy = prom.Gauge("explainrt_requests_running", "Requests a worker is executing", registry=self.registry)
        busy.set_function(running)
        self._http = None

    def count_masked_passes(self, model: str, method: str, count: int) -> None:
        """Add ``count`` masked passes (called from the explainer's progress callback)."""
        self.masked_passes.labels(model, method).inc(count)
        self.pass_rate.add(count)

    def observe_queue_wait(self, method: str, seconds: float) -> None:
        """Time one request waited for a worker."""
        self.queue_wait.labels(method).observe(seconds)

    def observe_batch(self, model: str, calls: int, rows: int) -> None:
        """One engine call of the cross-request batcher, carrying ``calls`` requests' calls and ``rows`` images."""
        self.batch_calls.labels(model).inc()
        self.batch_rows.labels(model).inc(rows)
        if calls > 1:
            self.batch_merged.labels(model).inc(calls)

    def observe(self, rpc: str, method: str, code: str, seconds: float) -> None:
        """Count one finished request and its latency."""
        self.requests.labels(rpc, method, code).inc()
        self.latency.labels(rpc, method).observe(seconds)

    def masked_pass_total(self, model: Optional[str] = None, method: Optional[str] = None) -> float:
        """Sum of the masked-pass counter over matching labels (for tests and logs)."""
        total = 0.0
        for family in self.registry.collect():
            if family.name != "explainrt_masked_passes":
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                if model is not None and sample.labels.get("model") != model:
                    continue
                if method is not None and sample.labels.get("method") != method:
                    continue
                total += sample.value
        return total

    def render(self) -> bytes:
        """The exposition text (what the HTTP endpoint serves)."""
        prom = require("prometheus_client", "serve", "the server's metrics")
        return prom.generate_latest(self.registry)

    def start_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics on ``port`` (0: any free port); returns the bound port."""
        prom = require("prometheus_client", "serve", "the server's metrics")
        server, thread = prom.start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        bound = server.server_address[1]
        log_event(log, "metrics_listening", host=host, port=bound)
        return bound

    def stop_http(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
