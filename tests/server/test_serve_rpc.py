"""Every RPC of the server against the in-process Explainer on the same model (the reference)."""
from __future__ import annotations

import json
import os
import re
import urllib.request

import cv2
import grpc
import numpy as np
import pytest

from explainrt import Explainer
from explainrt.client import ExplainClient, RemoteError, RemoteExplanation
from explainrt.imaging import decode_image, overlay, prepare_image, resize_map
from explainrt.proto.explainrt.v1 import explainrt_pb2 as pb
from explainrt.proto.explainrt.v1 import explainrt_pb2_grpc as pb_grpc
from serve_helpers import INPUT_HW, NUM_CLASSES, wait_for

CASES = [("fem", {}), ("scorecam", {}), ("sidu", {"threshold": 0.1}), ("rise", {"n_masks": 300, "seed": 3}),
         ("featurecam", {"edges": "canny"})]


@pytest.fixture(scope="module")
def reference(model_dir):
    with Explainer(os.path.join(model_dir, "tiny.onnx"), batch_size=64) as explainer:
        yield explainer


@pytest.mark.parametrize("method,params", CASES)
def test_explain_matches_in_process_explainer(client, reference, image, method, params):
    remote = client.explain(image, method, params=params)
    local = reference.explain(image, method, **params)
    assert isinstance(remote, RemoteExplanation)
    assert remote.model == "tiny" and remote.method == method
    assert remote.targets == local.targets and remote.labels == local.labels
    assert remote.saliency_maps.dtype == np.float32 and remote.saliency_maps.shape == (1, *INPUT_HW)
    np.testing.assert_allclose(remote.saliency_maps, local.saliency_maps, atol=1e-6)
    assert remote.forward_passes == local.forward_passes
    assert remote.probability == pytest.approx(float(local.probs[local.target]), abs=1e-6)
    assert [(c, pytest.approx(p, abs=1e-6)) for c, p in remote.top_k(5)] == local.top_k(5)
    assert remote.params == json.loads(json.dumps(local.params))
    assert remote.original_size == image.shape[:2]
    assert remote.timings["total_s"] >= remote.timings["explain_s"] > 0
    if method == "featurecam":
        np.testing.assert_array_equal(remote.visualization, local.visualization)
    else:
        assert remote.visualization is None


def test_explain_several_targets_float16_original_size_overlay(client, reference, png_path, image):
    remote = client.explain(png_path, "scorecam", target=[3, 7], saliency_dtype="float16", original_size=True,
                            overlay=True, top_k=3)
    local = reference.explain(png_path, "scorecam", target=[3, 7])
    assert remote.targets == [3, 7] and remote.labels == ["class-3", "class-7"]
    assert remote.saliency_maps.dtype == np.float16 and remote.saliency_maps.shape == (2, *image.shape[:2])
    expected = np.stack([resize_map(m, image.shape[:2]) for m in local.saliency_maps])
    np.testing.assert_allclose(remote.saliency_maps.astype(np.float32), expected, atol=1e-3)  # float16 rounding
    assert len(remote.predictions) == 3
    overlay_rgb = decode_image(remote.overlay_png)
    np.testing.assert_array_equal(overlay_rgb, overlay(image, local.saliency))


@pytest.mark.parametrize("kind", ["uint8", "float32", "bytes"])
def test_explain_accepts_every_image_form(client, reference, image, png_path, kind):
    if kind == "uint8":
        sent, expected_input = image, image
    elif kind == "float32":
        sent = expected_input = prepare_image(image, reference.metadata).x[0]  # (3, H, W) preprocessed
    else:
        with open(png_path, "rb") as fh:
            sent = expected_input = fh.read()
    remote = client.explain(sent, "sidu")
    local = reference.explain(expected_input, "sidu")
    np.testing.assert_allclose(remote.saliency_maps, local.saliency_maps, atol=1e-6)
    assert remote.original_size == (None if kind == "float32" else image.shape[:2])


def test_explain_4k_image_fits_the_message_limits(client, reference):
    """A 3840x2160 raw RGB image (~25 MB) in, a 4K float16 map (~17 MB) out."""
    yy, xx = np.mgrid[0:2160, 0:3840]
    big = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=2).astype(np.uint8)
    remote = client.explain(big, "fem", original_size=True, saliency_dtype="float16")
    assert remote.saliency_maps.shape == (1, 2160, 3840)
    local = reference.explain(big, "fem")
    np.testing.assert_allclose(remote.saliency_maps[0].astype(np.float32),
                               resize_map(local.saliency, (2160, 3840)), atol=1e-3)


