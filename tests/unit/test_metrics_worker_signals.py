"""The worker's metrics in this process: signal handlers, replay progress, scrape-time reads.

The handlers are driven by sending Celery's signals directly, with the
solo-pool layout (tasks run in the main process). A prefork worker in
multiprocess mode is covered by tests/integration/test_metrics_worker.py.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import signals
from prometheus_client import CollectorRegistry

import replay.metrics
from handlers.sharding import shard_of
from replay.metrics import (
    PORT_ENV,
    StackCollector,
    WorkerMetrics,
    clear_multiprocess_dir,
    projection_checkpoint_reader,
    replay_progress,
    worker_metrics,
)
from replay.projections.db import (
    connect,
    create_core_tables,
    write_checkpoint,
    write_transaction,
)
from replay.projections.stats import stats_projection
from tiermem.config import StackConfig


class FakeTask:
    """Stands in for a Celery task as a signal's sender (which must be hashable)."""

    name = "tiermem.projections.run"


class FakeConsumer:
    """Stands in for the worker's consumer, the sender of `worker_ready`."""

    def __init__(self, config: StackConfig | None) -> None:
        tasks = {FakeTask.name: FakeTask, "celery.chord": None}
        self.app = SimpleNamespace(
            conf=SimpleNamespace(tiermem_stack=config), tasks=tasks
        )
        self.pool = None


TASK = FakeTask()


@pytest.fixture
def enabled(monkeypatch):
    """Worker metrics on (port 0), single-process, with a fresh process state."""
    monkeypatch.setenv(PORT_ENV, "0")
    monkeypatch.delenv(replay.metrics.MULTIPROCESS_ENV, raising=False)
    monkeypatch.setattr(replay.metrics, "_state", replay.metrics._ProcessState())
    yield replay.metrics._state
    if replay.metrics._state.endpoint is not None:
        replay.metrics._state.endpoint.stop()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# ---------------------------------------------------------------- tasks


def test_success_counted_with_duration(enabled):
    signals.task_prerun.send(sender=TASK, task_id="t1", task=TASK)
    signals.task_postrun.send(sender=TASK, task_id="t1", task=TASK, state="SUCCESS")
    registry = enabled.registry
    assert (
        value(registry, "tiermem_worker_tasks_total", task=TASK.name, state="success")
        == 1
    )
    assert value(registry, "tiermem_worker_tasks_started_total", task=TASK.name) == 1
    assert (
        value(registry, "tiermem_worker_task_duration_seconds_count", task=TASK.name)
        == 1
    )


def test_duration_series_exists_while_task_runs(enabled):
    """The duration series of a running task exists, at count 0, from its start."""
    signals.task_prerun.send(sender=TASK, task_id="t9", task=TASK)
    registry = enabled.registry
    assert (
        value(registry, "tiermem_worker_task_duration_seconds_count", task=TASK.name)
        == 0
    )
    assert value(registry, "tiermem_worker_tasks_started_total", task=TASK.name) == 1


def test_failure_in_run_counted_once(enabled):
    signals.task_prerun.send(sender=TASK, task_id="t2", task=TASK)
    signals.task_failure.send(sender=TASK, task_id="t2", exception=ValueError("bad"))
    signals.task_postrun.send(sender=TASK, task_id="t2", task=TASK, state="FAILURE")
    assert (
        value(
            enabled.registry,
            "tiermem_worker_tasks_total",
            task=TASK.name,
            state="failure",
        )
        == 1
    )


def test_failure_outside_run_counted(enabled):
    """A lost pool process: the main process reports a failure for a task it never ran."""
    signals.task_failure.send(
        sender=TASK, task_id="t3", exception=RuntimeError("worker lost")
    )
    assert (
        value(
            enabled.registry,
            "tiermem_worker_tasks_total",
            task=TASK.name,
            state="failure",
        )
        == 1
    )
    assert (
        value(
            enabled.registry,
            "tiermem_worker_task_duration_seconds_count",
            task=TASK.name,
        )
        is None
    )


def test_retry_counted(enabled):
    signals.task_prerun.send(sender=TASK, task_id="t4", task=TASK)
    signals.task_postrun.send(sender=TASK, task_id="t4", task=TASK, state="RETRY")
    assert (
        value(
            enabled.registry,
            "tiermem_worker_tasks_total",
            task=TASK.name,
            state="retry",
        )
        == 1
    )


def test_revoked_counted(enabled):
    signals.task_revoked.send(
        sender=TASK, request=None, terminated=False, signum=None, expired=True
    )
    assert (
        value(
            enabled.registry,
            "tiermem_worker_tasks_total",
            task=TASK.name,
            state="revoked",
        )
        == 1
    )


