"""The server under hostile and mixed traffic: idle streams, garbage bytes, call caps, dead work, batching."""
from __future__ import annotations

import queue
import statistics
import threading
import time

import grpc
import numpy as np
import pytest

from explainrt.client import ExplainClient, RemoteError
from explainrt.errors import InvalidInputError
from explainrt.proto.explainrt.v1 import explainrt_pb2 as pb
from serve_helpers import start_server, wait_for

SERVICE = "/explainrt.v1.ExplainService/"


def _idle_streams(channel, count):
    """``count`` ExplainStream calls that send nothing and wait: each would hold a thread of a sync server."""
    blockers, calls = [], []
    for _ in range(count):
        gate = queue.Queue()
        blockers.append(gate)
        stream = channel.stream_stream(SERVICE + "ExplainStream")
        calls.append(stream(iter(gate.get, None), timeout=60))
    return blockers, calls


def _close(blockers, calls):
    for gate in blockers:
        gate.put(None)
    for call in calls:
        call.cancel()


def test_idle_streams_do_not_starve_health_and_metadata(model_dir):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    srv = start_server(model_dir)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    blockers, calls = _idle_streams(channel, 150)  # more than the 98 RPC threads the old server had
    try:
        assert wait_for(lambda: srv.servicer.active_calls == 150, timeout=10)
        health = health_pb2_grpc.HealthStub(channel)
        seconds = []
        with ExplainClient(f"127.0.0.1:{srv.port}", model="tiny") as client:
            for _ in range(10):
                t0 = time.perf_counter()
                status = health.Check(health_pb2.HealthCheckRequest(service="tiny"), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING
                assert [m["name"] for m in client.list_models()] == ["tiny", "tiny2"]
                seconds.append(time.perf_counter() - t0)
            assert client.explain(np.zeros((32, 32, 3), np.uint8), "fem").forward_passes == 1  # work still flows
        assert statistics.median(seconds) < 0.1, seconds
    finally:
        _close(blockers, calls)
        channel.close()
        srv.stop(grace=0)


def test_too_many_open_calls_are_refused_with_a_reason_and_health_still_answers(model_dir):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    srv = start_server(model_dir, max_calls=3)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    blockers, calls = _idle_streams(channel, 3)
    try:
        assert wait_for(lambda: srv.servicer.active_calls == 3, timeout=10)
        with ExplainClient(f"127.0.0.1:{srv.port}", model="tiny", retries=0) as client:
            with pytest.raises(RemoteError) as err:
                client.explain(np.zeros((32, 32, 3), np.uint8), "fem")
            assert err.value.code == "RESOURCE_EXHAUSTED" and "--max-calls" in err.value.message
            assert client.health("tiny") == "SERVING"
        _close(blockers, calls)
        blockers, calls = [], []
        assert wait_for(lambda: srv.servicer.active_calls == 0, timeout=10)
        with ExplainClient(f"127.0.0.1:{srv.port}", model="tiny") as client:
            assert client.explain(np.zeros((32, 32, 3), np.uint8), "fem").forward_passes == 1
    finally:
        _close(blockers, calls)
        channel.close()
        srv.stop(grace=0)


@pytest.mark.parametrize("method", ["Explain", "ListModels", "GetModelMetadata"])
def test_bytes_that_are_not_protobuf_are_invalid_argument(server, method):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        call = channel.unary_unary(SERVICE + method)
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff\xff", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid" in err.value.details()
    finally:
        channel.close()


def test_garbage_stream_item_is_an_item_error_and_the_stream_goes_on(server, client):
    good = client.request(np.zeros((32, 32, 3), np.uint8), method="fem").SerializeToString()
    stream = client.channel.stream_stream(SERVICE + "ExplainStream", response_deserializer=pb.ExplainStreamResponse.FromString)
    replies = [r for r in stream(iter([b"\x0a\xff\xff", good]), timeout=10) if not r.HasField("progress")]
    assert [r.index for r in replies] == [0, 1]
    assert replies[0].error.code_name == "INVALID_ARGUMENT" and "not a valid ExplainRequest" in replies[0].error.message
    assert replies[1].result.forward_passes == 1


def test_priority_out_of_range_is_invalid_argument(server, client):
    request = client.request(np.zeros((32, 32, 3), np.uint8), method="fem")
    request.priority = 99
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Explain(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in err.value.details()


def test_expired_requests_do_not_keep_their_queue_slot(model_dir):
    """One worker busy, a queue of 2 filled with requests whose deadline passes: a new one is still taken."""
    srv = start_server(model_dir, workers=1, cheap_workers=0, queue_size=2)
    try:
        with ExplainClient(f"127.0.0.1:{srv.port}", model="tiny", retries=0) as client:
            image = np.zeros((32, 32, 3), np.uint8)
            long_call = client.stub.Explain.future(client.request(image, "rise", params={"n_masks": 200000}),
                                                   timeout=30)
            assert wait_for(lambda: srv.scheduler.running == 1)
            doomed = [client.stub.Explain.future(client.request(image, "fem"), timeout=0.3) for _ in range(2)]
            for call in doomed:
                with pytest.raises(grpc.RpcError) as err:
                    call.result()
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert wait_for(lambda: srv.scheduler.depth == 0, timeout=2)  # the server sees the deadline a moment later
            accepted = client.stub.Explain.future(client.request(image, "fem"), timeout=30)
            long_call.cancel()
            assert accepted.result().forward_passes == 1  # not RESOURCE_EXHAUSTED behind dead work
    finally:
        srv.stop(grace=0)


# ---- cross-request batching -------------------------------------------------------------------
class _RecordingEngine:
    """Wraps a real engine: records the batch size of every call; a row of -999 makes the call fail."""

    def __init__(self, engine):
        self.inner = engine
        self.batches = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, inputs, names=None):
        x = inputs[self.inner.metadata.input_name]
        self.batches.append(int(x.shape[0]))
        if (x == -999).any():
            raise RuntimeError("poisoned input")
        return self.inner.run(inputs, names)


@pytest.fixture(scope="module")
def tiny_engine(model_dir):
    from explainrt.runtime import load_engine

    engine = load_engine(f"{model_dir}/tiny.onnx", max_batch=8)
    yield engine
    engine.close()


def _concurrently(fns):
    results = [None] * len(fns)

    def run(i):
        try:
            results[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001
            results[i] = exc
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_base_passes_share_one_engine_call_and_equal_unbatched_ones(tiny_engine):
    from explainrt.server.batcher import BatchingEngine, request_scope

    recorder = _RecordingEngine(tiny_engine)
    batcher = BatchingEngine(recorder, max_queue_delay_s=1.0)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    entered = threading.Barrier(4)

    def request(x):
        def run():
            with request_scope(batcher, cheap=True):
                entered.wait(5)  # all four requests are in flight before any call: they batch
                return batcher.base_pass(x)
        return run

    try:
        results = _concurrently([request(x) for x in xs])
        assert recorder.batches == [4]  # one engine call for the four base passes
        for x, got in zip(xs, results):
            want = tiny_engine.base_pass(x)
            np.testing.assert_array_equal(got.probs, want.probs)
            np.testing.assert_array_equal(got.activations, want.activations)
            np.testing.assert_array_equal(got.logits, want.logits)
        assert batcher.stats.merged_calls == 4
    finally:
        batcher.close()


def test_partial_chunks_of_different_requests_fill_one_batch_and_full_ones_run_alone(tiny_engine):
    from explainrt.server.batcher import BatchingEngine, request_scope

    recorder = _RecordingEngine(tiny_engine)
    batcher = BatchingEngine(recorder, max_queue_delay_s=1.0)
    rng = np.random.default_rng(1)
    chunks = [rng.standard_normal((n, 3, 32, 32)).astype(np.float32) for n in (3, 5, 8)]
    entered = threading.Barrier(3)

    def request(x):
        def run():
            with request_scope(batcher, cheap=False):
                entered.wait(5)
                return batcher.infer(x, [batcher.metadata.probs_output])
        return run

    try:
        results = _concurrently([request(x) for x in chunks])
        assert sorted(recorder.batches) == [8, 8]  # 3 + 5 packed together; the full chunk of 8 alone
        for x, got in zip(chunks, results):
            want = tiny_engine.infer(x, [tiny_engine.metadata.probs_output])
            np.testing.assert_array_equal(got[tiny_engine.metadata.probs_output], want[tiny_engine.metadata.probs_output])
    finally:
        batcher.close()


def test_a_failing_call_fails_only_its_own_request(tiny_engine):
    from explainrt.server.batcher import BatchingEngine, request_scope

    recorder = _RecordingEngine(tiny_engine)
    batcher = BatchingEngine(recorder, max_queue_delay_s=1.0)
    good = np.zeros((1, 3, 32, 32), np.float32)
    bad = np.full((1, 3, 32, 32), -999, np.float32)
    entered = threading.Barrier(3)

    def request(x):
        def run():
            with request_scope(batcher, cheap=True):
                entered.wait(5)
                return batcher.base_pass(x)
        return run

    try:
        results = _concurrently([request(good), request(bad), request(good)])
        assert isinstance(results[1], RuntimeError) and "poisoned" in str(results[1])
        want = tiny_engine.base_pass(good)
        for got in (results[0], results[2]):
            np.testing.assert_array_equal(got.probs, want.probs)
        assert recorder.batches[0] == 3 and sorted(recorder.batches[1:]) == [1, 1, 1]  # merged, then retried alone
    finally:
        batcher.close()


def test_arrays_cross_threads_through_the_engines_handoff_and_receive(tiny_engine):
    """Stream order on a GPU: inputs are handed off on the caller's thread and received on the executor's,
    outputs the other way round (Engine.handoff/receive; pass-throughs on the CPU)."""
    from explainrt.server.batcher import BatchingEngine, request_scope

    events = []

    class Tracing(_RecordingEngine):
        def handoff(self, arrays):
            events.append(("handoff", sorted(arrays), threading.current_thread().name))
            return self.inner.handoff(arrays)

        def receive(self, item, copy=True):
            events.append(("receive", sorted(item.arrays), threading.current_thread().name))
            return self.inner.receive(item, copy)

    batcher = BatchingEngine(Tracing(tiny_engine), max_queue_delay_s=0.0)
    try:
        with request_scope(batcher, cheap=False), request_scope(batcher, cheap=False):  # two requests in flight
            batcher.infer(np.zeros((2, 3, 32, 32), np.float32), [tiny_engine.metadata.probs_output])
    finally:
        batcher.close()
    me, probs = threading.current_thread().name, [tiny_engine.metadata.probs_output]
    assert [(kind, names, thread == me) for kind, names, thread in events] == [
        ("handoff", ["x"], True), ("receive", ["x"], False), ("handoff", probs, False), ("receive", probs, True)]


def test_a_lone_request_does_not_wait_for_the_batching_window(tiny_engine):
    from explainrt.server.batcher import BatchingEngine, request_scope

    recorder = _RecordingEngine(tiny_engine)
    threads = []
    recorder.run = lambda inputs, names=None: (threads.append(threading.current_thread().name),
                                               tiny_engine.run(inputs, names))[1]
    batcher = BatchingEngine(recorder, max_queue_delay_s=2.0)
    try:
        with request_scope(batcher, cheap=True):
            t0 = time.perf_counter()
            batcher.base_pass(np.zeros((1, 3, 32, 32), np.float32))
            assert time.perf_counter() - t0 < 1.0  # nobody else in flight: no 2 s wait
        assert threads == [threading.current_thread().name]  # and no hand-over to an executor thread
    finally:
        batcher.close()


def test_batched_server_results_equal_unbatched_ones_exactly(model_dir):
    """The same concurrent traffic on a batching server and on one without: identical maps and scores."""
    rng = np.random.default_rng(2)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(6)]
    jobs = [(img, method) for img in images for method in ("fem", "sidu", "scorecam")]
    outputs = {}
    for label, delay in (("batched", 50.0), ("unbatched", None)):
        srv = start_server(model_dir, workers=4, max_queue_delay_ms=delay)
        try:
            with ExplainClient(f"127.0.0.1:{srv.port}", model="tiny", timeout=30) as client:
                outputs[label] = _concurrently([lambda img=img, m=m: client.explain(img, m) for img, m in jobs])
            if delay is not None:
                engine = srv.models.get("tiny").explainer.engine
                assert engine.stats.merged_calls > 0, "no two requests ever shared an engine call"
        finally:
            srv.stop(grace=0)
    for batched, unbatched in zip(outputs["batched"], outputs["unbatched"]):
        np.testing.assert_array_equal(batched.saliency_maps, unbatched.saliency_maps)
        assert batched.predictions == unbatched.predictions and batched.forward_passes == unbatched.forward_passes


def test_an_engine_without_an_express_instance_never_runs_two_calls_at_once(tiny_engine):
    """TensorRT contexts and torch CUDA graphs take one run at a time: lone-request calls and executor
    batches must exclude each other."""
    from explainrt.server.batcher import BatchingEngine, request_scope

    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    class Exclusive(_RecordingEngine):
        def run(self, inputs, names=None):
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.002)
            try:
                return self.inner.run(inputs, names)
            finally:
                with lock:
                    state["now"] -= 1

    batcher = BatchingEngine(Exclusive(tiny_engine), max_queue_delay_s=0.001)
    x = np.zeros((1, 3, 32, 32), np.float32)

    def request(scoped):
        def run():
            for _ in range(10):
                if scoped:
                    with request_scope(batcher, cheap=False):
                        batcher.base_pass(x)
                else:
                    batcher.base_pass(x)
            return True
        return run

    try:
        results = _concurrently([request(i % 2 == 0) for i in range(6)])
        assert results == [True] * 6
        assert state["most"] == 1
    finally:
        batcher.close()


