"""The scheduler alone: bounded queue, cancellation before and during work, draining, and the codec."""
from __future__ import annotations

import contextlib
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


def test_cancelled_and_expired_jobs_free_their_queue_slot_at_once():
    """Dead work never refuses live work: a cancelled job leaves at its cancel, an expired one stops counting."""
    release, started = threading.Event(), threading.Event()
    sched = Scheduler(workers=1, queue_size=2)
    try:
        sched.submit(Job(_blocker(release, started)))
        assert started.wait(5)
        cancelled = Job(lambda job: "never")
        expired = Job(lambda job: "never", deadline=time.monotonic() + 0.05)
        sched.submit(cancelled)
        sched.submit(expired)
        with pytest.raises(QueueFull):
            sched.submit(Job(lambda job: None))
        cancelled.cancel.set()
        with pytest.raises(Cancelled):  # its caller hears at once, not when a worker gets to it
            cancelled.future.result(0.5)
        time.sleep(0.06)
        assert sched.depth == 0
        live = [sched.submit(Job(lambda job, i=i: i)) for i in range(2)]  # both slots are free again
        with pytest.raises(DeadlineExceeded):
            expired.future.result(0.5)
        release.set()
        assert [f.result(5) for f in live] == [0, 1]
    finally:
        sched.shutdown(5)


def _record(order, name):
    def run(job):
        order.append(name)
        return name
    return run


def _queued_behind_blocker(sched, jobs):
    """Submit ``jobs`` while one blocker holds the only worker; then release it and wait for all."""
    release, started = threading.Event(), threading.Event()
    sched.submit(Job(_blocker(release, started), cost=1))
    assert started.wait(5)
    for job in jobs:
        sched.submit(job)
    release.set()
    for job in jobs:
        job.future.result(5)


def test_cheap_requests_overtake_expensive_ones_and_priority_comes_first():
    order = []
    sched = Scheduler(workers=1, queue_size=8)
    try:
        _queued_behind_blocker(sched, [
            Job(_record(order, "scorecam"), cost=500), Job(_record(order, "sidu"), cost=300),
            Job(_record(order, "fem"), cost=1), Job(_record(order, "urgent-rise"), cost=4001, priority=5)])
        assert order == ["urgent-rise", "fem", "sidu", "scorecam"]
    finally:
        sched.shutdown(5)


def test_aging_an_expensive_request_is_not_starved_by_later_cheap_ones():
    """A job's key is arrival + expected run time: cheap jobs arriving after that instant queue behind it."""
    order = []
    sched = Scheduler(workers=1, queue_size=8)
    sched.seconds_per_pass = 0.001  # 100 passes: 0.1 s expected
    try:
        release, started = threading.Event(), threading.Event()
        sched.submit(Job(_blocker(release, started)))
        assert started.wait(5)
        expensive = Job(_record(order, "expensive"), cost=100)
        sched.submit(expensive)
        early = Job(_record(order, "early-cheap"), cost=1)
        sched.submit(early)
        time.sleep(0.15)  # past the expensive job's own expected run time
        late = Job(_record(order, "late-cheap"), cost=1)
        sched.submit(late)
        release.set()
        for job in (expensive, early, late):
            job.future.result(5)
        assert order == ["early-cheap", "expensive", "late-cheap"]
    finally:
        sched.shutdown(5)


def test_cheap_workers_are_kept_for_cheap_requests():
    release = threading.Event()
    sched = Scheduler(workers=1, cheap_workers=1, queue_size=8)
    try:
        slow = [Job(_blocker(release), cost=500) for _ in range(2)]
        for job in slow:
            sched.submit(job)
        assert _wait(lambda: sched.running == 1 and sched.depth == 1)  # the second expensive one waits
        fem = Job(lambda job: "fem", cost=1)
        sched.submit(fem)
        assert fem.future.result(2) == "fem"  # ran at once on the reserved worker
        release.set()
        assert [j.future.result(5) for j in slow] == ["done", "done"]
    finally:
        sched.shutdown(5)


