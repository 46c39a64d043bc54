"""Status codes: every bad input, unknown model, deadlines, cancellation, a full queue, bugs — and the
server keeps serving after each."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from explainrt.client import ExplainClient, RemoteError
from explainrt.proto.explainrt.v1 import explainrt_pb2 as pb
from explainrt.proto.codec import array_to_tensor
from serve_helpers import INPUT_HW, start_server, wait_for

GOOD = np.full((20, 20, 3), 128, np.uint8)


def _request(**fields) -> pb.ExplainRequest:
    req = pb.ExplainRequest(model="tiny", method=fields.pop("method", "fem"))
    image = fields.pop("image", GOOD)
    if isinstance(image, bytes):
        req.encoded = image
    elif image is not None:
        req.tensor.CopyFrom(image if isinstance(image, pb.Tensor) else array_to_tensor(image))
    for key, value in fields.pop("params", {}).items():
        req.params[key] = value
    req.targets.extend(fields.pop("targets", []))
    if "output" in fields:
        req.output.CopyFrom(fields.pop("output"))
    for key, value in fields.items():
        setattr(req, key, value)
    return req


def _nan_input():
    x = np.zeros((3, *INPUT_HW), np.float32)
    x[1, 2, 3] = np.nan
    return x


def _png_header(height: int, width: int) -> bytes:
    """The start of a PNG claiming a huge size: refused from its header, before any decoding."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


