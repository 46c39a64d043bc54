"""Client-side balancing over three real `explainrt serve` processes on loopback.

Requests spread over every replica (round robin), a replica killed with SIGKILL mid-run loses no
request (gRPC retries UNAVAILABLE on another one; a broken stream goes on from its first
unanswered item), and one that drains on SIGTERM stops getting requests (its health turns
NOT_SERVING, which the balanced channel watches).
"""
from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from explainrt.client import ExplainClient, RemoteError, RemoteExplanation, channel_target
from explainrt.errors import InvalidInputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = np.random.default_rng(3).integers(0, 256, (24, 24, 3), dtype=np.uint8)
RISE = {"method": "rise", "params": {"n_masks": 400, "grid_size": 2, "seed": 0}}  # tens of ms on the tiny model


class Replica:
    """One `explainrt serve` process on a free loopback port."""

    def __init__(self, models: str):
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "explainrt", "serve", "--models", models, "--host", "127.0.0.1", "--port", "0",
             "--workers", "2", "--grace", "10", "--log-format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.port = 0

    def wait_serving(self) -> "Replica":
        listening = self.proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", listening)
        assert match, f"unexpected first line {listening!r}"
        self.port = int(match.group(1))
        assert "serving tiny" in self.proc.stdout.readline()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def name(self) -> str:  # the server's default --replica-name
        return f"{socket.gethostname()}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def replicas(single_model_dir):
    started = [Replica(single_model_dir) for _ in range(3)]  # start together, then wait
    try:
        yield [r.wait_serving() for r in started]
    finally:
        for r in started:
            r.stop()


def _balanced(replicas, **options) -> ExplainClient:
    client = ExplainClient(",".join(r.address for r in replicas), timeout=30, model="tiny", **options)
    client.wait_until_serving(10)
    return client


def _explain_all(client, count: int, threads: int, on_answer=None) -> list:
    """``count`` RISE requests from ``threads`` threads; every outcome (result or exception), by index."""
    results: list = [None] * count
    counter = iter(range(count))
    lock = threading.Lock()

    def run():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                results[i] = client.explain(IMAGE, **RISE)
            except Exception as exc:  # recorded for the assertions
                results[i] = exc
            if on_answer is not None:
                on_answer(results[i])

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    return results


def test_requests_spread_over_every_replica_and_say_which_answered(replicas):
    with ExplainClient(replicas[0].address, timeout=30, model="tiny") as alone:
        reference = alone.explain(IMAGE, **RISE)
    assert reference.replica == replicas[0].name and not alone.balanced
    with _balanced(replicas) as client:
        assert client.balanced and client.target.startswith("ipv4:")
        seen = set()
        for _ in range(50):  # until every replica is connected and SERVING for the channel
            seen.add(client.explain(IMAGE, "fem").replica)
            if len(seen) == 3:
                break
        results = _explain_all(client, 30, threads=1)
        counts = collections.Counter(r.replica for r in results)
        assert set(counts) == {r.name for r in replicas}, counts
        assert min(counts.values()) >= 8, counts  # round robin: 10 each once all are ready
        for r in results:  # the same model answers the same on every replica
            np.testing.assert_array_equal(r.saliency_maps, reference.saliency_maps)
        streamed = {item.replica for _ in range(6) for item in client.stream([{"image": IMAGE, "method": "fem"}])}
        assert len(streamed) >= 2, "streams are balanced too"