def test_request_over_the_message_limit_is_resource_exhausted(client):
    too_big = np.zeros((5000, 5000, 3), np.uint8)  # 75 MB > 64 MiB
    with pytest.raises(RemoteError) as err:
        client.explain(too_big, "fem")
    assert err.value.code == "RESOURCE_EXHAUSTED"


def test_list_models_skips_files_without_metadata(client):
    models = client.list_models()
    assert [m["name"] for m in models] == ["tiny", "tiny2"]
    assert models[0] == {"name": "tiny", "input_size": INPUT_HW, "num_classes": NUM_CLASSES,
                         "backend": "onnxruntime", "device": "cpu"}


def test_get_model_metadata(client, reference):
    meta = client.metadata("tiny")
    assert meta["name"] == "tiny"
    assert meta["input_size"] == list(INPUT_HW)
    assert meta["activation_layer"] == reference.metadata.activation_layer
    assert meta["activation_shape"] == [16, 8, 8]
    assert meta["labels"] == [f"class-{i}" for i in range(NUM_CLASSES)]
    assert {o["name"] for o in meta["outputs"]} == {"logits", "probs", "activations"}
    assert meta["inputs"][0]["shape"] == ["-1", "3", "32", "32"]  # int64 → JSON strings; -1 = dynamic batch
    # every method the model runs here: FGVis needs the torch engine's gradients, this server runs ONNX Runtime
    # (the gradient CAMs run forward-only: the tiny model ends in a CAM head)
    assert meta["methods"] == {k: v for k, v in Explainer.methods().items() if k != "fgvis"}
    assert meta["batch_size"] == 64


def test_server_engines_do_not_spin(server):
    """ONNX Runtime's busy-waiting threads are off in the server (they starve its other threads)."""
    engine = server.models.get("tiny").explainer.engine
    options = getattr(engine, "engine", engine).session.get_session_options()  # (behind the batcher)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_model_is_chosen_by_name(client, reference, image, model_dir):
    other = client.explain(image, "fem", model="tiny2")
    with Explainer(os.path.join(model_dir, "tiny2.onnx")) as second:
        np.testing.assert_allclose(other.saliency_maps, second.explain(image, "fem").saliency_maps, atol=1e-6)


def test_stream_answers_in_order_with_progress_and_per_item_errors(client, reference, image):
    progress = []
    requests = [
        {"image": image, "method": "fem", "request_id": "a"},
        {"image": b"not an image", "method": "fem", "request_id": "b"},
        {"image": image, "method": "rise", "params": {"n_masks": 8000}, "request_id": "c"},
        {"image": image, "method": "nope", "request_id": "d"},
        {"image": image, "method": "scorecam", "model": "missing", "request_id": "e"},
        {"image": image, "method": "scorecam", "request_id": "f"},
    ]
    items = list(client.stream(requests, progress=lambda i, done, total: progress.append((i, done, total))))
    assert [item.index for item in items] == list(range(6))
    assert [item.request_id for item in items] == ["a", "b", "c", "d", "e", "f"]
    assert [type(item).__name__ for item in items] == ["RemoteExplanation", "RemoteError", "RemoteExplanation",
                                                       "RemoteError", "RemoteError", "RemoteExplanation"]
    assert [items[i].code for i in (1, 3, 4)] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "NOT_FOUND"]
    rise = reference.explain(image, "rise", n_masks=8000)
    np.testing.assert_allclose(items[2].saliency_maps, rise.saliency_maps, atol=1e-6)
    np.testing.assert_allclose(items[5].saliency_maps, reference.explain(image, "scorecam").saliency_maps, atol=1e-6)
    rise_progress = [(done, total) for i, done, total in progress if i == 2]
    assert rise_progress, "a long request sends progress messages"
    assert all(total == 8000 for _, total in rise_progress)
    assert [d for d, _ in rise_progress] == sorted(d for d, _ in rise_progress)


def test_stream_of_many_items_keeps_order(client, reference, image):
    methods = ["fem", "scorecam", "sidu"] * 8
    items = list(client.stream({"image": image, "method": m, "request_id": str(i)} for i, m in enumerate(methods)))
    assert [item.request_id for item in items] == [str(i) for i in range(len(methods))]
    assert [item.method for item in items] == methods


