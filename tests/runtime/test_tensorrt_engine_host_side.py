"""The TensorRT engine's host logic on the CPU, against stand-ins for tensorrt and CuPy.

The stand-in ``tensorrt`` implements the handful of TensorRT >= 10 calls the engine makes
(Builder, OnnxParser, profiles, timing cache, name-based I/O, ``execute_async_v3``); its
"plan" runs the ONNX file with ONNX Runtime, reading the input from and writing the outputs
to the bound addresses. So the build flow (profile, FP16 by flag on TensorRT 10 or by an
FP16 ONNX file on 11, metadata JSON, timing cache), plan loading, re-binding only on
changes and explanations through the engine are checked without a GPU. Real TensorRT is
tested in tests/gpu (marker `trt`).
"""
import ctypes
import json
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
from fake_cupy import installed_fake_cupy  # noqa: E402


class FakeTensorRT(types.ModuleType):
    """Just enough of the tensorrt module; ``has_fp16_flag`` picks TensorRT 10 or 11 behaviour."""

    def __init__(self, has_fp16_flag: bool):
        super().__init__("tensorrt")
        trt = self
        self.__version__ = "10.99-fake" if has_fp16_flag else "11.99-fake"
        self.calls = []
        flags = {"TF32": "TF32"}
        if has_fp16_flag:
            flags["FP16"] = "FP16"
        self.BuilderFlag = types.SimpleNamespace(**flags)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
        self.nptype = lambda dtype: np.dtype(dtype).type

        class Logger:
            WARNING = 2

            def __init__(self, severity):
                pass

        class Tensor:
            def __init__(self, name, shape=()):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self):
                self.outputs, self.onnx_path = [], None

            num_outputs = property(lambda self: len(self.outputs))

            def get_output(self, i):
                return Tensor(self.outputs[i])

            def get_input(self, i):  # TensorRT marks a dynamic axis -1
                return Tensor(self.input, self.input_shape)

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, path):
                import onnx

                model = onnx.load(path)
                self.network.outputs = [o.name for o in model.graph.output]
                self.network.input = model.graph.input[0].name
                self.network.input_shape = tuple(d.dim_value if d.HasField("dim_value") else -1
                                                 for d in model.graph.input[0].type.tensor_type.shape.dim)
                self.network.onnx_bytes = model.SerializeToString()
                self.network.fp16_weights = any(t.data_type == onnx.TensorProto.FLOAT16
                                                for t in model.graph.initializer)
                return True

        class TimingCache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"timing-cache:" + self.data

        class Config:
            def __init__(self):  # TensorRT turns TF32 on by default
                self.flags, self.profiles, self.cache = {"TF32"}, [], None

            def set_flag(self, flag):
                self.flags.add(flag)

            def clear_flag(self, flag):
                self.flags.discard(flag)

            def set_memory_pool_limit(self, pool, size):
                trt.calls.append(("workspace", size))

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)

            def create_timing_cache(self, data):
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                self.shape = (name, tuple(lo), tuple(opt), tuple(hi))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                assert flags == 0
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                static = network.input_shape[0] > 0
                assert len(config.profiles) == (0 if static else 1), "a profile is for dynamic inputs only"
                profile_shape = None if static else config.profiles[0].shape
                trt.calls.append(("build", sorted(config.flags), profile_shape, network.fp16_weights,
                                  config.cache.data))
                header = json.dumps({"outputs": network.outputs, "input": network.input, "static": static,
                                     "max_batch": network.input_shape[0] if static else profile_shape[3][0]}).encode()
                return len(header).to_bytes(4, "little") + header + network.onnx_bytes

        class Engine:
            def __init__(self, plan):
                import onnxruntime as ort

                size = int.from_bytes(plan[:4], "little")
                info = json.loads(plan[4:4 + size])
                self.session = ort.InferenceSession(plan[4 + size:], providers=["CPUExecutionProvider"])
                self.names = [info["input"]] + info["outputs"]
                self.shapes = {i.name: tuple(-1 if not isinstance(d, int) else d for d in i.shape)
                               for i in (*self.session.get_inputs(), *self.session.get_outputs())}
                self.max_batch, self.static = info["max_batch"], info["static"]

            num_io_tensors = property(lambda self: len(self.names))

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_mode(self, name):
                return "INPUT" if name == self.names[0] else "OUTPUT"

            def get_tensor_dtype(self, name):
                return np.float32

            def get_tensor_shape(self, name):
                return self.shapes[name]

            def create_execution_context(self):
                return Context(self)

        class Context:
            def __init__(self, engine):
                self.engine, self.addresses, self.input_shape = engine, {}, None

            def set_input_shape(self, name, shape):
                trt.calls.append(("set_input_shape", tuple(shape)))
                e = self.engine
                if not 1 <= shape[0] <= e.max_batch or (e.static and shape[0] != e.max_batch):
                    return False
                self.input_shape = tuple(shape)
                return True

            def set_tensor_address(self, name, ptr):
                trt.calls.append(("set_tensor_address", name))
                if ptr % 256:  # TensorRT's I/O alignment: rejected, the old address stays bound
                    return False
                self.addresses[name] = ptr
                return True

            def execute_async_v3(self, stream):
                trt.calls.append(("execute", stream))
                trt.cp.log.op("execute", trt.cp.log.streams[stream])
                e = self.engine
                assert set(self.addresses) == set(e.names), "every I/O tensor needs an address"
                x = _view(self.addresses[e.names[0]], self.input_shape).copy()
                outputs = e.session.run(e.names[1:], {e.names[0]: x})
                for name, value in zip(e.names[1:], outputs):
                    _view(self.addresses[name], value.shape)[...] = value
                return True

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan):
                return Engine(bytes(plan))

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime


def _view(ptr, shape):
    count = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(ptr)).reshape(shape)


@pytest.fixture(params=[True, False], ids=["trt10", "trt11"])
def fake_trt(request, monkeypatch):
    trt = FakeTensorRT(has_fp16_flag=request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    import explainrt.runtime.tensorrt_build as module

    monkeypatch.setattr(module, "_logger_instance", None)
    with installed_fake_cupy() as cp:
        trt.cp = cp
        yield trt


@pytest.fixture(scope="module")
def trt_model(tmp_path_factory):
    from explainrt.export import export_torch

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))
    path = str(tmp_path_factory.mktemp("trt") / "tiny.onnx")
    export_torch(model.eval(), path, input_size=(20, 16))
    return path


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("tf32", [False, True])
def test_build_plan(fake_trt, trt_model, tmp_path, fp16, tf32):
    from explainrt.runtime.tensorrt_build import build_plan, plan_info_path

    plan = str(tmp_path / "tiny.plan")
    cache = tmp_path / "cache.bin"
    cache.write_bytes(b"old")
    info = build_plan(trt_model, plan, max_batch=16, fp16=fp16, opt_batch=8, workspace_gb=0.5,
                      timing_cache=str(cache), tf32=tf32)
    ((_, flags, profile, fp16_weights, cache_in),) = [c for c in fake_trt.calls if c[0] == "build"]
    assert profile == ("input", (1, 3, 20, 16), (8, 3, 20, 16), (16, 3, 20, 16))
    assert cache_in == b"old" and cache.read_bytes() == b"timing-cache:old"
    assert ("workspace", 1 << 29) in fake_trt.calls
    has_flag = hasattr(fake_trt.BuilderFlag, "FP16")
    # TensorRT's default TF32 is cleared for an FP32 plan unless asked for, and the choice recorded
    assert flags == sorted((["FP16"] if fp16 and has_flag else []) + (["TF32"] if tf32 else []))
    assert info["build"]["tf32"] is tf32
    assert fp16_weights == (fp16 and not has_flag)  # TensorRT 11: FP16 comes from the ONNX file
    assert info["build"]["fp16_via"] == (None if not fp16 else "builder_flag" if has_flag else "onnx")
    saved = json.loads(open(plan_info_path(plan)).read())
    assert saved == info and saved["metadata"]["activation_output"] == "activations"
    assert saved["build"]["max_batch"] == 16 and saved["build"]["tensorrt"] == fake_trt.__version__