def test_priority_travels_from_the_client_and_orders_waiting_requests(model_dir):
    """One worker busy; a low- and a high-priority RISE wait; the high one runs first."""
    srv = start_server(model_dir, workers=1, cheap_workers=0, queue_size=4)
    try:
        with ExplainClient(f"127.0.0.1:{srv.port}", model="tiny", retries=0) as client:
            image = np.zeros((32, 32, 3), np.uint8)
            blocker = client.stub.Explain.future(client.request(image, "rise", params={"n_masks": 3000}), timeout=30)
            assert wait_for(lambda: srv.scheduler.running == 1)
            low = client.stub.Explain.future(client.request(image, "rise", params={"n_masks": 200}, priority=-3),
                                             timeout=30)
            assert wait_for(lambda: srv.scheduler.depth == 1)
            high = client.stub.Explain.future(client.request(image, "rise", params={"n_masks": 400}, priority=4),
                                              timeout=30)
            assert wait_for(lambda: srv.scheduler.depth == 2)
            done = []
            for name, call in (("low", low), ("high", high)):
                call.add_done_callback(lambda _c, n=name: done.append(n))
            blocker.result(), low.result(), high.result()
            assert done == ["high", "low"]  # the costlier but higher-priority request went first
        with pytest.raises(InvalidInputError, match="priority"):
            client.request(image, "fem", priority=11)
    finally:
        srv.stop(grace=0)