def test_rejected_messages_counted_by_reason(enabled):
    signals.task_unknown.send(
        sender=None, message=None, exc=None, name="no.such.task", id="x"
    )
    signals.task_rejected.send(sender=None, message=None, exc=None)
    signals.task_rejected.send(sender=None, message=None, exc=None)
    assert (
        value(
            enabled.registry,
            "tiermem_worker_messages_rejected_total",
            reason="unknown_task",
        )
        == 1
    )
    assert (
        value(
            enabled.registry, "tiermem_worker_messages_rejected_total", reason="invalid"
        )
        == 2
    )


def test_signals_ignored_when_off(monkeypatch):
    monkeypatch.delenv(PORT_ENV, raising=False)
    monkeypatch.setattr(replay.metrics, "_state", replay.metrics._ProcessState())
    signals.task_prerun.send(sender=TASK, task_id="t5", task=TASK)
    signals.task_postrun.send(sender=TASK, task_id="t5", task=TASK, state="SUCCESS")
    assert worker_metrics() is None
    assert replay.metrics._state.metrics is None


@pytest.mark.parametrize("text", ["http", "-1", "70000"])
def test_invalid_port_turns_metrics_off(monkeypatch, text):
    monkeypatch.setenv(PORT_ENV, text)
    monkeypatch.setattr(replay.metrics, "_state", replay.metrics._ProcessState())
    assert worker_metrics() is None


# ---------------------------------------------------------------- endpoint


def test_worker_ready_starts_endpoint(enabled, tmp_path):
    config = StackConfig(
        data_dir=str(tmp_path), shards=2, log_url="redis://127.0.0.1:1/0"
    )
    signals.worker_ready.send(sender=FakeConsumer(config))
    endpoint = enabled.endpoint
    assert endpoint is not None
    with urllib.request.urlopen(endpoint.url, timeout=10) as response:
        body = response.read().decode()
    # Created at start, so the series is there before the first task.
    assert (
        'tiermem_worker_tasks_total{state="success",task="tiermem.projections.run"} 0.0'
        in body
    )
    assert "celery.chord" not in body
    # The database does not exist yet: every built-in projection is at 0.
    assert 'tiermem_worker_projection_checkpoint_seq{projection="search"} 0.0' in body
    # Nothing listens on port 1, so the log's last seq is left out.
    assert "tiermem_worker_log_last_seq" not in body


def test_worker_shutdown_stops_endpoint(enabled):
    signals.worker_ready.send(sender=FakeConsumer(None))
    assert enabled.endpoint is not None
    signals.worker_shutdown.send(sender=None)
    assert enabled.endpoint is None


def test_clear_multiprocess_dir_removes_value_files(tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"x")
    (directory / "gauge_mostrecent_123.db").write_bytes(b"x")
    (directory / "notes.txt").write_text("kept")
    assert clear_multiprocess_dir(directory) == 2
    assert sorted(path.name for path in directory.iterdir()) == ["notes.txt"]


def test_clear_multiprocess_dir_creates_missing(tmp_path):
    assert clear_multiprocess_dir(tmp_path / "new" / "dir") == 0
    assert (tmp_path / "new" / "dir").is_dir()


# ---------------------------------------------------------------- replay


def test_replay_progress_sets_gauges(enabled):
    registry = enabled.registry
    labels = {"operation": "verify", "shard": "1"}
    with replay_progress("verify", 1, 500) as progress:
        progress(200)
        progress(50)
        assert value(registry, "tiermem_worker_replay_running", **labels) == 1
        assert value(registry, "tiermem_worker_replay_events_read", **labels) == 250
    assert value(registry, "tiermem_worker_replay_running", **labels) == 0
    assert value(registry, "tiermem_worker_replay_until_seq", **labels) == 500


def test_replay_progress_resets_on_new_run(enabled):
    with replay_progress("snapshot", 0, 10) as progress:
        progress(10)
    with replay_progress("snapshot", 0, 20):
        read = value(
            enabled.registry,
            "tiermem_worker_replay_events_read",
            operation="snapshot",
            shard="0",
        )
    assert read == 0


def test_replay_progress_marks_end_after_error(enabled):
    with pytest.raises(RuntimeError), replay_progress("view", 2, 5):
        raise RuntimeError("replay failed")
    assert (
        value(
            enabled.registry,
            "tiermem_worker_replay_running",
            operation="view",
            shard="2",
        )
        == 0
    )


def test_replay_progress_noop_when_off(monkeypatch):
    monkeypatch.delenv(PORT_ENV, raising=False)
    monkeypatch.setattr(replay.metrics, "_state", replay.metrics._ProcessState())
    with replay_progress("verify", 0, 10) as progress:
        progress(5)
    assert replay.metrics._state.metrics is None