def test_sigkill_mid_run_loses_no_request(replicas):
    victim = replicas[1]
    answered = collections.Counter()
    killed = threading.Event()
    lock = threading.Lock()

    def on_answer(result):
        with lock:
            answered[getattr(result, "replica", "error")] += 1
            if not killed.is_set() and sum(answered.values()) >= 15:
                killed.set()
                victim.proc.send_signal(signal.SIGKILL)

    with _balanced(replicas) as client:
        results = _explain_all(client, 60, threads=4, on_answer=on_answer)
        assert victim.proc.wait(10) == -signal.SIGKILL
        errors = [r for r in results if not isinstance(r, RemoteExplanation)]
        assert not errors, errors[:3]
        assert all(r.forward_passes == 401 for r in results)
        counts = collections.Counter(r.replica for r in results)
        assert counts[victim.name] < 30 and sum(counts.values()) == 60, counts
        # A stream on the replica about to die: it breaks, and goes on elsewhere from its first unanswered item.
        items = [{"image": IMAGE, **RISE, "request_id": str(i)} for i in range(12)]
        survivors = [r for r in replicas if r is not victim]
        target = survivors[0]
        with ExplainClient(",".join(r.address for r in survivors), timeout=30, model="tiny") as pair:
            pair.wait_until_serving(10)
            seen = []
            for item in pair.stream(items):
                seen.append(item)
                if len(seen) == 3:
                    target = next(r for r in survivors if r.name == item.replica)
                    target.proc.send_signal(signal.SIGKILL)
        assert [type(i).__name__ for i in seen] == ["RemoteExplanation"] * 12, seen
        assert [i.request_id for i in seen] == [str(i) for i in range(12)]
        assert seen[-1].replica != target.name and {i.replica for i in seen[:3]} == {target.name}


def test_sigterm_drain_moves_clients_off_the_replica(replicas):
    draining = replicas[2]
    with _balanced(replicas, retries=0) as client:  # no retries: only the health watch can keep calls off it
        before = _explain_all(client, 12, threads=2)
        assert draining.name in {r.replica for r in before}
        draining.proc.send_signal(signal.SIGTERM)
        with ExplainClient(draining.address, timeout=5, retries=0) as direct:  # until its drain has begun
            deadline = time.monotonic() + 10
            while direct.health() != "NOT_SERVING" and time.monotonic() < deadline:
                time.sleep(0.02)
        time.sleep(0.5)  # the balanced client's health watch sees it too
        after = _explain_all(client, 30, threads=2)
        assert all(isinstance(r, RemoteExplanation) for r in after), [r for r in after if isinstance(r, Exception)]
        counts = collections.Counter(r.replica for r in after)
        assert draining.name not in counts and len(counts) == 2, counts
        assert draining.proc.wait(20) == 0  # drained and exited cleanly


def test_addresses_and_their_errors():
    assert channel_target("127.0.0.1:5") == ("127.0.0.1:5", ["127.0.0.1"], False)
    assert channel_target("127.0.0.1:5, 127.0.0.1:6") == ("ipv4:127.0.0.1:5,127.0.0.1:6",
                                                         ["127.0.0.1", "127.0.0.1"], True)
    assert channel_target(["[::1]:5", "[::1]:6"])[0] == "ipv6:[::1]:5,[::1]:6"
    assert channel_target("dns:///explainrt.default.svc.cluster.local:50051") == (
        "dns:///explainrt.default.svc.cluster.local:50051", ["explainrt.default.svc.cluster.local"], True)
    for bad, words in (("127.0.0.1", "is not HOST:PORT"), ("127.0.0.1:1,b:x", "'b:x' is not HOST:PORT"),
                       ("::1:5,::1:6", "in brackets"), ("127.0.0.1:1,[::1]:2", "mix IPv4 and IPv6"), (",", "no server")):
        with pytest.raises(InvalidInputError, match=words):
            channel_target(bad)