def test_memory_budget_holds_jobs_that_do_not_fit_and_refuses_impossible_ones():
    from explainrt.server.scheduler import OverBudget

    release, started = threading.Event(), threading.Event()
    sched = Scheduler(workers=4, queue_size=8, memory_budget=100)
    try:
        big = Job(_blocker(release, started), cost=1, memory=80)
        sched.submit(big)
        assert started.wait(5)
        small = Job(lambda job: "small", cost=1, memory=20)
        too_big_now = Job(lambda job: "later", cost=1, memory=30)
        sched.submit(too_big_now)
        sched.submit(small)
        assert small.future.result(2) == "small"  # fits beside the big one
        time.sleep(0.1)
        assert not too_big_now.future.done() and sched.memory_in_use == 80
        release.set()
        assert too_big_now.future.result(5) == "later"
        with pytest.raises(OverBudget, match="more than this server's whole memory budget"):
            sched.submit(Job(lambda job: None, memory=101))
    finally:
        sched.shutdown(5)


def _wait(condition, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


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


def test_an_expensive_job_that_cannot_finish_before_its_deadline_is_not_started():
    """At the measured pace a 100-pass job needs 1 s; with 0.3 s left it is refused, not started and wasted."""
    from explainrt.server.scheduler import DeadlineExceeded

    ran = []
    sched = Scheduler(workers=1, queue_size=4)
    try:
        paced = Job(lambda job: time.sleep(0.1), cost=10)  # an expensive job measures the pace: 10 ms per pass
        sched.submit(paced)
        paced.future.result(5)
        assert 0.005 < sched.seconds_per_pass < 0.05
        release, started = threading.Event(), threading.Event()
        sched.submit(Job(_blocker(release, started), cost=1))
        assert started.wait(5)
        doomed = Job(lambda job: ran.append("doomed"), cost=100, deadline=time.monotonic() + 0.3)
        roomy = Job(lambda job: ran.append("roomy"), cost=10, deadline=time.monotonic() + 30)
        cheap = Job(lambda job: ran.append("cheap"), cost=1, deadline=time.monotonic() + 0.3)
        for job in (doomed, roomy, cheap):
            sched.submit(job)
        with pytest.raises(DeadlineExceeded, match="would not finish before its deadline"):
            doomed.future.result(2)  # told at once, while the worker is still busy
        release.set()
        roomy.future.result(5), cheap.future.result(5)
        assert sorted(ran) == ["cheap", "roomy"]  # cheap jobs are never shed: they are the ones to keep fast
    finally:
        sched.shutdown(5)



def test_a_waiting_expensive_job_leaves_the_queue_once_it_can_no_longer_finish():
    """It fits when submitted, waits behind a long job, and is refused before its deadline, the
    moment it could no longer finish even if started: never started and cancelled half-way."""
    ran = []
    sched = Scheduler(workers=1, queue_size=8, cheap_workers=1)
    release = threading.Event()
    try:
        paced = Job(lambda job: time.sleep(0.1), cost=10)  # 10 ms per pass (up to ~20 on a loaded machine)
        sched.submit(paced)
        paced.future.result(5)
        started = threading.Event()
        sched.submit(Job(_blocker(release, started), cost=50))  # holds the one expensive thread
        assert started.wait(5)
        deadline = time.monotonic() + 3.0
        waiting = Job(lambda job: ran.append("waiting"), cost=100, deadline=deadline)  # 1-2 s of work
        sched.submit(waiting)
        time.sleep(0.3)
        assert not waiting.future.done()  # it could still make it
        with pytest.raises(DeadlineExceeded, match="would not finish before its deadline"):
            waiting.future.result(5)
        assert time.monotonic() < deadline  # told while there was time left, not at the deadline
        cheap = Job(lambda job: ran.append("cheap"), cost=1, deadline=time.monotonic() + 0.5)
        sched.submit(cheap)
        cheap.future.result(5)
        release.set()
        assert sched.shutdown(5)
        assert ran == ["cheap"]
    finally:
        release.set()
        sched.shutdown(5)


def test_a_job_leaves_the_queue_once_even_when_both_expired_and_hopeless():
    seen = []
    sched = Scheduler(workers=1, queue_size=8, on_dequeue=lambda job, s: seen.append(job.name))
    release = threading.Event()
    try:
        paced = Job(lambda job: time.sleep(0.05), cost=10, name="pace")
        sched.submit(paced)
        paced.future.result(5)
        started = threading.Event()
        sched.submit(Job(_blocker(release, started), cost=10, name="busy"))
        assert started.wait(5)
        late = Job(lambda job: None, cost=1000, deadline=time.monotonic() + 0.2, name="late")
        with contextlib.suppress(DeadlineExceeded):
            sched.submit(late)
        time.sleep(0.3)
        assert sched.depth == 0
        with pytest.raises(DeadlineExceeded):
            late.future.result(1)
        assert seen.count("late") == 1
    finally:
        release.set()
        sched.shutdown(5)
