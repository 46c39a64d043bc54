"""Request-level limits: the response size is bounded before any work, parameters that break the JSON
decoder are bad input, unknown enum values are refused, and the cost/memory estimates hold."""
from __future__ import annotations

import time

import cv2
import grpc
import numpy as np
import pytest

from explainrt.client import ExplainClient, RemoteError
from explainrt.errors import InvalidInputError
from explainrt.proto.explainrt.v1 import explainrt_pb2 as pb
from serve_helpers import start_server

MB = 2**20


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM); the server runs in this process."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    pytest.skip(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _png(height: int, width: int, value: int = 90) -> bytes:
    """A large constant PNG made cheaply (a few hundred KB for 8000×8000)."""
    img = np.full((height, width, 3), value, np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def big_server(single_model_dir):
    srv = start_server(single_model_dir, max_pixels=64_000_000)
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def big_client(big_server):
    with ExplainClient(f"127.0.0.1:{big_server.port}", timeout=60, retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def png_8000():
    return _png(8000, 8000)


def test_a_huge_response_is_refused_up_front_without_taking_memory(big_client, png_8000):
    """8000×8000, map at original size, overlay, 4 targets: 1 GiB of float32 maps. Before the fix the
    server built (and held) the whole response before refusing it."""
    assert len(png_8000) < 2 * MB
    big_client.explain(np.full((20, 20, 3), 9, np.uint8), "fem")  # warm: the first call's one-off allocations
    rss = _status("VmRSS")
    peak_reset = _reset_peak()
    t0 = time.perf_counter()
    with pytest.raises(RemoteError) as err:
        big_client.explain(png_8000, "fem", target=[0, 1, 2, 3], original_size=True, overlay=True)
    elapsed = time.perf_counter() - t0
    assert err.value.code == "RESOURCE_EXHAUSTED"
    message = err.value.message
    assert "4 maps of 8000×8000 float32 = 977 MiB + overlay ≤ 184 MiB" in message, message
    assert "at most 256 MiB" in message and "FLOAT16" in message and "MAP_SIZE_MODEL_INPUT" in message
    assert elapsed < 0.5, f"refused after {elapsed:.2f} s: the image was decoded or explained first"
    grown = (_status("VmHWM") if peak_reset else _status("VmRSS")) - rss
    assert grown < 100 * MB, f"the server's memory grew by {grown / MB:.0f} MiB for a refused request"
    # One target in float16 (the advice followed) fits and is answered.
    result = big_client.explain(png_8000, "fem", original_size=True, saliency_dtype="float16")
    assert result.saliency.shape == (8000, 8000) and result.saliency.dtype == np.float16


def test_one_float16_map_at_4000_with_overlay_still_works(big_client):
    image = np.zeros((4000, 4000, 3), np.uint8)
    image[:2000] = 200
    ok, buf = cv2.imencode(".png", image)
    result = big_client.explain(buf.tobytes(), "fem", original_size=True, overlay=True, saliency_dtype="float16")
    assert result.saliency.shape == (4000, 4000) and result.saliency.dtype == np.float16
    overlay = cv2.imdecode(np.frombuffer(result.overlay_png, np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (4000, 4000, 3)


def test_the_bound_follows_dtype_targets_and_overlay(big_server):
    """The limit is applied to the bound, not to a guess: just over → refused, just under → served."""
    from explainrt.server.tasks import RequestLimits, parse_request

    req = pb.ExplainRequest(model="tiny", method="fem", encoded=_png(1000, 1000))
    req.output.map_size = pb.MAP_SIZE_ORIGINAL
    req.targets.extend([0, 1])
    task = parse_request(req, big_server.models, RequestLimits(max_response_bytes=None))
    assert 2 * 1000 * 1000 * 4 <= task.response_bytes < 2 * 1000 * 1000 * 4 + MB
    parse_request(req, big_server.models, RequestLimits(max_response_bytes=task.response_bytes))
    from explainrt.server.tasks import ResponseTooLarge

    with pytest.raises(ResponseTooLarge, match="2 maps of 1000×1000 float32 = 7.6 MiB"):
        parse_request(req, big_server.models, RequestLimits(max_response_bytes=task.response_bytes - 1))
    req.output.overlay_png = True
    with_overlay = parse_request(req, big_server.models, RequestLimits(max_response_bytes=None))
    assert with_overlay.response_bytes >= task.response_bytes + 1000 * 1000 * 3
    # The real response is within the bound (a noisy image: its PNG hardly compresses).
    noisy = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
    req.encoded = cv2.imencode(".png", noisy)[1].tobytes()
    from explainrt.server.tasks import run_task

    task = parse_request(req, big_server.models)
    response = run_task(task)
    assert len(response.overlay_png) > 300 * 400 * 3 * 0.9  # hardly compressed: the bound is put to the test
    assert response.ByteSize() <= task.response_bytes


HUGE_INT = "1" * 5000  # over Python's 4300-digit int conversion limit: json.loads raised ValueError
DEEP_JSON = "[" * 1000 + "]" * 1000  # json.loads raised RecursionError


@pytest.mark.parametrize("params,words", [
    ({"n_masks": HUGE_INT}, "parameter n_masks"),
    ({"base_params": DEEP_JSON}, "parameter base_params"),
    ({"base_params": '{"a": ' * 3000 + "1" + "}" * 3000}, "parameter base_params"),
])
def test_parameters_that_break_the_json_decoder_are_invalid_argument(client, params, words):
    method = "rise" if "n_masks" in params else "featurecam"
    with pytest.raises(RemoteError) as err:
        client.explain(np.full((20, 20, 3), 9, np.uint8), method, params=params)
    assert err.value.code == "INVALID_ARGUMENT" and words in err.value.message
    assert "Traceback" not in err.value.message and "internal error" not in err.value.message
    items = list(client.stream([{"image": np.full((20, 20, 3), 9, np.uint8), "method": method, "params": params},
                                {"image": np.full((20, 20, 3), 9, np.uint8), "method": "fem"}], timeout=30))
    assert isinstance(items[0], RemoteError) and items[0].code == "INVALID_ARGUMENT" and words in items[0].message
    assert items[1].forward_passes == 1


def test_an_unknown_map_size_is_refused(client):
    import explainrt.proto.explainrt.v1.explainrt_pb2_grpc as pb_grpc

    req = client.request(np.full((20, 20, 3), 9, np.uint8), "fem")
    req.output.map_size = 7
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.ExplainServiceStub(client.channel).Explain(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "MAP_SIZE_MODEL_INPUT or MAP_SIZE_ORIGINAL, got 7" in err.value.details()


def _old_overlay(image_rgb, saliency, alpha=0.5):
    """The float32 formula the uint8 overlay replaces."""
    from explainrt.imaging import resize_map

    s = np.nan_to_num(resize_map(saliency, image_rgb.shape[:2]))
    u8 = np.clip(np.rint(s * 255.0), 0, 255).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    out = (1.0 - alpha) * image_rgb.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_overlay_in_uint8_matches_the_float_formula(alpha):
    from explainrt.imaging import overlay, overlay_png

    rng = np.random.default_rng(1)
    image = (rng.random((45, 61, 3)) * 255).astype(np.uint8)
    sal = rng.random((32, 32)).astype(np.float32)
    sal[0, 0], sal[1, 1], sal[2, 2] = np.nan, 1.5, -0.5
    got = overlay(image, sal, alpha)
    assert np.abs(got.astype(int) - _old_overlay(image, sal, alpha)).max() <= 1
    decoded = cv2.imdecode(np.frombuffer(overlay_png(image, sal, alpha), np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(decoded[:, :, ::-1], got)


@pytest.mark.parametrize("encode", [False, True])
def test_overlay_peak_memory_is_a_few_bytes_per_pixel(encode):
    """The float formula held ~4 float32 H×W×3 images (~40 B/pixel); the uint8 one about 7."""
    from explainrt import imaging

    if not _reset_peak():
        pytest.skip("cannot reset the peak RSS here")
    make = imaging.overlay_png if encode else imaging.overlay
    image = np.full((3000, 3000, 3), 77, np.uint8)
    sal = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    make(image[:100, :100], sal)  # warm
    _reset_peak()
    rss = _status("VmRSS")
    out = make(image, sal)
    peak = _status("VmHWM") - rss
    assert len(out) > 0
    assert peak < 10 * image.shape[0] * image.shape[1], f"overlay peak {peak / MB:.0f} MiB"


@pytest.mark.parametrize("method,params,passes", [
    ("fem", {}, 1), ("sidu", {}, 17), ("scorecam", {}, 17), ("scorecam", {"baseline": "true"}, 18),
    ("rise", {"n_masks": "300", "grid_size": "4"}, 301),
    ("featurecam", {"base": '"rise"', "base_params": '{"n_masks": 50}'}, 51), ("featurecam", {}, 17),
])
def test_cost_is_an_upper_bound_of_the_forward_passes(server, method, params, passes):
    """C = 16 activation channels on the tiny model; RISE and FEM are exact, SIDU/Score-CAM may run fewer."""
    from explainrt.server.tasks import parse_request, run_task

    req = pb.ExplainRequest(model="tiny", method=method, encoded=_png(40, 48, 120))
    for key, value in params.items():
        req.params[key] = value
    task = parse_request(req, server.models)
    assert task.cost_passes == passes
    done = run_task(task).forward_passes
    assert done <= task.cost_passes
    if method in ("fem", "rise") or params.get("base") == '"rise"':
        assert done == task.cost_passes


@pytest.mark.parametrize("method,params,shape,original,overlay,targets", [
    ("fem", {}, (2500, 2500), True, True, [0, 1]),  # response-dominated (measured 261 MiB, estimate 346)
    ("rise", {"n_masks": "4000", "grid_size": "5"}, (300, 300), False, False, [0, 1, 2]),  # masks and scores
    ("scorecam", {}, (1200, 1600), True, True, []),
    ("featurecam", {}, (200, 200), False, True, [3]),
])
def test_memory_estimate_bounds_the_measured_peak(big_server, method, params, shape, original, overlay, targets):
    """Peak of parse + run + serialise against ``memory_bytes``: the larger of the RSS peak (VmHWM reset before
    the request; it sees OpenCV, ONNX Runtime and protobuf, but not memory the allocator reuses) and the
    tracemalloc peak (every NumPy array, reused or not)."""
    import tracemalloc

    from explainrt.server.tasks import parse_request, run_task

    if not _reset_peak():
        pytest.skip("cannot reset the peak RSS here")
    image = np.random.default_rng(2).integers(0, 255, (*shape, 3), dtype=np.uint8)
    req = pb.ExplainRequest(model="tiny", method=method, encoded=cv2.imencode(".png", image)[1].tobytes())
    del image
    for key, value in params.items():
        req.params[key] = value
    req.targets.extend(targets)
    req.output.map_size = pb.MAP_SIZE_ORIGINAL if original else pb.MAP_SIZE_MODEL_INPUT
    req.output.overlay_png = overlay
    run_task(parse_request(req, big_server.models)).SerializeToString()  # warm: engine arena, caches
    tracemalloc.start()
    _reset_peak()
    rss = _status("VmRSS")
    task = parse_request(req, big_server.models)
    data = run_task(task).SerializeToString()
    peak = max(_status("VmHWM") - rss, tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    assert len(data) <= task.response_bytes
    assert peak <= task.memory_bytes, f"measured {peak / MB:.1f} MiB > estimate {task.memory_bytes / MB:.1f} MiB"
    assert task.memory_bytes <= 20 * peak, \
        f"estimate {task.memory_bytes / MB:.1f} MiB is far above the measured {peak / MB:.1f} MiB"


def test_estimates_are_recorded_on_the_task(big_server):
    from explainrt.server.tasks import parse_request

    req = pb.ExplainRequest(model="tiny", method="rise", encoded=_png(100, 100))
    req.params["n_masks"] = "1000"
    small = parse_request(req, big_server.models)
    req.params["n_masks"] = "10000"
    large = parse_request(req, big_server.models)
    assert (small.cost_passes, large.cost_passes) == (1001, 10001)
    assert large.memory_bytes > small.memory_bytes > 0


def test_gradient_methods_cost_grows_with_targets_and_iterations_are_bounded(server):
    """FGVis optimises one mask per target (a forward and a backward each, every iteration) and the
    autograd Grad-CAMs run one row per target: their cost counts the targets, so a 16-target FGVis
    is not priced as a one-target one (the deadline admission and the lanes read it)."""
    from explainrt.explainers import METHODS
    from explainrt.server.tasks import RequestLimits, estimate_cost

    meta = server.models.get("tiny").metadata
    fgvis = METHODS["fgvis"].create(iterations=100)
    assert estimate_cost(fgvis, meta, 16) == 1 + 3 * 100 * 16 + 2
    assert estimate_cost(fgvis, meta, 16) > 15 * estimate_cost(fgvis, meta, 1)
    prob_cam = METHODS["gradcam"].create(score="prob")  # not the CAM head's forward-only path: autograd
    assert estimate_cost(prob_cam, meta, 4) == 1 + 3 * 4
    assert estimate_cost(METHODS["gradcam"].create(), meta, 4) == 1  # the tiny model's CAM head: the base pass
    with pytest.raises(InvalidInputError, match="iterations=30000 is over this server's limit of 20000"):
        RequestLimits(max_masks=20000).check(METHODS["fgvis"].create(iterations=30000), [], np.zeros((8, 8, 3), np.uint8))