def test_replica_names_reach_the_client_and_the_cli(single_model_dir, png_path, tmp_path, capsys):
    import json

    from explainrt.cli import main
    from serve_helpers import start_server

    servers = [start_server(single_model_dir, replica_name=name) for name in ("pod-a", "pod-b")]
    try:
        url = ",".join(f"127.0.0.1:{s.port}" for s in servers)
        with ExplainClient(url, timeout=10) as client:
            client.wait_until_serving(10)
            assert {client.explain(IMAGE, "fem").replica for _ in range(6)} == {"pod-a", "pod-b"}
            with pytest.raises(RemoteError) as err:
                client.explain(IMAGE, "fem", model="nope")
            assert err.value.code == "NOT_FOUND" and err.value.replica in ("pod-a", "pod-b")
        assert main(["client", png_path, "--url", url, "--method", "fem,sidu", "-o", str(tmp_path / "j"),
                     "--no-progress", "--json"]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(records) == 2 and records[0]["replica"] == records[1]["replica"] in ("pod-a", "pod-b")
        assert main(["client", png_path, "--url", url, "--method", "fem", "-o", str(tmp_path / "t"),
                     "--no-progress"]) == 0
        assert re.search(r"^picture: .* \[pod-[ab]\]$", capsys.readouterr().out, re.M)
    finally:
        for s in servers:
            s.stop(grace=0)


def test_connections_closed_by_max_age_lose_no_call(single_model_dir):
    """--max-connection-age: the server closes connections (GOAWAY) under calls in flight; none fails."""
    from serve_helpers import start_server

    srv = start_server(single_model_dir, max_connection_age_s=0.2)
    outcomes: list = []
    try:
        assert ("grpc.max_connection_age_ms", 200) in srv.config.grpc_options()
        with ExplainClient(f"127.0.0.1:{srv.port}", timeout=10, retries=0) as client:
            end = time.monotonic() + 1.5  # several connection lifetimes

            def run():
                while time.monotonic() < end:
                    try:
                        outcomes.append(client.explain(IMAGE, "fem"))
                    except Exception as exc:  # recorded for the assertion
                        outcomes.append(exc)

            threads = [threading.Thread(target=run) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
    finally:
        srv.stop(grace=0)
    assert len(outcomes) > 30 and all(isinstance(o, RemoteExplanation) for o in outcomes), \
        [o for o in outcomes if not isinstance(o, RemoteExplanation)][:3]


def test_a_dns_name_is_resolved_and_balanced_by_grpc(single_model_dir):
    """dns:///localhost:PORT: gRPC resolves the name (127.0.0.1, maybe ::1 too, where nothing listens)."""
    from serve_helpers import start_server

    srv = start_server(single_model_dir, replica_name="only")
    try:
        with ExplainClient(f"dns:///localhost:{srv.port}", timeout=10) as client:
            assert client.balanced
            client.wait_until_serving(10)
            assert {client.explain(IMAGE, "fem").replica for _ in range(3)} == {"only"}
    finally:
        srv.stop(grace=0)


def test_a_balanced_client_retries_once_per_policy_not_twice():
    """UNAVAILABLE is retried ``retries`` times in all, over one address or several (the channel's retry
    policy and the client's own loop must not multiply: 16 attempts for retries=3 before)."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    seen = []

    def refuse(request, context):
        seen.append(1)
        context.abort(grpc.StatusCode.UNAVAILABLE, "draining")

    class Refusing(grpc.GenericRpcHandler):
        def service(self, details):
            if details.method == "/explainrt.v1.ExplainService/ListModels":
                return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=lambda b: b,
                                                           response_serializer=lambda b: b)
            return None

    servers, ports = [], []
    try:
        for _ in range(2):
            server = grpc.server(futures.ThreadPoolExecutor(4))
            server.add_generic_rpc_handlers((Refusing(),))
            servicer = health.HealthServicer()
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            ports.append(server.add_insecure_port("127.0.0.1:0"))
            server.start()
            servers.append(server)
        for url in (f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"):
            seen.clear()
            with ExplainClient(url, retries=3, backoff=0.01, timeout=10) as client:
                with pytest.raises(RemoteError) as err:
                    client.list_models()
            assert err.value.code == "UNAVAILABLE" and len(seen) == 4, (url, len(seen))
    finally:
        for server in servers:
            server.stop(0)