def test_engine_rebinds_only_on_change(fake_trt, trt_model, tmp_path):
    from explainrt.runtime.ort_engine import OnnxRuntimeEngine
    from explainrt.runtime.tensorrt_build import build_plan
    from explainrt.runtime.tensorrt_engine import TensorRTEngine

    cp = fake_trt.cp
    plan = str(tmp_path / "tiny.plan")
    build_plan(trt_model, plan, max_batch=8)
    engine = TensorRTEngine(plan, max_batch=8)
    assert engine.xp is cp and engine.device == "cuda"
    bound_outputs = [c for c in fake_trt.calls if c[0] == "set_tensor_address"]
    assert sorted(name for _, name in bound_outputs) == ["activations", "logits", "probs"]  # once, at load
    reference = OnnxRuntimeEngine(trt_model, max_batch=8)
    buffer = cp.asarray(np.random.default_rng(0).standard_normal((8, 3, 20, 16)).astype(np.float32))
    fake_trt.calls.clear()
    outs = []
    for b in (8, 8, 3, 3, 8):
        out = engine.infer(buffer[:b])
        outs.append(out)
        want = reference.infer(np.asarray(buffer[:b]))
        for name in want:
            np.testing.assert_allclose(out[name], want[name], rtol=1e-6, atol=1e-7)
    kinds = [c for c in fake_trt.calls if c[0] != "execute"]
    # the input address is bound once (same buffer), the shape on each change
    assert kinds == [("set_input_shape", (8, 3, 20, 16)), ("set_tensor_address", "input"),
                     ("set_input_shape", (3, 3, 20, 16)), ("set_input_shape", (8, 3, 20, 16))]
    # outputs are copies: the next run does not overwrite what was handed out
    np.testing.assert_allclose(outs[0]["probs"], reference.infer(np.asarray(buffer))["probs"], rtol=1e-6)
    other = cp.asarray(np.asarray(buffer).copy())
    engine.infer(other[:2])
    assert ("set_tensor_address", "input") in fake_trt.calls[-3:]
    # TensorRT always runs on the engine's own (non-default) stream
    assert all(stream == engine.stream.ptr not in (0, 1, 2) for kind, stream in
               [c for c in fake_trt.calls if c[0] == "execute"])


def test_engine_checks_the_batch_limit(fake_trt, trt_model, tmp_path):
    from explainrt.errors import InvalidInputError
    from explainrt.runtime.tensorrt_build import build_plan
    from explainrt.runtime.tensorrt_engine import TensorRTEngine

    plan = str(tmp_path / "tiny.plan")
    build_plan(trt_model, plan, max_batch=4)
    with pytest.raises(InvalidInputError, match="--max-batch 8"):
        TensorRTEngine(plan, max_batch=8)
    with pytest.raises(InvalidInputError, match="cuda"):
        TensorRTEngine(plan, max_batch=4, device="cpu")


def test_load_engine_builds_from_onnx_once(fake_trt, trt_model, tmp_path):
    import shutil

    from explainrt.runtime import load_engine
    from explainrt.runtime.tensorrt_build import default_plan_path

    model = str(tmp_path / "m.onnx")
    shutil.copy(trt_model, model)
    engine = load_engine(model, backend="tensorrt", device="cuda", max_batch=4)
    assert engine.path == default_plan_path(model, 4, False) and os.path.isfile(engine.path + ".json")
    builds = sum(1 for c in fake_trt.calls if c[0] == "build")
    load_engine(model, backend="tensorrt", device="cuda", max_batch=4)  # the plan is reused
    assert sum(1 for c in fake_trt.calls if c[0] == "build") == builds == 1


