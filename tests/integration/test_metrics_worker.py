"""The worker's Prometheus endpoint on a real prefork Celery worker in multiprocess mode.

One worker (two pool processes) serves the whole module. It is started
here, not by `Stack`, with `--include replay.metrics` and the two metrics
variables in its environment, and stopped by PID. Tasks run in the pool
processes, so counting them in a scrape of the main process shows that
the multiprocess files are written and added up. An in-process router
with local shards writes the events the projection task consumes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from bus.client import Client
from bus.dispatch import LocalDispatcher, Waker
from bus.router import Router
from events.log import RedisEventLog
from events.types import Get, Store
from handlers.actor import ShardSettings, build_shard
from replay.celery_app import PROJECTIONS_TASK, QUEUES, SNAPSHOT_TASK, create_app
from replay.engine import ReplayError
from replay.metrics import MULTIPROCESS_ENV, PORT_ENV, REPLAY_OPERATIONS
from tiermem.config import StackConfig, write_stack_config
from tiermem.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RESULT_TIMEOUT_S = 60

VERIFY_TASK = "tiermem.replay.verify_shard"
VIEW_TASK = "tiermem.replay.build_view_shard"


def wait_for(condition, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


class Worker:
    def __init__(
        self, process: subprocess.Popen[bytes], log_path: Path, metrics_dir: Path, app
    ) -> None:
        self.process = process
        self.log_path = log_path
        self.metrics_dir = metrics_dir
        self.app = app
        self.url: str = wait_for(
            self._started_url,
            timeout=120,
            what="the worker to log celery.metrics.started",
        )

    def _started_url(self) -> str | None:
        if self.process.poll() is not None:
            raise AssertionError(
                f"the worker exited with {self.process.returncode}; see {self.log_path}"
            )
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"celery.metrics.started"' in line:
                return json.loads(line)["url"]
        return None

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.startswith("tiermem_")
        }

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            # The pool processes die with their parent (Celery sets their
            # parent-death signal to SIGKILL).
            self.process.kill()
            self.process.wait()


class Setup:
    def __init__(
        self, worker: Worker, endpoints: dict[str, str], event_log: RedisEventLog
    ) -> None:
        self.worker = worker
        self.endpoints = endpoints
        self.event_log = event_log


def metric(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_when(worker: Worker, name: str, expected: float, **labels: str) -> dict:
    """Scrape until `name{labels}` equals `expected`, and return that scrape.

    A task's result is stored before `task_postrun` runs, so a scrape right
    after `result.get()` may not count the task yet. A scrape is also not a
    consistent snapshot across metrics: the collector reads each metric
    file of each process in turn while the pool process goes on writing, so
    wait for every value a test needs, not for one value that was written
    near it.
    """

    def reached() -> dict | None:
        samples = worker.scrape()
        return samples if metric(samples, name, **labels) == expected else None

    return wait_for(reached, timeout=30, what=f"{name}{labels} to reach {expected}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("worker-metrics")
    servers = {
        role: RedisServer(root / role, role=role).start()
        for role in ("log", "stm", "im", "broker")
    }
    data_dir = root / "data"
    data_dir.mkdir()
    config = StackConfig(
        data_dir=str(data_dir),
        shards=2,
        log_url=servers["log"].url,
        stm_url=servers["stm"].url,
        im_url=servers["im"].url,
        broker_url=servers["broker"].url,
        broker_visibility_timeout_s=30,
    )
    config.router = msgspec.structs.replace(
        config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0}
    )
    write_stack_config(config, data_dir / "stack.json")

    waker = Waker()
    shards = []
    for index in range(config.shards):
        settings = ShardSettings(
            shard=index,
            shards=config.shards,
            log_url=config.log_url,
            stm_url=config.stm_url,
            im_url=config.im_url,
            ltm_dir=config.ltm_dir,
        )
        shards.append(build_shard(settings))
    for shard in shards:
        shard.recover()
    dispatcher = LocalDispatcher(shards, waker)
    event_log = RedisEventLog(redis.Redis.from_url(config.log_url))
    router = Router(config.router, event_log, dispatcher, waker)
    endpoints = router.bind()
    thread = threading.Thread(target=router.serve_forever, name="router", daemon=True)
    thread.start()

    metrics_dir = root / "worker-metrics"
    metrics_dir.mkdir()
    # Left by an earlier run: the worker must delete it at start.
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")
    log_path = root / "celery-worker.log"
    env = dict(
        os.environ,
        TIERMEM_CONFIG=str(data_dir / "stack.json"),
        TIERMEM_LOG_JSON="1",
        **{PORT_ENV: "0", MULTIPROCESS_ENV: str(metrics_dir)},
    )
    command = [
        sys.executable, "-m", "celery", "-A", "replay.celery_app", "worker",
        "--include", "replay.metrics",
        "--queues", ",".join(QUEUES),
        "--concurrency", "2",
        "--hostname", f"metrics-{uuid.uuid4().hex[:8]}@{socket.gethostname()}",
        "--loglevel", "INFO",
        "--without-mingle",
        "--without-gossip",
    ]  # fmt: skip
    app = create_app(config)
    worker = None
    try:
        with open(log_path, "ab") as output:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
            )
        worker = Worker(process, log_path, metrics_dir, app)
        yield Setup(worker, endpoints, event_log)
    finally:
        if worker is not None:
            worker.stop()
        elif "process" in locals():
            process.kill()
            process.wait()
        app.close()
        router.stop()
        thread.join(timeout=30)
        router.close()
        dispatcher.close()
        waker.close()
        for server in reversed(servers.values()):
            server.stop()


def test_endpoint_on_loopback(setup):
    assert setup.worker.url.startswith("http://127.0.0.1:")


def test_stale_files_cleared_at_start(setup):
    assert not (setup.worker.metrics_dir / "counter_999999.db").exists()


def test_projection_run_counted_and_lag_closes(setup):
    namespaces = [f"w{i}" for i in range(5)]
    with Client(setup.endpoints, timeout=10) as client:
        client.pipeline([Store(namespace=ns, key="k", value=ns) for ns in namespaces])
        # The replies come after the shards applied the events, so the
        # events are readable for the projections.
        client.pipeline([Get(namespace=ns, key="k") for ns in namespaces])
    last_seq = setup.event_log.last_seq()
    before = setup.worker.scrape()
    assert metric(before, "tiermem_worker_log_last_seq") == last_seq
    lag_before = metric(before, "tiermem_worker_projection_lag", projection="search")
    assert lag_before is not None and lag_before > 0

    report = setup.worker.app.send_task(
        PROJECTIONS_TASK, kwargs={"max_seconds": 30}
    ).get(timeout=RESULT_TIMEOUT_S)
    assert report["complete"] is True
    scrape_when(
        setup.worker,
        "tiermem_worker_tasks_total",
        1,
        task=PROJECTIONS_TASK,
        state="success",
    )
    after = scrape_when(
        setup.worker,
        "tiermem_worker_task_duration_seconds_count",
        1,
        task=PROJECTIONS_TASK,
    )
    assert (
        metric(after, "tiermem_worker_tasks_total", task=PROJECTIONS_TASK, state="success")
        == 1
    )
    assert metric(after, "tiermem_worker_projection_lag", projection="search") == 0
    assert (
        metric(after, "tiermem_worker_projection_checkpoint_seq", projection="stats")
        == last_seq
    )
    assert (
        metric(after, "tiermem_worker_tasks_started_total", task=PROJECTIONS_TASK) == 1
    )
    records = sum(
        value
        for (name, _), value in after.items()
        if name == "tiermem_worker_tier_records"
    )
    assert records == len(namespaces)


def test_failed_task_counted(setup):
    result = setup.worker.app.send_task(SNAPSHOT_TASK, kwargs={"shard": 99})
    with pytest.raises(ReplayError, match="shard 99 does not exist"):
        result.get(timeout=RESULT_TIMEOUT_S)
    samples = scrape_when(
        setup.worker,
        "tiermem_worker_tasks_total",
        1,
        task=SNAPSHOT_TASK,
        state="failure",
    )
    assert (
        metric(
            samples, "tiermem_worker_tasks_total", task=SNAPSHOT_TASK, state="success"
        )
        == 0
    )


def test_tasks_counted_from_pool_processes(setup):
    """The counts come from files of pool processes, not of the main process."""
    setup.worker.app.send_task(PROJECTIONS_TASK, kwargs={"max_seconds": 5}).get(
        timeout=RESULT_TIMEOUT_S
    )
    pids = {
        int(path.stem.rsplit("_", 1)[1])
        for path in setup.worker.metrics_dir.glob("counter_*.db")
    }
    assert setup.worker.process.pid in pids
    assert pids - {setup.worker.process.pid}


# The replay tests below run in file order on the one worker: the first
# checks the gauges before any replay task ran.


def replay_gauges(samples: dict, operation: str, shard: int) -> dict[str, float | None]:
    labels = {"operation": operation, "shard": str(shard)}
    return {
        name: metric(samples, f"tiermem_worker_replay_{name}", **labels)
        for name in ("events_read", "until_seq", "running")
    }


def store_more(setup: Setup, prefix: str, count: int) -> int:
    """Store `count` memories over both shards' namespaces; return the log's last seq."""
    events = [Store(namespace=f"{prefix}{i % 6}", key=f"k{i}", value=i) for i in range(count)]
    with Client(setup.endpoints, timeout=10) as client:
        client.pipeline(events)
        # The router replies to these Gets after the shards applied every Store.
        client.pipeline([Get(namespace=f"{prefix}{i}", key="k0") for i in range(6)])
    return setup.event_log.last_seq()


def run_replay_task(setup: Setup, task: str, **kwargs) -> tuple[dict, dict]:
    """Run one replay task; return its result and a scrape that counts it."""
    result = setup.worker.app.send_task(task, kwargs=kwargs, queue="replay").get(
        timeout=RESULT_TIMEOUT_S
    )
    samples = scrape_when(setup.worker, "tiermem_worker_tasks_total", 1, task=task, state="success")
    return result, samples


def test_replay_gauges_exported_from_zero(setup):
    samples = setup.worker.scrape()
    for operation in REPLAY_OPERATIONS:
        for shard in range(2):
            gauges = replay_gauges(samples, operation, shard)
            assert gauges == {"events_read": 0, "until_seq": 0, "running": 0}, (operation, shard)


def test_verify_task_reports_progress(setup):
    store_more(setup, "verify", 40)
    with Client(setup.endpoints, timeout=10) as client:
        digest = client.digest()
    expected = msgspec.to_builtins(digest.tiers)

    result, samples = run_replay_task(setup, VERIFY_TASK, shard=0, seq=digest.seq, expected=expected)

    assert result["verified"] is True
    assert result["base_seq"] == 0
    gauges = replay_gauges(samples, "verify", 0)
    # Without a snapshot the run reads every event up to seq, other shards' too.
    assert gauges["events_read"] == digest.seq
    assert gauges["until_seq"] == digest.seq
    assert gauges["running"] == 0
    assert replay_gauges(samples, "verify", 1)["until_seq"] == 0


def test_snapshot_task_reports_progress(setup):
    last_seq = store_more(setup, "snap", 30)

    result, samples = run_replay_task(setup, SNAPSHOT_TASK, shard=1)

    assert result["watermark"] == last_seq
    assert result["written"] is True
    gauges = replay_gauges(samples, "snapshot", 1)
    assert gauges["events_read"] == last_seq
    assert gauges["until_seq"] == last_seq
    assert gauges["running"] == 0


def test_view_task_counts_events_after_snapshot(setup):
    """A view of shard 1 starts from its snapshot, so only the events after it are read."""
    snapshot_seq = setup.event_log.last_seq()
    last_seq = store_more(setup, "view", 25)

    result, samples = run_replay_task(setup, VIEW_TASK, shard=1, view="metrics", seq=last_seq)

    assert result["base_seq"] == snapshot_seq
    gauges = replay_gauges(samples, "view", 1)
    assert gauges["events_read"] == last_seq - snapshot_seq
    assert gauges["until_seq"] == last_seq
    assert gauges["running"] == 0