def test_a_failing_hand_back_or_metrics_call_never_kills_the_executor(tiny_engine):
    """Whatever raises after the engine run (metrics, the output hand-back) fails that call alone."""
    from explainrt.server.batcher import BatchingEngine, request_scope

    failures = {"handoff": 1}

    class FlakyHandBack(_RecordingEngine):
        def handoff(self, arrays):
            if "x" not in arrays and failures["handoff"]:
                failures["handoff"] -= 1
                raise RuntimeError("stream record failed")
            return self.inner.handoff(arrays)

    def broken_metrics(calls, rows):
        raise ValueError("metrics backend down")

    batcher = BatchingEngine(FlakyHandBack(tiny_engine), max_queue_delay_s=0.0, on_batch=broken_metrics)
    x = np.zeros((1, 3, 32, 32), np.float32)
    try:
        with request_scope(batcher, cheap=False), request_scope(batcher, cheap=False):  # not a lone request
            with pytest.raises(RuntimeError, match="stream record failed"):
                batcher.base_pass(x)
            results = _concurrently([lambda: batcher.base_pass(x) for _ in range(3)])  # the executor lives on
        want = tiny_engine.base_pass(x)
        for got in results:
            np.testing.assert_array_equal(got.probs, want.probs)
    finally:
        batcher.close()