def test_cli_build(fake_trt, trt_model, tmp_path, capsys):
    from explainrt import cli

    plan = str(tmp_path / "out.plan")
    assert cli.main(["build", trt_model, "--max-batch", "6", "--opt-batch", "2", "-o", plan]) == 0
    out = capsys.readouterr().out
    assert plan in out and "batch 1..6" in out and os.path.isfile(plan + ".json")


def test_explanations_through_the_engine(fake_trt, trt_model, tmp_path):
    """The whole GPU pipeline's host side: device-array driver, CUDA-op stand-ins, TensorRT engine."""
    from explainrt import Explainer

    plan = str(tmp_path / "tiny.plan")
    from explainrt.runtime.tensorrt_build import build_plan

    build_plan(trt_model, plan, max_batch=8)
    image = np.random.default_rng(1).integers(0, 256, (20, 16, 3), dtype=np.uint8)
    gpu = Explainer(plan, backend="tensorrt", device="cuda", batch_size=8)
    cpu = Explainer(trt_model, batch_size=8)
    for method, params in (("rise", {"n_masks": 30}), ("scorecam", {}), ("sidu", {"threshold": 0.05})):
        got, want = gpu.explain(image, method, **params), cpu.explain(image, method, **params)
        assert got.forward_passes == want.forward_passes
        np.testing.assert_allclose(got.saliency_maps, want.saliency_maps, atol=1e-5)


def _misaligned(cp, x, offset_floats=16):
    """A copy of ``x`` whose first element sits ``4·offset_floats`` bytes past a 256-byte boundary."""
    flat = cp.empty(x.size + offset_floats, dtype=cp.float32)
    view = flat[offset_floats:].reshape(x.shape)
    view[...] = x
    assert view.data.ptr % 256 != 0
    return view


def test_misaligned_inputs_are_staged_not_run_stale(fake_trt, trt_model, tmp_path):
    """TensorRT keeps the old address when it rejects one: every input must still be read."""
    from explainrt.runtime.ort_engine import OnnxRuntimeEngine
    from explainrt.runtime.tensorrt_build import build_plan
    from explainrt.runtime.tensorrt_engine import TensorRTEngine

    cp = fake_trt.cp
    plan = str(tmp_path / "tiny.plan")
    build_plan(trt_model, plan, max_batch=8)
    engine = TensorRTEngine(plan, max_batch=8)
    reference = OnnxRuntimeEngine(trt_model, max_batch=8)
    rng = np.random.default_rng(2)
    for seed in range(3):  # distinct misaligned inputs, one after the other
        x = rng.standard_normal((5, 3, 20, 16)).astype(np.float32)
        got = engine.infer(_misaligned(cp, x, offset_floats=16 + seed), ["probs"])["probs"]
        np.testing.assert_allclose(got, reference.infer(x, ["probs"])["probs"], rtol=1e-6, atol=1e-7)
    assert engine._input_staging.copies == 3
    # infer_batches slices land on aligned staging buffers too, whatever the item size
    x = rng.standard_normal((7, 3, 20, 16)).astype(np.float32)
    got = engine.infer_batches(_misaligned(cp, x), ["probs"], batch_size=3)["probs"]
    np.testing.assert_allclose(got, reference.infer(x, ["probs"])["probs"], rtol=1e-6, atol=1e-7)


def test_rejected_addresses_are_errors(fake_trt, trt_model, tmp_path):
    from explainrt.errors import ModelError
    from explainrt.runtime.tensorrt_build import build_plan
    from explainrt.runtime.tensorrt_engine import TensorRTEngine

    plan = str(tmp_path / "tiny.plan")
    build_plan(trt_model, plan, max_batch=8)
    engine = TensorRTEngine(plan, max_batch=8)
    with pytest.raises(ModelError, match="256-byte aligned"):
        engine._bind_address("input", 256 * 1000 + 64)


