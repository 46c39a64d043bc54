"""Stream order and staging (runtime/staging.py) on the CPU, against the CuPy stand-in's stream model."""
import os
import sys
import threading

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
from fake_cupy import happens_before, installed_fake_cupy  # noqa: E402

from explainrt.runtime import staging  # noqa: E402


@pytest.fixture
def fake_cp():
    with installed_fake_cupy() as fake:
        yield fake


def test_every_default_stream_is_recognised(fake_cp):
    assert [staging.is_default_stream(p) for p in (0, 1, 2, 12345)] == [True, True, True, False]
    assert staging.is_default_stream(fake_cp.cuda.Stream(ptds=True))  # CuPy's per-thread default stream
    assert not staging.is_default_stream(fake_cp.cuda.Stream(non_blocking=True))


def test_side_stream_is_reused_per_thread(fake_cp):
    first, again = staging.side_stream(fake_cp), staging.side_stream(fake_cp)
    other = []
    thread = threading.Thread(target=lambda: other.append(staging.side_stream(fake_cp)))
    thread.start()
    thread.join()
    assert first is again and other[0] is not first and first.non_blocking


class _Engine:
    """Just what run_in_chunks needs: a CuPy-speaking engine that sums its input rows."""

    def __init__(self, xp, max_batch=4):
        self.xp, self.max_batch, self.input_dtype, self.calls = xp, max_batch, "float32", []

    def infer(self, x, names):
        self.calls.append(int(x.shape[0]))
        return {"sum": self.xp.asarray(np.asarray(x).reshape(x.shape[0], -1).sum(axis=1))}


@pytest.mark.parametrize("gpu", [False, True])
def test_run_in_chunks_writes_runs_and_takes_every_chunk(fake_cp, gpu):
    xp = fake_cp if gpu else np
    engine = _Engine(xp)
    data = np.arange(10 * 6, dtype=np.float32).reshape(10, 2, 3)
    got = np.zeros(10, np.float32)
    starts = []

    def write(buffer, start, b):
        buffer[...] = data[start:start + b]

    def take(start, b, out):
        got[start:start + b] = np.asarray(out["sum"])

    staging.run_in_chunks(engine, 10, 8, (2, 3), write, ["sum"], take, before_chunk=starts.append)
    assert engine.calls == [4, 4, 2] and starts == [0, 4, 8]  # batch size capped at max_batch
    np.testing.assert_array_equal(got, data.reshape(10, -1).sum(axis=1))


def test_run_in_chunks_orders_main_after_side_when_a_write_fails(fake_cp):
    """Work enqueued on the side stream by a failing write must be waited for before the
    staging buffers are freed (they go back to the main stream's pool)."""
    log = fake_cp.log
    engine = _Engine(fake_cp)

    def write(buffer, start, b):
        log.op("partial write")  # enqueued on the side stream, then the write fails
        if start == 4:
            raise ValueError("bad chunk")

    with pytest.raises(ValueError, match="bad chunk"):
        staging.run_in_chunks(engine, 10, 4, (2, 3), write, ["sum"], lambda *a: None)
    main = log.current[0]
    failed = [(s, i) for what, s, i in log.ops if what == "partial write"][-1]
    after = log.op("free staging buffers", main)
    assert happens_before(log, failed, after)


def test_handoff_between_streams(fake_cp):
    """Arrays made on one thread's stream reach another's through handoff/receive: ordered, and
    copied into the receiver's pool, the originals kept until the copies are done."""
    log = fake_cp.log
    producer, consumer = fake_cp.cuda.Stream(non_blocking=True), fake_cp.cuda.Stream(non_blocking=True)
    with producer:
        x = fake_cp.asarray(np.arange(6, dtype=np.float32))
        made = (producer, producer.count - 1)
        item = staging.handoff(fake_cp, {"x": x})
    with consumer:
        got = staging.receive(fake_cp, item)["x"]
        used = log.op("consumer reads x")
    assert happens_before(log, made, used)
    assert got is not x and np.array_equal(got, x)
    assert [what for what, s, i in log.ops if s is consumer][0] == "array"  # the copy is the consumer's
    assert staging.receive(np, staging.handoff(np, {"x": 1}))["x"] == 1  # CPU: passed as is


def test_receive_without_copy_is_still_ordered(fake_cp):
    """The batcher's engine input: the consumer's stream waits for the producer, and nothing is copied."""
    log = fake_cp.log
    producer, consumer = fake_cp.cuda.Stream(non_blocking=True), fake_cp.cuda.Stream(non_blocking=True)
    with producer:
        x = fake_cp.asarray(np.arange(6, dtype=np.float32))
        made = (producer, producer.count - 1)
        item = staging.handoff(fake_cp, {"x": x})
    with consumer:
        got = staging.receive(fake_cp, item, copy=False)["x"]
        used = log.op("consumer reads x")
    assert got is x and happens_before(log, made, used)
    assert not [what for what, s, i in log.ops if s is consumer and what == "array"]  # no copy on the consumer


def test_engine_handoff_is_a_no_op_on_cpu_engines(tmp_path):
    torch = pytest.importorskip("torch")
    from explainrt.export import export_torch
    from explainrt.runtime.ort_engine import OnnxRuntimeEngine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    path = str(tmp_path / "m.onnx")
    export_torch(model.eval(), path, input_size=(8, 8))
    engine = OnnxRuntimeEngine(path, max_batch=2)
    x = np.zeros((1, 3, 8, 8), np.float32)
    assert engine.receive(engine.handoff({"input": x}))["input"] is x


def test_engine_input_copies_only_what_the_engine_cannot_take(fake_cp):
    stage = staging.EngineInput(fake_cp, 4, np.float32)
    aligned = fake_cp.zeros((3, 2, 5), dtype=np.float32)
    assert stage.stage(aligned) is aligned and stage.copies == 0
    flat = fake_cp.arange(2 * 2 * 5 + 1, dtype=np.float32)
    misaligned = flat[1:].reshape(2, 2, 5)
    strided = fake_cp.zeros((3, 2, 10), dtype=np.float32)[:, :, ::2]
    half = fake_cp.zeros((3, 2, 5), dtype=np.float16)
    for x in (misaligned, strided, half):
        staged = stage.stage(x)
        assert staged.dtype == np.float32 and staged.flags.c_contiguous and staging.is_aligned(staged)
        np.testing.assert_array_equal(staged, np.asarray(x, np.float32))
    assert stage.copies == 3