def test_health_check_overall_and_per_model(client):
    assert client.health("") == "SERVING"
    assert client.health("tiny") == "SERVING"
    assert client.health("explainrt.v1.ExplainService") == "SERVING"
    assert client.health("no-such-model") == "SERVICE_UNKNOWN"
    assert client.health("plain") == "SERVICE_UNKNOWN"  # skipped: no explainrt metadata


def test_health_watch_follows_shutdown(model_dir):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serve_helpers import start_server

    srv = start_server(model_dir)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    try:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="tiny"), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        unknown = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="x"), timeout=10)
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        unknown.cancel()
        srv._call(srv.health.enter_graceful_shutdown())  # what stop() does first (on the server's event loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    finally:
        channel.close()
        srv.stop(grace=0)


def test_not_serving_until_models_are_loaded_and_client_retries(model_dir, image):
    from serve_helpers import start_server

    srv = start_server(model_dir, load=False)
    try:
        with ExplainClient(f"127.0.0.1:{srv.port}", retries=0, model="tiny") as impatient:
            assert impatient.health() == "NOT_SERVING"
            with pytest.raises(RemoteError) as err:
                impatient.explain(image, "fem")
            assert err.value.code == "UNAVAILABLE" and "loading" in err.value.message
        import threading

        loader = threading.Timer(0.3, srv.load_models)
        loader.start()
        with ExplainClient(f"127.0.0.1:{srv.port}", retries=6, backoff=0.05, model="tiny") as patient:
            assert patient.explain(image, "fem").forward_passes == 1  # retried on UNAVAILABLE until loaded
            assert patient.health() == "SERVING"
        loader.join()
    finally:
        srv.stop(grace=0)


def test_reflection_lists_and_describes_the_services(server):
    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in replies[0].list_services_response.service}
        assert names == {"explainrt.v1.ExplainService", "grpc.health.v1.Health",
                         "grpc.reflection.v1alpha.ServerReflection"}
        # What grpcurl does without proto files: fetch descriptors through reflection.
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("explainrt.v1.ExplainService")
        assert [m.name for m in service.methods] == ["Explain", "ExplainStream", "ListModels", "GetModelMetadata"]
        assert pool.FindMessageTypeByName("explainrt.v1.ExplainRequest").fields_by_name["params"] is not None


def test_raw_stub_and_empty_model_name(single_model_dir, image):
    """With one model the name may be empty; the raw generated stub works as grpcurl-style clients use it."""
    from serve_helpers import start_server

    srv = start_server(single_model_dir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = pb_grpc.ExplainServiceStub(channel)
            req = pb.ExplainRequest(method="fem", encoded=cv2.imencode(".png", image[:, :, ::-1])[1].tobytes())
            response = stub.Explain(req, timeout=10)
            assert response.model == "tiny" and len(response.maps) == 1
            assert list(response.maps[0].saliency.shape) == list(INPUT_HW)
            assert response.maps[0].saliency.dtype == pb.FLOAT32
            assert len(response.predictions) == 5  # top_k unset → 5
    finally:
        srv.stop(grace=0)


def test_metrics_endpoint_counts_requests_by_method_and_code(server, client, image):
    before = server.metrics.masked_pass_total(model="tiny", method="scorecam")
    client.explain(image, "scorecam")
    with pytest.raises(RemoteError):
        client.explain(image, "scorecam", target=99)
    assert wait_for(lambda: server.metrics.masked_pass_total(model="tiny", method="scorecam") == before + 15)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'explainrt_requests_total{code="OK",method="scorecam",rpc="Explain"}' in text
    assert 'explainrt_requests_total{code="INVALID_ARGUMENT",method="scorecam",rpc="Explain"}' in text
    assert "explainrt_request_latency_seconds_bucket" in text
    assert "explainrt_queue_depth 0.0" in text
    assert 'explainrt_masked_passes_total{method="scorecam",model="tiny"}' in text
    assert float(re.search(r"^explainrt_masked_passes_per_second (\S+)$", text, re.M).group(1)) >= 1.5  # 15 / 10 s


def test_rate_meter_counts_a_sliding_window():
    from explainrt.server.metrics import RateMeter

    meter = RateMeter(window=10)
    meter.add(100, now=0.0)
    meter.add(50, now=5.0)
    assert meter.rate(now=9.0) == 15.0
    assert meter.rate(now=12.0) == 5.0  # the first 100 left the window
    assert meter.rate(now=30.0) == 0.0