@pytest.mark.parametrize("caller", ["legacy", "per_thread", "side"])
def test_engine_orders_its_stream_with_the_callers(fake_trt, trt_model, tmp_path, caller):
    """Inputs enqueued on the caller's stream are read after they are written, outputs are valid
    on the caller's stream, whichever stream the caller is on (CuPy's per-thread default is 2)."""
    from explainrt.runtime.tensorrt_build import build_plan
    from explainrt.runtime.tensorrt_engine import TensorRTEngine
    from fake_cupy import happens_before

    cp = fake_trt.cp
    log = cp.log
    plan = str(tmp_path / "tiny.plan")
    build_plan(trt_model, plan, max_batch=8, tf32=False)
    engine = TensorRTEngine(plan, max_batch=8)
    assert engine.tf32 is False
    stream = {"legacy": log.current[0], "per_thread": cp.cuda.Stream(ptds=True),
              "side": cp.cuda.Stream(non_blocking=True)}[caller]
    with stream:
        x = cp.asarray(np.ones((2, 3, 20, 16), np.float32))
        upload = (stream, stream.count - 1)
        out = engine.infer(x, ["probs"])
        after = log.op("read probs")
    (execute,) = [(s, i) for what, s, i in log.ops if what == "execute"]
    assert execute[0] is engine.stream
    assert happens_before(log, upload, execute), "TensorRT may read the input before it is uploaded"
    assert happens_before(log, execute, after), "the caller may read the outputs before TensorRT wrote them"
    copies = [(s, i) for what, s, i in log.ops if what == "empty" and s is stream]
    assert copies, "handed-back outputs are allocated on the caller's stream"
    assert out["probs"].dtype == np.float32 and out["probs"].shape == (2, 5)


def test_static_batch_plan_reports_its_batch_and_pads(fake_trt, tmp_path):
    """An ONNX model kept at a fixed batch builds without a profile; the plan's engine reports that batch
    as max_batch, feeds TensorRT exactly that shape (padding smaller batches) and explains like ORT."""
    import warnings

    from explainrt import Explainer
    from explainrt.export import expose_activation
    from explainrt.runtime.ort_engine import OnnxRuntimeEngine
    from explainrt.runtime.tensorrt_build import build_plan
    from explainrt.runtime.tensorrt_engine import TensorRTEngine

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    src, fixed = str(tmp_path / "plain.onnx"), str(tmp_path / "fixed.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, 12, 12),), src, input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False)
    meta = expose_activation(src, fixed, rewrite_batch=False)
    assert meta.fixed_batch == 2
    names = [meta.probs_output, meta.activation_output]
    plan = str(tmp_path / "fixed.plan")
    info = build_plan(fixed, plan, max_batch=16)
    assert info["build"]["fixed_batch"] == info["build"]["max_batch"] == 2 and info["metadata"]["fixed_batch"] == 2
    ((_, _, profile, _, _),) = [c for c in fake_trt.calls if c[0] == "build"]
    assert profile is None  # a static input takes no optimisation profile
    engine = TensorRTEngine(plan, max_batch=16)  # asking for more than the plan's batch is fine: it pads
    assert (engine.max_batch, engine.fixed_batch) == (2, 2)
    reference = OnnxRuntimeEngine(fixed, max_batch=16)
    x = np.random.default_rng(3).standard_normal((5, 3, 12, 12)).astype(np.float32)
    fake_trt.calls.clear()
    got = engine.infer_batches(fake_trt.cp.asarray(x), names, batch_size=16)
    want = reference.infer_batches(x, names, batch_size=16)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)
    shapes = {c[1] for c in fake_trt.calls if c[0] == "set_input_shape"}
    assert shapes == {(2, 3, 12, 12)} and sum(c[0] == "execute" for c in fake_trt.calls) == 3
    image = np.random.default_rng(4).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    gpu, cpu = Explainer(plan, backend="tensorrt", device="cuda", batch_size=8), Explainer(fixed, batch_size=8)
    for method, params in (("rise", {"n_masks": 9}), ("scorecam", {})):
        np.testing.assert_allclose(gpu.explain(image, method, **params).saliency_maps,
                                   cpu.explain(image, method, **params).saliency_maps, atol=1e-5)
