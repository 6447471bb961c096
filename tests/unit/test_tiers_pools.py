"""Tests of `AdaptivePool` and `TierPools`: bounds, exactly-once runs, shrinking, shutdown.

Tasks block on `threading.Event`s that the test opens, so the backlog at
each step is known. Every wait has a deadline, and no test measures how
fast anything runs.
"""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tiers.pools import (
    AdaptivePool,
    PoolClosedError,
    PoolFullError,
    PoolSettings,
    TierPools,
    TierPoolSettings,
)

# Deadline of every wait on a thread, far above what any step needs.
DEADLINE_S = 10.0

# Long enough that no worker leaves while a test keeps its tasks blocked.
NO_SHRINK_S = 600.0


class Recorder:
    """Tasks that block on a gate and record each run and the peak of concurrent runs."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.runs: list[int] = []
        self.running = 0
        self.peak_running = 0
        self.started = threading.Semaphore(0)

    def task(self, number: int, fail: bool = False) -> int:
        with self.lock:
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
        self.started.release()
        try:
            if not self.gate.wait(DEADLINE_S):
                raise AssertionError(f"task {number}: the gate stayed closed")
            with self.lock:
                self.runs.append(number)
            if fail:
                raise ValueError(f"task {number} failed on purpose")
            return number
        finally:
            with self.lock:
                self.running -= 1

    def wait_started(self, count: int) -> None:
        for _ in range(count):
            assert self.started.acquire(timeout=DEADLINE_S), "a task did not start"


def make_pool(**options) -> AdaptivePool:
    options.setdefault("idle_timeout_s", NO_SHRINK_S)
    return AdaptivePool("test", **options)


@pytest.fixture
def pools():
    """Collect the pools a test starts, and shut each down when it ends."""
    started: list[AdaptivePool] = []

    def start(**options) -> AdaptivePool:
        pool = make_pool(**options)
        started.append(pool)
        return pool

    yield start
    for pool in started:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------- bounds


@settings(max_examples=40, deadline=None)
@given(
    min_workers=st.integers(0, 3),
    extra_workers=st.integers(0, 3),
    queue_size=st.integers(1, 6),
    grow_threshold=st.integers(0, 2),
    failures=st.lists(st.booleans(), min_size=0, max_size=14),
)
def test_pool_bounds_and_exactly_once(
    min_workers, extra_workers, queue_size, grow_threshold, failures
):
    """Under any submit pattern, the pool stays in bounds and runs each accepted task once."""
    max_workers = min_workers + max(1, extra_workers)
    recorder = Recorder()
    pool = make_pool(
        min_workers=min_workers,
        max_workers=max_workers,
        queue_size=queue_size,
        grow_threshold=grow_threshold,
    )
    accepted: dict[int, object] = {}
    rejected = 0
    try:
        for number, fail in enumerate(failures):
            try:
                accepted[number] = pool.submit(recorder.task, number, fail)
            except PoolFullError as error:
                rejected += 1
                assert error.queue_size == queue_size
            stats = pool.stats()
            assert stats.workers <= max_workers
            assert stats.workers >= min_workers
            assert stats.queued <= queue_size
            # No task can finish while the gate is closed, so the pool contains
            # them all, with max_workers running and queue_size waiting at most.
            assert len(accepted) <= max_workers + queue_size
            if grow_threshold == 0:
                assert stats.workers >= min(max_workers, len(accepted))
        if len(failures) <= queue_size:
            assert rejected == 0
    finally:
        recorder.gate.set()
        pool.shutdown(wait=True)

    stats = pool.stats()
    assert sorted(recorder.runs) == sorted(accepted)
    assert len(recorder.runs) == len(set(recorder.runs))
    assert recorder.peak_running <= max_workers
    assert stats.peak_workers <= max_workers
    assert stats.submitted == len(accepted)
    assert stats.rejected == rejected
    assert stats.completed == sum(not failures[number] for number in accepted)
    assert stats.failed == sum(failures[number] for number in accepted)
    assert stats.cancelled == 0
    assert stats.workers == 0
    for number, future in accepted.items():
        if failures[number]:
            assert isinstance(future.exception(timeout=DEADLINE_S), ValueError)
        else:
            assert future.result(timeout=DEADLINE_S) == number


def test_pool_grows_to_max_under_backlog(pools):
    recorder = Recorder()
    pool = pools(min_workers=0, max_workers=3, queue_size=10)

    futures = [pool.submit(recorder.task, number) for number in range(5)]
    recorder.wait_started(3)

    stats = pool.stats()
    assert stats.workers == 3
    assert stats.busy == 3
    assert stats.queued == 2
    recorder.gate.set()
    assert [future.result(timeout=DEADLINE_S) for future in futures] == list(range(5))


def test_pool_grow_threshold_delays_growth(pools):
    recorder = Recorder()
    pool = pools(min_workers=1, max_workers=4, queue_size=10, grow_threshold=2)
    assert pool.wait_for_workers(1, DEADLINE_S)

    pool.submit(recorder.task, 0)
    recorder.wait_started(1)
    pool.submit(recorder.task, 1)
    pool.submit(recorder.task, 2)

    # Two tasks wait and no worker is idle: not more than the threshold.
    assert pool.stats().workers == 1
    pool.submit(recorder.task, 3)
    assert pool.stats().workers == 2
    recorder.gate.set()


def test_pool_starts_min_workers(pools):
    pool = pools(min_workers=2, max_workers=4)

    assert pool.wait_for_workers(2, DEADLINE_S)
    assert pool.stats().workers == 2


# ----------------------------------------------------------------- full queue


def test_submit_full_queue_raises(pools):
    recorder = Recorder()
    pool = pools(max_workers=1, queue_size=1)
    pool.submit(recorder.task, 0)
    recorder.wait_started(1)
    pool.submit(recorder.task, 1)

    with pytest.raises(PoolFullError, match="pool 'test' is full: 1 tasks wait") as raised:
        pool.submit(recorder.task, 2)

    assert raised.value.pool == "test"
    assert raised.value.queue_size == 1
    assert pool.stats().rejected == 1
    assert pool.stats().submitted == 2
    recorder.gate.set()


def test_submit_waits_for_room(pools):
    recorder = Recorder()
    pool = pools(max_workers=1, queue_size=1, submit_timeout_s=DEADLINE_S)
    first = pool.submit(recorder.task, 0)
    recorder.wait_started(1)
    pool.submit(recorder.task, 1)
    submitted = threading.Event()
    third = []

    def submit_third() -> None:
        third.append(pool.submit(recorder.task, 2))
        submitted.set()

    submitter = threading.Thread(target=submit_third)
    submitter.start()
    recorder.gate.set()

    assert submitted.wait(DEADLINE_S)
    submitter.join(DEADLINE_S)
    assert first.result(timeout=DEADLINE_S) == 0
    assert third[0].result(timeout=DEADLINE_S) == 2
    assert pool.stats().rejected == 0


def test_submit_wait_times_out(pools):
    recorder = Recorder()
    pool = pools(max_workers=1, queue_size=1, submit_timeout_s=0.05)
    pool.submit(recorder.task, 0)
    recorder.wait_started(1)
    pool.submit(recorder.task, 1)

    with pytest.raises(PoolFullError, match="wait for 0.05 s"):
        pool.submit(recorder.task, 2)

    assert pool.stats().rejected == 1
    recorder.gate.set()


def test_blocked_submit_raises_on_shutdown(pools):
    recorder = Recorder()
    pool = pools(max_workers=1, queue_size=1, submit_timeout_s=DEADLINE_S)
    pool.submit(recorder.task, 0)
    recorder.wait_started(1)
    pool.submit(recorder.task, 1)
    errors: list[BaseException] = []

    def submit_third() -> None:
        try:
            pool.submit(recorder.task, 2)
        except PoolClosedError as error:
            errors.append(error)

    submitter = threading.Thread(target=submit_third)
    submitter.start()
    pool.shutdown(wait=False)
    submitter.join(DEADLINE_S)
    recorder.gate.set()

    assert not submitter.is_alive()
    # The submit either found the pool closed at once or was woken by shutdown.
    assert len(errors) == 1
    assert pool.stats().submitted == 2


# ----------------------------------------------------------------- shrinking


def test_pool_shrinks_after_idle(pools):
    recorder = Recorder()
    pool = pools(min_workers=1, max_workers=3, queue_size=5, idle_timeout_s=0.05)
    futures = [pool.submit(recorder.task, number) for number in range(3)]
    recorder.wait_started(3)
    assert pool.stats().workers == 3

    recorder.gate.set()
    for future in futures:
        future.result(timeout=DEADLINE_S)

    assert pool.wait_for_workers(1, DEADLINE_S)
    assert pool.stats().workers == 1


def test_pool_keeps_min_workers_when_idle(pools):
    pool = pools(min_workers=1, max_workers=2, idle_timeout_s=0.02)
    assert pool.wait_for_workers(1, DEADLINE_S)

    # Many idle timeouts pass in this wait, and the last worker stays.
    assert not pool.wait_for_workers(0, 0.3)
    assert pool.stats().workers == 1


def test_pool_regrows_after_shrinking(pools):
    pool = pools(min_workers=0, max_workers=2, idle_timeout_s=0.02)
    assert pool.submit(lambda: "first").result(timeout=DEADLINE_S) == "first"
    assert pool.wait_for_workers(0, DEADLINE_S)

    assert pool.submit(lambda: "second").result(timeout=DEADLINE_S) == "second"
    assert pool.stats().completed == 2


# ----------------------------------------------------------------- tasks


def test_failed_task_keeps_worker(pools):
    pool = pools(max_workers=1)

    def fail() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        pool.submit(fail).result(timeout=DEADLINE_S)
    assert pool.submit(lambda: 7).result(timeout=DEADLINE_S) == 7

    stats = pool.stats()
    assert stats.failed == 1
    assert stats.completed == 1


def test_cancelled_future_does_not_run(pools):
    recorder = Recorder()
    pool = pools(max_workers=1, queue_size=4)
    pool.submit(recorder.task, 0)
    recorder.wait_started(1)
    queued = pool.submit(recorder.task, 1)

    assert queued.cancel()
    recorder.gate.set()
    pool.shutdown(wait=True)

    assert recorder.runs == [0]
    assert pool.stats().cancelled == 1
    assert pool.stats().completed == 1


def test_counts_include_task_once_future_resolves(pools):
    pool = pools(max_workers=1)

    pool.submit(lambda: None).result(timeout=DEADLINE_S)

    stats = pool.stats()
    assert stats.completed == 1
    assert stats.busy == 0


def test_busy_seconds_and_utilization(pools):
    recorder = Recorder()
    pool = pools(max_workers=2)
    future = pool.submit(recorder.task, 0)
    recorder.wait_started(1)

    running = pool.stats()
    recorder.gate.set()
    future.result(timeout=DEADLINE_S)
    finished = pool.stats()

    assert running.busy == 1
    assert running.busy_seconds > 0
    assert finished.busy_seconds >= running.busy_seconds
    assert 0 < finished.utilization <= 1
    assert finished.uptime_seconds >= finished.busy_seconds / finished.max_workers


# ----------------------------------------------------------------- shutdown


def test_shutdown_drains_queue(pools):
    recorder = Recorder()
    pool = pools(max_workers=1, queue_size=5)
    futures = [pool.submit(recorder.task, number) for number in range(5)]
    recorder.wait_started(1)

    pool.shutdown(wait=False)
    with pytest.raises(PoolClosedError, match="pool 'test' is shut down"):
        pool.submit(recorder.task, 5)
    recorder.gate.set()
    pool.shutdown(wait=True)

    assert recorder.runs == [0, 1, 2, 3, 4]
    assert all(future.done() for future in futures)
    assert pool.stats().completed == 5
    assert pool.stats().workers == 0


def test_shutdown_cancels_queued(pools):
    recorder = Recorder()
    pool = pools(max_workers=1, queue_size=5)
    running = pool.submit(recorder.task, 0)
    recorder.wait_started(1)
    queued = [pool.submit(recorder.task, number) for number in range(1, 4)]

    pool.shutdown(wait=False, cancel_futures=True)
    recorder.gate.set()
    pool.shutdown(wait=True)

    assert running.result(timeout=DEADLINE_S) == 0
    for future in queued:
        with pytest.raises(CancelledError):
            future.result(timeout=DEADLINE_S)
    assert recorder.runs == [0]
    assert pool.stats().cancelled == 3
    assert pool.stats().completed == 1


def test_closed_error_is_runtime_error(pools):
    pool = pools()
    pool.shutdown()

    with pytest.raises(RuntimeError):
        pool.submit(print)


def test_pool_as_context_manager():
    with make_pool(max_workers=2) as pool:
        futures = [pool.submit(pow, 2, number) for number in range(4)]

    assert [future.result() for future in futures] == [1, 2, 4, 8]
    assert pool.stats().workers == 0


def test_pool_logs_start_resize_stop():
    with capture_logs() as logs:
        pool = make_pool(max_workers=1, idle_timeout_s=0.02)
        pool.submit(lambda: None).result(timeout=DEADLINE_S)
        assert pool.wait_for_workers(0, DEADLINE_S)
        pool.shutdown()

    events = [(entry["event"], entry["log_level"]) for entry in logs]
    assert events[0] == ("pool.started", "info")
    assert ("pool.resized", "debug") in events
    assert events[-1] == ("pool.stopped", "info")
    assert all(entry["pool"] == "test" for entry in logs)


# ----------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_workers": -1}, "min_workers -1 is invalid"),
        ({"max_workers": 0}, "max_workers 0 is invalid"),
        ({"min_workers": 3, "max_workers": 2}, "min_workers 3 exceeds max_workers 2"),
        ({"queue_size": 0}, "queue_size 0 is invalid"),
        ({"idle_timeout_s": 0}, "idle_timeout_s 0 is invalid"),
        ({"grow_threshold": -1}, "grow_threshold -1 is invalid"),
        ({"submit_timeout_s": -1}, "submit_timeout_s -1 is invalid"),
    ],
)
def test_pool_invalid_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        AdaptivePool("test", **options)


def test_tier_pool_settings_invalid_idle_timeout():
    with pytest.raises(ValueError, match="idle_timeout_s -1 is invalid"):
        TierPoolSettings(idle_timeout_s=-1)


def test_tier_pools_sized_per_tier():
    settings_ = TierPoolSettings(
        stm=PoolSettings(min_workers=0, max_workers=1, queue_size=2),
        im=PoolSettings(min_workers=1, max_workers=2, queue_size=3),
        ltm=PoolSettings(min_workers=2, max_workers=4, queue_size=5),
        idle_timeout_s=NO_SHRINK_S,
    )
    tier_pools = TierPools(settings_, context={"shard": 3})
    try:
        assert list(tier_pools) == ["stm", "im", "ltm"]
        assert tier_pools["ltm"].wait_for_workers(2, DEADLINE_S)
        stats = tier_pools.stats()
        assert [item.name for item in stats] == ["stm", "im", "ltm"]
        assert [(item.min_workers, item.max_workers, item.queue_size) for item in stats] == [
            (0, 1, 2),
            (1, 2, 3),
            (2, 4, 5),
        ]
        assert tier_pools["im"].idle_timeout_s == NO_SHRINK_S
    finally:
        tier_pools.shutdown()

    assert [item.workers for item in tier_pools.stats()] == [0, 0, 0]


def test_tier_pool_settings_unknown_tier():
    with pytest.raises(ValueError, match="tier 'cache' is unknown: use one of stm, im, ltm"):
        TierPoolSettings().for_tier("cache")
