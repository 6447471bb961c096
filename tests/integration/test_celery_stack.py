"""The embedded stack with Celery: worker and beat as children of `Stack`.

Beat runs with a one-second maintenance interval here, so a slot passes
within the test's deadlines.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest
import redis

from events.log import RedisEventLog
from events.types import Maintain
from replay.celery_app import read_schedule_state, schedule_path
from tiermem.config import StackConfig
from tiermem.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INTERVAL_S = 1.0
PREFIX = "maintain:1000ms:"


def start_stack(ray_address: str, data_dir: Path) -> Stack:
    config = StackConfig(data_dir=str(data_dir), shards=1, ray_address=ray_address, maintain_interval_s=INTERVAL_S)
    config.router = msgspec.structs.replace(config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0})
    running = Stack(config, celery=True)
    running.start()
    return running


@pytest.fixture(scope="module")
def stack(ray_cluster, tmp_path_factory):
    """One stack for the tests that leave it running; each restarts what it kills."""
    running = start_stack(ray_cluster, tmp_path_factory.mktemp("celery-stack") / "data")
    yield running
    running.stop()


def beat_passes(stack: Stack) -> list[Maintain]:
    event_log = RedisEventLog(redis.Redis.from_url(stack.config.log_url or ""), stream=stack.config.log_stream)
    return [
        event
        for event in event_log.read(0, 100_000)
        if isinstance(event, Maintain) and (event.id or "").startswith(PREFIX)
    ]


def wait_for(condition, *, timeout: float, what: str):
    """Poll `condition` until it returns a true value, and return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def test_stack_starts_broker_worker_and_beat(stack):
    assert "broker" in stack.redis
    assert stack.config.broker_url == stack.redis["broker"].url
    assert stack.worker is not None
    assert stack.worker.poll() is None
    assert stack.beat is not None
    assert stack.beat.poll() is None
    assert stack.control_app().control.ping(destination=[stack.worker_name], timeout=2.0)


def test_beat_publishes_maintain(stack):
    passes = wait_for(lambda: len(beat_passes(stack)) >= 2, timeout=30, what="two Maintain events from beat")
    passes = beat_passes(stack)
    slots = [int((event.id or "").removeprefix(PREFIX)) for event in passes]
    assert len(set(slots)) == len(slots)
    assert slots == sorted(slots)
    assert all(event.ts is not None for event in passes)
    state = read_schedule_state(schedule_path(stack.config))
    assert state is not None
    assert state.beat_pid == stack.beat_pid
    assert state.entries["maintain"].total_run_count >= 1


def test_worker_restart_resumes_maintenance(stack):
    wait_for(lambda: beat_passes(stack), timeout=30, what="a Maintain event from beat")
    killed_pid = stack.worker_pid
    stack.kill_worker()
    assert stack.worker is not None
    assert stack.worker.returncode is not None
    before = len(beat_passes(stack))

    stack.start_worker()
    wait_for(lambda: len(beat_passes(stack)) > before, timeout=30, what="a Maintain event after the restart")
    assert stack.worker_pid != killed_pid


def test_stop_ends_celery_children(ray_cluster, tmp_path: Path):
    stack = start_stack(ray_cluster, tmp_path / "data")
    worker, beat = stack.worker, stack.beat
    stack.stop()
    assert worker is not None
    assert beat is not None
    assert worker.returncode is not None
    assert beat.returncode is not None
    assert stack.redis == {}


def test_stack_without_celery_starts_no_broker(ray_cluster, tmp_path: Path):
    config = StackConfig(data_dir=str(tmp_path / "data"), shards=1, ray_address=ray_cluster)
    config.router = msgspec.structs.replace(config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0})
    running = Stack(config, celery=False)
    try:
        running.start()
        assert "broker" not in running.redis
        assert running.config.broker_url is None
        assert running.worker is None
        assert running.beat is None
    finally:
        running.stop()


def test_worker_exit_at_start_reported(redis_factory, tmp_path: Path):
    from tiermem.servers import ServerError

    broker = redis_factory("broker")
    config = StackConfig(data_dir=str(tmp_path / "data"), broker_url=broker.url)
    running = Stack(config, celery=True)
    # No stack.json is written, so the worker cannot load its settings.
    with pytest.raises(ServerError, match="exited with status") as raised:
        running.start_worker(timeout=60)
    worker_log = Path(running.data_dir, "logs", "celery-worker.log").read_text()
    assert "celery-worker.log" in str(raised.value)
    assert "does not exist" in worker_log
    assert running.worker is not None
    assert running.worker.returncode is not None


def test_unreachable_broker_reported(tmp_path: Path):
    from tiermem.config import write_stack_config
    from tiermem.servers import ServerError, free_port

    config = StackConfig(data_dir=str(tmp_path / "data"), broker_url=f"redis://127.0.0.1:{free_port()}/0")
    running = Stack(config, celery=True)
    running.data_dir.mkdir(parents=True)
    write_stack_config(config, running.config_path)
    with pytest.raises(ServerError, match="is unreachable"):
        running.start_worker(timeout=60)
    assert running.worker is not None
    assert running.worker.returncode is not None