def test_cheap_calls_do_not_starve_a_full_chunk_without_an_express_instance(tiny_engine):
    """The GPU serving path (TensorRT, torch): one executor; a full chunk never fits beside a one-image call,
    so without aging a steady stream of cheap calls would keep it waiting for ever."""
    from explainrt.server.batcher import BatchingEngine, request_scope

    batcher = BatchingEngine(tiny_engine, max_queue_delay_s=0.0)
    stop = threading.Event()
    one, full = np.zeros((1, 3, 32, 32), np.float32), np.zeros((8, 3, 32, 32), np.float32)

    def cheap_traffic():
        with request_scope(batcher, cheap=True):
            while not stop.is_set():
                batcher.base_pass(one)

    senders = [threading.Thread(target=cheap_traffic) for _ in range(4)]
    try:
        for t in senders:
            t.start()
        time.sleep(0.1)

        def expensive():
            with request_scope(batcher, cheap=False):
                batcher.infer(full, [tiny_engine.metadata.probs_output])

        chunk = threading.Thread(target=expensive)
        chunk.start()
        chunk.join(1.0)
        assert not chunk.is_alive()  # served within about AGED_CALL_S, not when the cheap load stops
    finally:
        stop.set()
        for t in senders:
            t.join(5)
        batcher.close()


def test_a_queued_engine_call_is_withdrawn_when_its_request_is_cancelled(tiny_engine):
    from explainrt.explainers.driver import Cancelled
    from explainrt.server.batcher import BatchingEngine, request_scope

    release = threading.Event()

    class Slow(_RecordingEngine):
        def run(self, inputs, names=None):
            release.wait(5)
            return self.inner.run(inputs, names)

    batcher = BatchingEngine(Slow(tiny_engine), max_queue_delay_s=0.0)
    x = np.zeros((1, 3, 32, 32), np.float32)
    cancel = threading.Event()
    try:
        with request_scope(batcher, cheap=False):
            blocker = threading.Thread(target=lambda: batcher.base_pass(x))  # holds the one engine slot
            blocker.start()
            assert wait_for(lambda: batcher._executing == 1)
            with request_scope(batcher, cheap=False, cancel=cancel):
                threading.Timer(0.1, cancel.set).start()
                t0 = time.perf_counter()
                with pytest.raises(Cancelled, match="waited for a batch"):
                    batcher.base_pass(x)
                assert time.perf_counter() - t0 < 2.0 and not batcher._queue
            release.set()
            blocker.join(5)
    finally:
        release.set()
        batcher.close()