# ---------------------------------------------------------------- read at scrape


def make_db(
    path: Path, checkpoints: dict[str, int], tiers: list[tuple[str, str, int]] = ()
) -> None:
    conn = connect(path)
    with write_transaction(conn):
        create_core_tables(conn)
        stats_projection().setup(conn)
        for name, seq in checkpoints.items():
            write_checkpoint(conn, name, seq, 0)
        for namespace, tier, records in tiers:
            conn.execute(
                "INSERT INTO stats_tiers (namespace, tier, records, bytes) VALUES (?, ?, ?, 0)",
                (namespace, tier, records),
            )
    conn.close()


class FixedLog:
    def __init__(self, last: int) -> None:
        self.last = last

    def last_seq(self) -> int:
        return self.last


class DownLog:
    def last_seq(self) -> int:
        import redis

        raise redis.ConnectionError("connection refused")


def collector_registry(tmp_path: Path, event_log, shards: int = 2) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    config = StackConfig(
        data_dir=str(tmp_path), shards=shards, log_url="redis://127.0.0.1:1/0"
    )
    registry.register(StackCollector(config, event_log=event_log))
    return registry


def test_checkpoint_reader_missing_db_zero(tmp_path):
    assert projection_checkpoint_reader(tmp_path / "absent.sqlite3")() == 0


def test_checkpoint_reader_missing_table_zero(tmp_path):
    connect(tmp_path / "empty.sqlite3").close()
    assert projection_checkpoint_reader(tmp_path / "empty.sqlite3")() == 0


def test_checkpoint_reader_reads_named(tmp_path):
    make_db(tmp_path / "p.sqlite3", {"search": 12, "stats": 30})
    assert projection_checkpoint_reader(tmp_path / "p.sqlite3")() == 12
    assert projection_checkpoint_reader(tmp_path / "p.sqlite3", "stats")() == 30


def test_projection_lag_per_projection(tmp_path):
    make_db(tmp_path / "projections.sqlite3", {"search": 40, "stats": 50, "custom": 10})
    registry = collector_registry(tmp_path, FixedLog(50))
    assert value(registry, "tiermem_worker_log_last_seq") == 50
    assert value(registry, "tiermem_worker_projection_lag", projection="search") == 10
    assert value(registry, "tiermem_worker_projection_lag", projection="stats") == 0
    assert value(registry, "tiermem_worker_projection_lag", projection="custom") == 40
    # A built-in that has no checkpoint yet is at 0.
    assert (
        value(
            registry, "tiermem_worker_projection_checkpoint_seq", projection="history"
        )
        == 0
    )


def test_tier_records_grouped_by_shard(tmp_path):
    namespaces = [f"ns{i}" for i in range(8)]
    make_db(
        tmp_path / "projections.sqlite3",
        {},
        [(name, "stm", 2) for name in namespaces] + [("ns0", "ltm", 5)],
    )
    registry = collector_registry(tmp_path, FixedLog(0), shards=2)
    for shard in range(2):
        expected = 2 * sum(1 for name in namespaces if shard_of(name, 2) == shard)
        assert (
            value(registry, "tiermem_worker_tier_records", shard=str(shard), tier="stm")
            == expected
        )
    ltm_shard = str(shard_of("ns0", 2))
    assert (
        value(registry, "tiermem_worker_tier_records", shard=ltm_shard, tier="ltm") == 5
    )
    assert (
        value(registry, "tiermem_worker_tier_records", shard=ltm_shard, tier="im") == 0
    )


def test_log_down_leaves_lag_out(tmp_path):
    make_db(tmp_path / "projections.sqlite3", {"search": 3})
    registry = collector_registry(tmp_path, DownLog())
    assert value(registry, "tiermem_worker_log_last_seq") is None
    assert value(registry, "tiermem_worker_projection_lag", projection="search") is None
    assert (
        value(registry, "tiermem_worker_projection_checkpoint_seq", projection="search")
        == 3
    )


def test_unreadable_db_leaves_projections_out(tmp_path):
    (tmp_path / "projections.sqlite3").write_bytes(b"this is not a database" * 100)
    registry = collector_registry(tmp_path, FixedLog(7))
    assert value(registry, "tiermem_worker_log_last_seq") == 7
    assert value(registry, "tiermem_worker_projection_lag", projection="search") is None


def test_worker_metrics_registry_none_registers_nothing():
    registry = CollectorRegistry(auto_describe=True)
    WorkerMetrics(None)
    assert list(registry.collect()) == []