BAD_REQUESTS = {
    "corrupt image": (_request(image=b"\x89PNG\r\n\x1a\n garbage"), "INVALID_ARGUMENT", "could not decode"),
    "empty image bytes": (_request(image=b""), "INVALID_ARGUMENT", "is empty"),
    "no image": (_request(image=None), "INVALID_ARGUMENT", "no image"),
    "byte count": (_request(image=pb.Tensor(data=b"\0" * 10, dtype=pb.UINT8, shape=[2, 2, 3])),
                   "INVALID_ARGUMENT", "needs 12 bytes"),
    "input dtype": (_request(image=array_to_tensor(np.zeros((8, 8, 3), np.float16))), "INVALID_ARGUMENT",
                    "not accepted"),
    "channels": (_request(image=np.zeros((8, 8, 5), np.uint8)), "INVALID_ARGUMENT", "expected an RGB image"),
    "preprocessed shape": (_request(image=np.zeros((3, 16, 16), np.float32)), "INVALID_ARGUMENT", "must have shape"),
    "NaN input": (_request(image=_nan_input()), "INVALID_ARGUMENT", "NaN"),
    "unknown method": (_request(method="lime"), "INVALID_ARGUMENT", "unknown method"),
    "unknown parameter": (_request(method="rise", params={"masks": "10"}), "INVALID_ARGUMENT", "unknown parameter"),
    "parameter range": (_request(method="rise", params={"n_masks": "-5"}), "INVALID_ARGUMENT", "n_masks must be"),
    "NaN parameter": (_request(method="fem", params={"k": "NaN"}), "INVALID_ARGUMENT", "finite"),
    "parameter type": (_request(method="scorecam", params={"score": "softmax"}), "INVALID_ARGUMENT", "one of"),
    "class too large": (_request(targets=[10]), "INVALID_ARGUMENT", "out of range"),
    "negative class": (_request(targets=[-1]), "INVALID_ARGUMENT", "out of range"),
    "parameter shape": (_request(method="featurecam", params={"base_params": "[1, 2]"}), "INVALID_ARGUMENT",
                        "base_params must be a mapping"),
    "edge model path": (_request(method="featurecam", params={"edges": "/tmp/hed.onnx"}), "INVALID_ARGUMENT",
                        "not offered"),
    "overlay of a tensor": (_request(image=np.zeros((3, *INPUT_HW), np.float32), output=pb.OutputOptions(
        overlay_png=True)), "INVALID_ARGUMENT", "no original image"),
    "map dtype": (_request(output=pb.OutputOptions(saliency_dtype=pb.UINT8)), "INVALID_ARGUMENT", "FLOAT32 or FLOAT16"),
    "negative top_k": (_request(output=pb.OutputOptions(top_k=-1)), "INVALID_ARGUMENT", "top_k"),
    "no model name with two models": (_request(model=""), "INVALID_ARGUMENT", "name a model"),
    "unknown model": (_request(model="resnet"), "NOT_FOUND", "unknown model 'resnet'"),
    "too many masks": (_request(method="rise", params={"n_masks": "2000000"}), "INVALID_ARGUMENT",
                       "over this server's limit of 1000000"),
    "too many targets": (_request(targets=[0, 1, 2, 0, 1]), "INVALID_ARGUMENT", "at most 4 classes"),
    "PNG bomb": (_request(image=_png_header(9000, 5000)), "INVALID_ARGUMENT", "5000x9000 pixels"),
    "TIFF (size unknown before decoding)": (_request(image=b"II*\x00\x08\x00\x00\x00" + b"\0" * 64),
                                            "INVALID_ARGUMENT", "PNG or JPEG"),
    "too many masks in Feature CAM's RISE base": (
        _request(method="featurecam", params={"base": '"rise"', "base_params": '{"n_masks": 2000000}'}),
        "INVALID_ARGUMENT", "n_masks=2000000 is over this server's limit"),
    "huge number": (_request(method="rise", params={"p1": "1" + "0" * 400}), "INVALID_ARGUMENT", "p1 must be"),
    "unknown map dtype": (_request(output=pb.OutputOptions(saliency_dtype=99)), "INVALID_ARGUMENT",
                          "FLOAT32 or FLOAT16, got 99"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_its_code_and_the_server_keeps_serving(server, client, case):
    import explainrt.proto.explainrt.v1.explainrt_pb2_grpc as pb_grpc

    request, code, words = BAD_REQUESTS[case]
    stub = pb_grpc.ExplainServiceStub(client.channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(request, timeout=10)
    assert err.value.code().name == code
    assert words in err.value.details()
    # The same request on a stream is a per-item error; the next item still works.
    items = list(client.stream([request, {"image": GOOD, "method": "scorecam"}], timeout=10))
    assert isinstance(items[0], RemoteError) and items[0].code == code and words in items[0].message
    assert items[1].forward_passes > 1
    assert client.explain(GOOD, "fem").forward_passes == 1
    assert server.scheduler.running == 0


def test_a_bug_is_internal_and_the_server_keeps_serving(server, client, monkeypatch):
    import explainrt.server.tasks as tasks

    def broken(task, result):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(tasks, "build_response", broken)
    with pytest.raises(RemoteError) as err:
        client.explain(GOOD, "fem")
    assert err.value.code == "INTERNAL" and "ZeroDivisionError: simulated bug" in err.value.message
    monkeypatch.undo()
    assert client.explain(GOOD, "fem").forward_passes == 1


def _long_rise(n_masks: int = 400_000) -> dict:
    """RISE on the tiny model: ~60 µs per masked pass on 2 cores, so this runs for many seconds."""
    return {"method": "rise", "params": {"n_masks": n_masks, "grid_size": 2}}


@pytest.fixture
def fresh(single_model_dir):
    """A server that has measured no pace yet, so it starts a long request (one it knows is hopeless
    it refuses before starting, see test_serve_scheduler)."""
    srv = start_server(single_model_dir)
    with ExplainClient(f"127.0.0.1:{srv.port}", timeout=30, retries=0) as c:
        yield srv, c
    srv.stop(grace=0)


def test_deadline_stops_the_work(fresh):
    server, client = fresh
    before = server.metrics.masked_pass_total(method="rise")
    t0 = time.perf_counter()
    with pytest.raises(RemoteError) as err:
        client.explain(GOOD, timeout=1.0, **_long_rise())
    assert err.value.code == "DEADLINE_EXCEEDED"
    assert time.perf_counter() - t0 < 5.0  # far below the ~24 s the whole request would take
    # The worker is freed: the job stopped between two chunks, it did not run to the end.
    assert wait_for(lambda: server.scheduler.running == 0, timeout=10)
    stopped_at = server.metrics.masked_pass_total(method="rise")
    time.sleep(0.3)
    assert server.metrics.masked_pass_total(method="rise") == stopped_at, "masked passes went on after the deadline"
    assert 0 < stopped_at - before < 400_000
    assert client.explain(GOOD, "fem").forward_passes == 1


def test_client_cancel_stops_the_work(server, client, idle):
    from explainrt.proto.explainrt.v1 import explainrt_pb2_grpc as pb_grpc

    stub = pb_grpc.ExplainServiceStub(client.channel)
    before = server.metrics.masked_pass_total(method="rise")
    future = stub.Explain.future(client.request(GOOD, **_long_rise()), timeout=60)
    assert wait_for(lambda: server.metrics.masked_pass_total(method="rise") > before, timeout=5)
    future.cancel()
    assert wait_for(lambda: server.scheduler.running == 0, timeout=10)
    stopped_at = server.metrics.masked_pass_total(method="rise")
    time.sleep(0.3)
    assert server.metrics.masked_pass_total(method="rise") == stopped_at
    assert stopped_at - before < 400_000
    assert wait_for(lambda: server.metrics.requests.labels("Explain", "rise", "CANCELLED")._value.get() >= 1)


def test_stream_deadline_stops_its_items(fresh):
    server, client = fresh
    with pytest.raises(RemoteError) as err:
        list(client.stream([{"image": GOOD, **_long_rise()}, {"image": GOOD, **_long_rise()}], timeout=1.0))
    assert err.value.code == "DEADLINE_EXCEEDED"
    assert wait_for(lambda: server.scheduler.running == 0 and server.scheduler.depth == 0, timeout=10)


def test_full_queue_is_resource_exhausted_at_once(single_model_dir):
    from explainrt.proto.explainrt.v1 import explainrt_pb2_grpc as pb_grpc

    srv = start_server(single_model_dir, workers=1, queue_size=1)
    try:
        with ExplainClient(f"127.0.0.1:{srv.port}", timeout=30, retries=0) as c:
            stub = pb_grpc.ExplainServiceStub(c.channel)
            running = stub.Explain.future(c.request(GOOD, **_long_rise()), timeout=60)
            assert wait_for(lambda: srv.scheduler.running == 1)
            queued = stub.Explain.future(c.request(GOOD, **_long_rise()), timeout=60)
            assert wait_for(lambda: srv.scheduler.depth == 1)
            t0 = time.perf_counter()
            with pytest.raises(RemoteError) as err:
                c.explain(GOOD, "fem")
            assert err.value.code == "RESOURCE_EXHAUSTED" and "--queue-size" in err.value.message
            assert time.perf_counter() - t0 < 2.0  # refused, not queued behind ~24 s of RISE
            queued.cancel()
            running.cancel()
            assert wait_for(lambda: srv.scheduler.running == 0 and srv.scheduler.depth == 0, timeout=5)
            assert c.explain(GOOD, "fem").forward_passes == 1
    finally:
        srv.stop(grace=0)


def test_large_request_is_chunked_not_refused(client):
    """Far more masks than the engine's batch (64): chunked by the driver, answered normally."""
    result = client.explain(GOOD, "rise", params={"n_masks": 1000, "grid_size": 3})
    assert result.forward_passes == 1001


def test_cancelling_a_stream_stops_its_work(server, client, idle):
    from explainrt.proto.explainrt.v1 import explainrt_pb2_grpc as pb_grpc

    before = server.metrics.masked_pass_total(method="rise")
    stub = pb_grpc.ExplainServiceStub(client.channel)
    call = stub.ExplainStream(iter([client.request(GOOD, **_long_rise()) for _ in range(3)]), timeout=60)
    assert next(call).WhichOneof("kind") == "progress"  # the first item is running
    call.cancel()  # the client walks away mid-stream
    assert wait_for(lambda: server.scheduler.running == 0 and server.scheduler.depth == 0, timeout=5)
    stopped_at = server.metrics.masked_pass_total(method="rise")
    time.sleep(0.3)
    assert server.metrics.masked_pass_total(method="rise") == stopped_at
    assert stopped_at - before < 400_000


def test_models_with_malformed_metadata_are_skipped(model_dir, tmp_path):
    """One bad file in the directory does not keep the others from being served."""
    import json
    import os

    import onnx

    good = os.path.join(model_dir, "tiny.onnx")
    os.link(good, tmp_path / "tiny.onnx")
    for name, edit in (("listy", "[1, 2]"), ("stringy", {"input_size": "abc"})):
        model = onnx.load(good)
        for prop in model.metadata_props:
            if prop.key == "explainrt":
                prop.value = edit if isinstance(edit, str) else json.dumps({**json.loads(prop.value), **edit})
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
    srv = start_server(str(tmp_path))
    try:
        with ExplainClient(f"127.0.0.1:{srv.port}", timeout=30, retries=0) as c:
            assert [m["name"] for m in c.list_models()] == ["tiny"]
            assert c.metadata("tiny")["name"] == "tiny"
            assert c.explain(GOOD, "fem").forward_passes == 1
    finally:
        srv.stop(grace=0)


def test_stream_items_the_client_cannot_build_are_errors_in_order(client):
    items = [{"image": GOOD, "method": "fem"}, {"image": "/nonexistent/x.png", "method": "fem"},
             {"image": GOOD, "method": "scorecam"}, {"image": GOOD, "method": "fem", "bogus": 1},
             {"image": GOOD, "method": "fem", "target": "cat"}]
    results = list(client.stream(items, timeout=30))
    assert [type(r).__name__ for r in results] == ["RemoteExplanation", "RemoteError", "RemoteExplanation",
                                                    "RemoteError", "RemoteError"]
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    assert results[1].code == "INVALID_ARGUMENT" and "image file not found" in results[1].message
    assert "bogus" in results[3].message and "class index" in results[4].message
    assert results[2].forward_passes > 1


def test_a_failing_request_iterable_is_raised_after_the_results(client):
    def items():
        yield {"image": GOOD, "method": "fem"}
        raise KeyError("the caller's own bug")

    got = []
    with pytest.raises(KeyError, match="the caller's own bug"):
        for result in client.stream(items(), timeout=30):
            got.append(result)
    assert len(got) == 1 and got[0].forward_passes == 1


@pytest.mark.parametrize("kwargs,message", [
    ({"target": "cat"}, "class index"), ({"target": 1.5}, "class index"), ({"target": []}, "target list is empty"),
    ({"target": 2**40}, "out of range"), ({"params": {"k": object()}}, "cannot be sent as JSON"),
    ({"top_k": 2**40}, "top_k"), ({"image": "/"}, "is a directory"),
])
def test_client_checks_its_arguments(client, kwargs, message):
    from explainrt.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=message):
        client.request(**{"image": GOOD, **kwargs})
