"""Prometheus metrics of a Celery worker: tasks, projection lag, tier sizes, replay progress.

Importing this module connects its Celery signal handlers. They do nothing
unless `TIERMEM_WORKER_METRICS_PORT` is set in the worker's environment
(0 takes a free port), in which case the worker's main process serves the
metrics at `http://TIERMEM_WORKER_METRICS_HOST:PORT/metrics` (host
127.0.0.1 by default) and logs the URL as `celery.metrics.started`.

Celery's default prefork pool runs tasks in child processes, and a child's
counters live in its own memory. prometheus-client's multiprocess mode
shares them: with `PROMETHEUS_MULTIPROC_DIR` set to a directory of this
worker's own, in the environment the worker starts with, every process
writes its values to files there and the main process adds them up at each
scrape. The variable must be set before prometheus-client is imported, so
it cannot be set from here. The main process empties the directory when the
worker starts (prometheus-client requires that between runs). Without the
variable, a prefork worker serves no task or replay metrics, and logs
`celery.metrics.multiprocess_missing`.

The log's last seq, projection checkpoints and tier sizes are read from the
log's Redis and the projection database when a scrape arrives, in the
main process. docs/metrics.md lists every metric.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import structlog
from celery import signals
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from bus.metrics import MetricsEndpoint
from events.log import EventLog, RedisEventLog
from handlers.sharding import shard_of
from replay.projections.db import connect_readonly, read_transaction
from replay.projections.errors import DatabaseNotFoundError
from replay.projections.registry import BUILTIN_NAMES
from replay.projections.stats import RECORD_TIERS

__all__ = [
    "HOST_ENV",
    "MULTIPROCESS_ENV",
    "PORT_ENV",
    "REPLAY_OPERATIONS",
    "StackCollector",
    "WorkerMetrics",
    "clear_multiprocess_dir",
    "projection_checkpoint_reader",
    "replay_progress",
    "worker_metrics",
]

log = structlog.get_logger("tiermem.celery.metrics")

PORT_ENV = "TIERMEM_WORKER_METRICS_PORT"
HOST_ENV = "TIERMEM_WORKER_METRICS_HOST"
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

# A rebuild (`tiermem replay --apply`) runs in the shard actors or in the
# command's own process, never in a worker, so it has no operation here.
REPLAY_OPERATIONS = ("verify", "snapshot", "view")
"""The `operation` label values that the replay tasks use."""

# Seconds. A projection run takes milliseconds when idle and up to five
# projection intervals when catching up. Snapshots and verifies of large
# shards may take minutes (an estimate).
_DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

_FINISHED_STATES = ("success", "failure", "retry")


class WorkerMetrics:
    """The task and replay metrics of one worker process.

    `registry` is where they are registered: the served registry in a
    single process, or None in multiprocess mode, where the main process
    serves them from the files through `MultiProcessCollector` (registering
    them as well would export each twice).
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.tasks = Counter(
            "tiermem_worker_tasks",
            "Tasks finished, by task name and final state (success, failure, retry, ignored, rejected, revoked).",
            ["task", "state"],
            registry=registry,
        )
        self.started = Counter(
            "tiermem_worker_tasks_started",
            "Tasks that began to run, by task name.",
            ["task"],
            registry=registry,
        )
        self.duration = Histogram(
            "tiermem_worker_task_duration_seconds",
            "Seconds from a task's start to its end, by task name.",
            ["task"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.rejected = Counter(
            "tiermem_worker_messages_rejected",
            "Task messages rejected before running: unknown_task (no such task) or invalid (bad message).",
            ["reason"],
            registry=registry,
        )
        # `mostrecent`: across processes, the value written last wins.
        self.replay_events_read = Gauge(
            "tiermem_worker_replay_events_read",
            "Log events read so far by the current or last replay run of each operation and shard.",
            ["operation", "shard"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.replay_until_seq = Gauge(
            "tiermem_worker_replay_until_seq",
            "The seq that the current or last replay run of each operation and shard rebuilds up to.",
            ["operation", "shard"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.replay_running = Gauge(
            "tiermem_worker_replay_running",
            "1 while a replay run of the operation and shard is in progress, else 0.",
            ["operation", "shard"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        for reason in ("unknown_task", "invalid"):
            self.rejected.labels(reason=reason)
        self._started_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def precreate(self, task_names: list[str]) -> None:
        """Create the series of each task, so each is exported from 0."""
        for name in task_names:
            self.started.labels(task=name)
            self.duration.labels(task=name)
            for state in _FINISHED_STATES:
                self.tasks.labels(task=name, state=state)

    def precreate_replay(self, shards: int) -> None:
        """Create the replay series of each operation and shard, so each is exported from 0.

        Each is set rather than only created: in multiprocess mode a
        `mostrecent` value that was never set has no timestamp, and
        prometheus-client (0.26) leaves such a value out of a scrape.
        """
        for operation in REPLAY_OPERATIONS:
            for shard in range(shards):
                labels = {"operation": operation, "shard": str(shard)}
                for gauge in (self.replay_events_read, self.replay_until_seq, self.replay_running):
                    gauge.labels(**labels).set(0)

    def task_started(self, task_id: str, name: str) -> None:
        with self._lock:
            self._started_at[task_id] = time.perf_counter()
        # Create the duration series (and, in multiprocess mode, this
        # process's histogram file) when the task starts. A scrape still
        # reads the files one by one while this process writes, so it may
        # count a task as finished before it sees the task's duration.
        self.duration.labels(task=name)
        self.started.labels(task=name).inc()

    def task_finished(self, task_id: str, name: str, state: str) -> None:
        with self._lock:
            started = self._started_at.pop(task_id, None)
        if started is not None:
            self.duration.labels(task=name).observe(time.perf_counter() - started)
        self.tasks.labels(task=name, state=state.lower()).inc()

    def task_failed(self, task_id: str, name: str) -> None:
        """Count a failure reported outside a run in this process (a lost pool process, a time limit).

        A task that raises while it runs is counted by `task_finished`.
        """
        with self._lock:
            running_here = task_id in self._started_at
        if not running_here:
            self.tasks.labels(task=name, state="failure").inc()

    def task_revoked(self, name: str) -> None:
        self.tasks.labels(task=name, state="revoked").inc()

    def message_rejected(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()


class _ProcessState:
    """This process's registry, and its metrics and endpoint, created when first needed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics: WorkerMetrics | None = None
        self.endpoint: MetricsEndpoint | None = None
        self.invalid_port_logged = False


_state = _ProcessState()


def _configured_port() -> int | None:
    """Return the port from `TIERMEM_WORKER_METRICS_PORT`, None when it is unset or invalid."""
    text = os.environ.get(PORT_ENV, "").strip()
    if not text:
        return None
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        if not _state.invalid_port_logged:
            _state.invalid_port_logged = True
            log.error(
                "celery.metrics.invalid_port",
                variable=PORT_ENV,
                value=text,
                next="serving no metrics: set a port from 1 to 65535, or 0 for a free one",
            )
        return None
    return port


def _multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROCESS_ENV))


def worker_metrics() -> WorkerMetrics | None:
    """Return this process's `WorkerMetrics`, or None when worker metrics are off."""
    if _configured_port() is None:
        return None
    with _state.lock:
        if _state.metrics is None:
            _state.metrics = WorkerMetrics(None if _multiprocess() else _state.registry)
        return _state.metrics


def clear_multiprocess_dir(directory: Path) -> int:
    """Create `directory` if needed and delete the value files a previous run left; return how many."""
    directory.mkdir(parents=True, exist_ok=True)
    removed = 0
    for path in directory.glob("*.db"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


# ---------------------------------------------------------------- replay


@contextmanager
def replay_progress(
    operation: str, shard: int, until_seq: int
) -> Iterator[Callable[[int], None]]:
    """Track one replay run in the replay gauges; yield its `progress` callback.

    Pass the callback as the `progress` argument of `replay_shard`,
    `engine.verify_shard` or `engine.build_view_shard`, which call it with
    the number of log events read per batch. When worker metrics are off,
    the callback does nothing.
    """
    metrics = worker_metrics()
    if metrics is None:
        yield _ignore_progress
        return
    labels = {"operation": operation, "shard": str(shard)}
    events_read = metrics.replay_events_read.labels(**labels)
    read = 0
    events_read.set(0)
    metrics.replay_until_seq.labels(**labels).set(until_seq)
    metrics.replay_running.labels(**labels).set(1)

    def progress(events: int) -> None:
        nonlocal read
        read += events
        # A `mostrecent` gauge only takes `set`: the running total is kept here.
        events_read.set(read)

    try:
        yield progress
    finally:
        metrics.replay_running.labels(**labels).set(0)


def _ignore_progress(events: int) -> None:
    return None


# ---------------------------------------------------------------- read at scrape


def projection_checkpoint_reader(
    db_path: str | os.PathLike[str], name: str = "search"
) -> Callable[[], int]:
    """Return a function that reads projection `name`'s checkpoint from `db_path`.

    It opens the database read-only at each call, so any thread may call it,
    and returns 0 while the database or the checkpoint does not exist yet
    (the projection has consumed nothing). For the router's
    `projection_checkpoint`.
    """

    def read() -> int:
        try:
            conn = connect_readonly(db_path)
        except DatabaseNotFoundError:
            return 0
        try:
            return _checkpoints(conn).get(name, 0)
        finally:
            conn.close()

    return read


def _checkpoints(conn: sqlite3.Connection) -> dict[str, int]:
    try:
        rows = conn.execute("SELECT name, seq FROM projection_checkpoints").fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return {}
        raise
    return {str(name): int(seq) for name, seq in rows}


def _tier_records(conn: sqlite3.Connection, shards: int) -> dict[tuple[int, str], int]:
    """Return the records per (shard, tier) that the stats projection counts."""
    totals = {(shard, tier): 0 for shard in range(shards) for tier in RECORD_TIERS}
    try:
        rows = conn.execute(
            "SELECT namespace, tier, records FROM stats_tiers"
        ).fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return totals
        raise
    for namespace, tier, records in rows:
        key = (shard_of(namespace, shards), tier)
        totals[key] = totals.get(key, 0) + int(records)
    return totals


class StackCollector(Collector):
    """The collector of the log's last seq and of the projection database, read at each scrape.

    `config` is the stack's `StackConfig`, and `event_log` defaults to the
    log at `config.log_url`. A source that cannot be read is left out of that
    scrape and logged (the 1st, 2nd, 4th, ... failure in a row), so a scrape
    still succeeds while Redis or the database is down.
    """

    def __init__(self, config: Any, event_log: EventLog | None = None) -> None:
        self.config = config
        if event_log is None:
            # Timeouts, so a Redis that hangs makes a scrape leave the log
            # out instead of blocking the scrape thread.
            client = redis.Redis.from_url(
                config.log_url, socket_timeout=2.0, socket_connect_timeout=2.0
            )
            event_log = RedisEventLog(client, stream=config.log_stream)
        self._log = event_log
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        # Describing by collecting would read Redis and the database at
        # registration; an empty list skips that check.
        return []

    def collect(self) -> Iterator[Metric]:
        last_seq = self._read("log", self._log.last_seq)
        if last_seq is not None:
            yield GaugeMetricFamily(
                "tiermem_worker_log_last_seq",
                "Seq of the last event in the log.",
                value=last_seq,
            )

        tables = self._read("projections", self._read_database)
        if tables is None:
            return
        checkpoints, records = tables

        checkpoint_family = GaugeMetricFamily(
            "tiermem_worker_projection_checkpoint_seq",
            "Last seq each projection's tables cover.",
            labels=["projection"],
        )
        lag_family = GaugeMetricFamily(
            "tiermem_worker_projection_lag",
            "Seqs each projection is behind the log.",
            labels=["projection"],
        )
        for name in sorted(checkpoints):
            checkpoint_family.add_metric([name], checkpoints[name])
            if last_seq is not None:
                lag_family.add_metric([name], max(0, last_seq - checkpoints[name]))
        yield checkpoint_family
        if last_seq is not None:
            yield lag_family

        records_family = GaugeMetricFamily(
            "tiermem_worker_tier_records",
            "Records of each tier of each shard, as the stats projection counts them (no cache).",
            labels=["shard", "tier"],
        )
        for (shard, tier), count in sorted(records.items()):
            records_family.add_metric([str(shard), tier], count)
        yield records_family

    def _read_database(self) -> tuple[dict[str, int], dict[tuple[int, str], int]]:
        names = dict.fromkeys(BUILTIN_NAMES, 0)
        try:
            conn = connect_readonly(self.config.projections_db)
        except DatabaseNotFoundError:
            # No projection has run yet: every built-in is at 0.
            return names, _tier_records_empty(self.config.shards)
        try:
            with read_transaction(conn):
                names.update(_checkpoints(conn))
                records = _tier_records(conn, self.config.shards)
        finally:
            conn.close()
        return names, records

    def _read(self, source: str, reader: Callable[[], Any]) -> Any:
        try:
            value = reader()
        except (redis.RedisError, sqlite3.Error, OSError) as error:
            with self._lock:
                failures = self._failures[source] = self._failures.get(source, 0) + 1
            if failures & (failures - 1) == 0:
                log.warning(
                    "celery.metrics.read_failed",
                    source=source,
                    error=repr(error),
                    failures=failures,
                    next="left out of this scrape",
                )
            return None
        with self._lock:
            self._failures.pop(source, None)
        return value


def _tier_records_empty(shards: int) -> dict[tuple[int, str], int]:
    return {(shard, tier): 0 for shard in range(shards) for tier in RECORD_TIERS}


# ---------------------------------------------------------------- signals


def _task_name(task: Any) -> str:
    return getattr(task, "name", None) or "unknown"


@signals.worker_init.connect
def _prepare_multiprocess_dir(**_: Any) -> None:
    """Empty the multiprocess directory in the main process, before the pool forks."""
    if _configured_port() is None or not _multiprocess():
        return
    directory = Path(os.environ[MULTIPROCESS_ENV])
    removed = clear_multiprocess_dir(directory)
    log.info(
        "celery.metrics.dir_cleared",
        directory=str(directory),
        files=removed,
        pid=os.getpid(),
    )


@signals.worker_ready.connect
def _start_endpoint(sender: Any = None, **_: Any) -> None:
    """Start the endpoint in the main process once the worker consumes."""
    port = _configured_port()
    if port is None or _state.endpoint is not None:
        return
    stack_config = (
        getattr(sender.app.conf, "tiermem_stack", None) if sender is not None else None
    )
    shards = stack_config.shards if stack_config is not None else 0
    registry = _served_registry(sender, shards)
    if stack_config is not None:
        registry.register(StackCollector(stack_config))
    host = os.environ.get(HOST_ENV, "").strip() or "127.0.0.1"
    _state.endpoint = MetricsEndpoint(registry, host, port)
    log.info(
        "celery.metrics.started",
        url=_state.endpoint.url,
        pid=os.getpid(),
        multiprocess=_multiprocess(),
    )


def _served_registry(consumer: Any, shards: int = 0) -> CollectorRegistry:
    """Build the registry the endpoint serves, with the task metrics when they can be seen.

    The replay series of `shards` shards are created in advance.
    """
    task_names = (
        sorted(name for name in consumer.app.tasks if not name.startswith("celery."))
        if consumer
        else []
    )
    if _multiprocess():
        if not getattr(values.ValueClass, "_multiprocess", False):
            log.error(
                "celery.metrics.multiprocess_inactive",
                variable=MULTIPROCESS_ENV,
                next="set the variable before the worker starts: prometheus-client was imported without it",
            )
        registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(registry)
        metrics = worker_metrics()
        if metrics is not None:
            metrics.precreate(task_names)
            metrics.precreate_replay(shards)
        return registry
    if _forks_pool_processes(consumer):
        log.warning(
            "celery.metrics.multiprocess_missing",
            variable=MULTIPROCESS_ENV,
            next=f"serving no task or replay metrics: set {MULTIPROCESS_ENV} to a directory of this worker's own",
        )
        return CollectorRegistry(auto_describe=True)
    metrics = worker_metrics()
    if metrics is not None:
        metrics.precreate(task_names)
        metrics.precreate_replay(shards)
    return _state.registry


def _forks_pool_processes(consumer: Any) -> bool:
    from celery.concurrency.prefork import TaskPool

    return isinstance(getattr(consumer, "pool", None), TaskPool)


@signals.worker_shutdown.connect
def _stop_endpoint(**_: Any) -> None:
    endpoint = _state.endpoint
    if endpoint is None:
        return
    _state.endpoint = None
    endpoint.stop()
    log.info("celery.metrics.stopped", url=endpoint.url, pid=os.getpid())


@signals.task_prerun.connect
def _on_task_prerun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    metrics = worker_metrics()
    if metrics is not None and task_id is not None:
        metrics.task_started(task_id, _task_name(sender))


@signals.task_postrun.connect
def _on_task_postrun(
    sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any
) -> None:
    metrics = worker_metrics()
    if metrics is not None and task_id is not None:
        metrics.task_finished(task_id, _task_name(sender), state or "unknown")


@signals.task_failure.connect
def _on_task_failure(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    metrics = worker_metrics()
    if metrics is not None and task_id is not None:
        metrics.task_failed(task_id, _task_name(sender))


@signals.task_revoked.connect
def _on_task_revoked(sender: Any = None, **_: Any) -> None:
    metrics = worker_metrics()
    if metrics is not None:
        metrics.task_revoked(_task_name(sender))


@signals.task_unknown.connect
def _on_task_unknown(**_: Any) -> None:
    metrics = worker_metrics()
    if metrics is not None:
        metrics.message_rejected("unknown_task")


@signals.task_rejected.connect
def _on_task_rejected(**_: Any) -> None:
    metrics = worker_metrics()
    if metrics is not None:
        metrics.message_rejected("invalid")
