"""The scheduler alone: bounded queue, cancellation before and during work, draining, and the codec."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from explainrt.errors import InvalidInputError
from explainrt.explainers.driver import Cancelled
from explainrt.server.scheduler import DeadlineExceeded, Job, QueueFull, Scheduler, ShuttingDown


def _blocker(release: threading.Event, started: threading.Event = None):
    def run(job):
        if started is not None:
            started.set()
        release.wait(10)
        return "done"
    return run


def test_full_queue_refuses_at_once_and_work_resumes():
    release, started = threading.Event(), threading.Event()
    sched = Scheduler(workers=1, queue_size=2)
    try:
        first = sched.submit(Job(_blocker(release, started)))
        assert started.wait(5)
        queued = [sched.submit(Job(lambda job, i=i: i)) for i in range(2)]
        assert sched.depth == 2 and sched.running == 1
        t0 = time.perf_counter()
        with pytest.raises(QueueFull, match="queue is full"):
            sched.submit(Job(lambda job: None))
        assert time.perf_counter() - t0 < 0.5  # refused at once, not after a wait
        release.set()
        assert first.result(5) == "done" and [f.result(5) for f in queued] == [0, 1]
    finally:
        sched.shutdown(5)


def test_cancelled_or_expired_job_never_runs():
    release, started = threading.Event(), threading.Event()
    ran = []
    sched = Scheduler(workers=1, queue_size=4)
    try:
        sched.submit(Job(_blocker(release, started)))
        assert started.wait(5)
        cancelled = Job(lambda job: ran.append("cancelled"))
        expired = Job(lambda job: ran.append("expired"), deadline=time.monotonic() + 0.01)
        sched.submit(cancelled)
        sched.submit(expired)
        cancelled.cancel.set()
        time.sleep(0.05)
        release.set()
        with pytest.raises(Cancelled):
            cancelled.future.result(5)
        with pytest.raises(DeadlineExceeded):
            expired.future.result(5)
        assert ran == []
    finally:
        sched.shutdown(5)


def test_blocking_submit_waits_for_a_slot_and_gives_up_when_cancelled():
    release, started = threading.Event(), threading.Event()
    sched = Scheduler(workers=1, queue_size=1)
    try:
        sched.submit(Job(_blocker(release, started)))
        assert started.wait(5)
        sched.submit(Job(lambda job: 1))
        waiting = Job(lambda job: 2)
        threading.Timer(0.1, waiting.cancel.set).start()
        with pytest.raises(Cancelled):
            sched.submit(waiting, wait=None)
        threading.Timer(0.1, release.set).start()
        assert sched.submit(Job(lambda job: 3), wait=None).result(5) == 3  # a slot frees up
    finally:
        sched.shutdown(5)


def test_shutdown_finishes_queued_work_and_refuses_new():
    sched = Scheduler(workers=2, queue_size=8)
    futures = [sched.submit(Job(lambda job, i=i: (time.sleep(0.02), i)[1])) for i in range(6)]
    assert sched.shutdown(5)
    assert [f.result(0) for f in futures] == list(range(6))
    with pytest.raises(ShuttingDown):
        sched.submit(Job(lambda job: None))


def test_codec_round_trip_and_checks():
    from explainrt.proto.explainrt.v1 import explainrt_pb2 as pb
    from explainrt.proto.codec import array_to_tensor, tensor_to_array

    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    t = array_to_tensor(x, pb.FLOAT16)
    assert list(t.shape) == [2, 3, 4] and len(t.data) == 48
    np.testing.assert_array_equal(tensor_to_array(t), x.astype(np.float16))
    with pytest.raises(InvalidInputError, match="needs 12 bytes"):
        tensor_to_array(pb.Tensor(data=b"\0" * 11, dtype=pb.UINT8, shape=[2, 2, 3]))
    with pytest.raises(InvalidInputError, match="dimension"):
        tensor_to_array(pb.Tensor(data=b"", dtype=pb.UINT8, shape=[0, 3]))
    with pytest.raises(InvalidInputError, match="not accepted"):
        tensor_to_array(pb.Tensor(data=b"\0\0", dtype=pb.DATA_TYPE_UNSPECIFIED, shape=[2]))
