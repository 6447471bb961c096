"""`RedisEventLog.trim_ids` and the id index trim task, against a real redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from events.log import RedisEventLog
from events.types import Store
from replay.celery_app import TRIM_IDS_TASK, create_app
from replay.tasks.id_index import cutoff_seq, trim_expired_ids
from tiermem.config import StackConfig, write_stack_config
from tiermem.servers import free_port, wait_until
from tiermem.stack import Stack

pytestmark = pytest.mark.integration

@pytest.fixture
def log_server(redis_factory):
    return redis_factory("log")


@pytest.fixture
def event_log(log_server):
    client = redis.Redis.from_url(log_server.url)
    yield RedisEventLog(client)
    client.close()


def stamped(seq: int, ts: int) -> Store:
    return Store(id=f"id-{seq}", key=f"k{seq}", value=seq, seq=seq, ts=ts)


def append_range(
    event_log: RedisEventLog, first: int, last: int, ts_of=lambda seq: 1000 * seq
) -> None:
    """Append seqs `first..last` as one batch, with ingest time `ts_of(seq)` and body hash `seq`."""
    seqs = range(first, last + 1)
    event_log.append([stamped(seq, ts_of(seq)) for seq in seqs], list(seqs))


def listpack_max_entries(event_log: RedisEventLog) -> int:
    """Return the server's hash-max-listpack-entries.

    A hash with more entries is a hash table, which HSCAN walks page by page.
    """
    setting = "hash-max-listpack-entries"
    return int(event_log.client.config_get(setting)[setting])


def logged_seqs(event_log: RedisEventLog, last: int) -> list[int | None]:
    """Return, for ids `id-1..id-last`, the seq the index stores, or None."""
    found = event_log.lookup([f"id-{seq}" for seq in range(1, last + 1)])
    return [item.seq if item is not None else None for item in found]


# ------------------------------------------------------------------ trim_ids


def test_trim_removes_only_older_seqs(event_log):
    append_range(event_log, 1, 4)
    append_range(event_log, 5, 10)

    removed = event_log.trim_ids(6)

    assert removed == 5
    assert logged_seqs(event_log, 10) == [None] * 5 + [6, 7, 8, 9, 10]
    assert event_log.client.hlen(event_log.ids_key) == 5
    sixth = event_log.lookup(["id-6"])[0]
    assert sixth is not None
    assert sixth.body_hash == 6


def test_trim_leaves_log_intact(event_log):
    append_range(event_log, 1, 10)

    event_log.trim_ids(8)

    assert event_log.last_seq() == 10
    assert [event.seq for event in event_log.read(0, 100)] == list(range(1, 11))


def test_trim_small_batch_pages_hash(log_server):
    client = HookedRedis.from_url(log_server.url)
    event_log = RedisEventLog(client)
    total = listpack_max_entries(event_log) + 300
    append_range(event_log, 1, total)
    assert client.object("encoding", event_log.ids_key) == b"hashtable"

    try:
        removed = event_log.trim_ids(301, batch=7)
        seqs = logged_seqs(event_log, total)
    finally:
        client.close()

    assert removed == 300
    assert seqs[:300] == [None] * 300
    assert seqs[300:] == list(range(301, total + 1))
    # COUNT is a hint, so a page can be a little larger than the batch.
    assert len(client.page_sizes) > total // 20
    assert max(client.page_sizes) < total // 10


@pytest.mark.parametrize("batch", [1, 3])
def test_trim_batch_below_listpack_hash(event_log, batch):
    append_range(event_log, 1, 20)
    assert event_log.client.object("encoding", event_log.ids_key) == b"listpack"

    assert event_log.trim_ids(11, batch=batch) == 10
    assert logged_seqs(event_log, 20) == [None] * 10 + list(range(11, 21))


def test_trim_again_removes_nothing(event_log):
    append_range(event_log, 1, 10)
    assert event_log.trim_ids(4) == 3
    after_first = event_log.client.hgetall(event_log.ids_key)

    assert event_log.trim_ids(4) == 0
    assert event_log.client.hgetall(event_log.ids_key) == after_first


def test_trim_to_last_seq_plus_one_removes_all(event_log):
    append_range(event_log, 1, 5)
    assert event_log.trim_ids(6) == 5
    assert event_log.client.hlen(event_log.ids_key) == 0


@pytest.mark.parametrize("before_seq", [0, 1])
def test_trim_before_first_seq_removes_nothing(event_log, before_seq):
    append_range(event_log, 1, 5)
    assert event_log.trim_ids(before_seq) == 0
    assert logged_seqs(event_log, 5) == [1, 2, 3, 4, 5]


def test_trim_rejects_seq_beyond_log(event_log):
    append_range(event_log, 1, 5)
    with pytest.raises(ValueError, match="the log's last seq is 5"):
        event_log.trim_ids(7)
    assert event_log.client.hlen(event_log.ids_key) == 5


def test_trim_rejects_batch_below_one(event_log):
    append_range(event_log, 1, 5)
    with pytest.raises(ValueError, match="batch must be at least 1"):
        event_log.trim_ids(3, batch=0)


def test_trim_keeps_unparsable_value(event_log):
    append_range(event_log, 1, 5)
    event_log.client.hset(event_log.ids_key, "odd", "not-a-seq")

    assert event_log.trim_ids(6) == 5
    assert event_log.client.hget(event_log.ids_key, "odd") == b"not-a-seq"


class HookedRedis(redis.Redis):
    """A real Redis client that records each HSCAN page's size and can act after the first.

    `after_first_scan` runs once, right after the first page. It plays the
    router (or a second trim) acting between a trim's scan of a page and
    the deletion of that page's old entries.
    """

    after_first_scan = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.page_sizes: list[int] = []

    def hscan(self, *args, **kwargs):
        cursor, page = super().hscan(*args, **kwargs)
        self.page_sizes.append(len(page))
        hook, self.after_first_scan = self.after_first_scan, None
        if hook is not None:
            hook()
        return cursor, page


def test_trim_keeps_entries_written_during_trim(log_server):
    client = HookedRedis.from_url(log_server.url)
    event_log = RedisEventLog(client)
    append_range(event_log, 1, 10)
    other = RedisEventLog(redis.Redis.from_url(log_server.url))

    def act_during_trim() -> None:
        # A second trim removed id-2, a retry logged it again as seq 11, and
        # a new event arrived as seq 12, all after the first page was read.
        other.client.hdel(other.ids_key, "id-2")
        other.append([Store(id="id-2", key="k2", value=2, seq=11, ts=11_000)], [2])
        append_range(other, 12, 12)

    client.after_first_scan = act_during_trim
    try:
        removed = event_log.trim_ids(6)
        found = event_log.lookup(["id-1", "id-2", "id-5", "id-6", "id-12"])
    finally:
        client.close()
        other.client.close()

    assert client.after_first_scan is None  # the hook ran
    assert removed == 4
    assert [item.seq if item else None for item in found] == [None, 11, None, 6, 12]


# ---------------------------------------------------------------- the task


@pytest.fixture
def config(log_server, tmp_path):
    return StackConfig(data_dir=str(tmp_path / "data"), log_url=log_server.url)


def with_retention(config: StackConfig, retention_s: float) -> StackConfig:
    config.ids_retention_s = retention_s
    return config


def test_cutoff_seq_is_first_at_or_after(event_log):
    # The router stamps one ingest time on a whole batch, so seqs 4..6 share one.
    append_range(event_log, 1, 3)
    append_range(event_log, 4, 6, ts_of=lambda seq: 5000)
    append_range(event_log, 7, 9)

    assert cutoff_seq(event_log, 3000) == 3
    assert cutoff_seq(event_log, 3001) == 4
    assert cutoff_seq(event_log, 5000) == 4
    assert cutoff_seq(event_log, 5001) == 7
    assert cutoff_seq(event_log, 0) == 1
    assert cutoff_seq(event_log, 9001) == 10


def test_cutoff_seq_of_empty_log(event_log):
    assert cutoff_seq(event_log, 5000) == 1


def test_task_trims_ids_older_than_retention(config, event_log):
    append_range(event_log, 1, 10)  # seq N was ingested at N seconds

    # At 20 s with 12 s of retention the cutoff is 8 s, so seq 8 is kept.
    with capture_logs() as logs:
        report = trim_expired_ids(with_retention(config, 12.0), now_ms=20_000)

    assert report.enabled is True
    assert report.cutoff_ms == 8000
    assert report.cutoff_seq == 8
    assert report.removed == 7
    assert logged_seqs(event_log, 10) == [None] * 7 + [8, 9, 10]
    trimmed = [entry for entry in logs if entry["event"] == "ids.trimmed"]
    assert len(trimmed) == 1
    assert trimmed[0]["cutoff_seq"] == 8
    assert trimmed[0]["removed"] == 7


def test_task_twice_leaves_same_state(config, event_log):
    append_range(event_log, 1, 10)
    with_retention(config, 12.0)

    first = trim_expired_ids(config, now_ms=20_000)
    after_first = event_log.client.hgetall(event_log.ids_key)
    second = trim_expired_ids(config, now_ms=20_000)

    assert first.removed == 7
    assert second.removed == 0
    assert second.cutoff_seq == first.cutoff_seq
    assert event_log.client.hgetall(event_log.ids_key) == after_first


def test_task_keeps_everything_within_retention(config, event_log):
    append_range(event_log, 1, 10)

    report = trim_expired_ids(with_retention(config, 60.0), now_ms=20_000)

    assert report.cutoff_seq == 1
    assert report.removed == 0
    assert logged_seqs(event_log, 10) == list(range(1, 11))


def test_task_retention_zero_keeps_all(config, event_log):
    append_range(event_log, 1, 10)

    with capture_logs() as logs:
        report = trim_expired_ids(with_retention(config, 0.0), now_ms=10**13)

    assert report.enabled is False
    assert report.removed == 0
    assert report.cutoff_seq is None
    assert logged_seqs(event_log, 10) == list(range(1, 11))
    assert [entry["event"] for entry in logs] == ["ids.trim.disabled"]


def test_task_on_empty_log(config, event_log):
    report = trim_expired_ids(with_retention(config, 1.0), now_ms=20_000)
    assert report.cutoff_seq == 1
    assert report.removed == 0


# The module-level Celery app reads TIERMEM_CONFIG once per process, and
# other tests in the same pytest process set it for their own stack, so the
# task runs in a child process.
RUN_TASK = """
import json
from replay.tasks.id_index import trim_ids
print(json.dumps(trim_ids.apply().get()))
"""


def test_celery_task_trims_with_stack_config(config, event_log, tmp_path):
    day_ms = 86_400_000
    now_ms = int(time.time() * 1000)
    append_range(event_log, 1, 5, ts_of=lambda seq: now_ms - 10 * day_ms)
    append_range(event_log, 6, 8, ts_of=lambda seq: now_ms - day_ms)
    # apply() runs the task in the child and contacts no broker.
    config.broker_url = "redis://127.0.0.1:1/0"
    path = tmp_path / "stack.json"
    write_stack_config(config, path)

    completed = subprocess.run(
        [sys.executable, "-c", RUN_TASK],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TIERMEM_CONFIG=str(path)),
    )

    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["enabled"] is True
    assert report["retention_s"] == 604800.0
    assert report["cutoff_seq"] == 6
    assert report["removed"] == 5
    assert logged_seqs(event_log, 8) == [None] * 5 + [6, 7, 8]


def scrape(url: str) -> dict[tuple[str, frozenset], float] | None:
    """Return the worker's tiermem samples, or None while its endpoint does not respond."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("tiermem_")
    }


@pytest.mark.slow
def test_worker_runs_trim_task(redis_factory, config, event_log):
    day_ms = 86_400_000
    now_ms = int(time.time() * 1000)
    append_range(event_log, 1, 3, ts_of=lambda seq: now_ms - 8 * day_ms)
    append_range(event_log, 4, 4, ts_of=lambda seq: now_ms)
    config.broker_url = redis_factory("broker").url
    config.celery_concurrency = 1
    stack = Stack(config, celery=True)
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    write_stack_config(config, stack.config_path)
    stack.worker_metrics_port = free_port()
    app = create_app(config)
    started = ("tiermem_worker_tasks_started_total", frozenset({("task", TRIM_IDS_TASK)}))
    succeeded = (
        "tiermem_worker_tasks_total",
        frozenset({("task", TRIM_IDS_TASK), ("state", "success")}),
    )
    try:
        stack.start_worker()
        url = stack.worker_metrics_url
        before = wait_until(lambda: scrape(url), timeout=60, what=f"the worker's metrics at {url}")
        result = app.send_task(TRIM_IDS_TASK).get(timeout=60)
        after = wait_until(
            lambda: (samples := scrape(url)) and samples.get(succeeded) == 1 and samples,
            timeout=30,
            what=f"{TRIM_IDS_TASK} counted as a success",
        )
    finally:
        app.close()
        stack.stop()

    assert before[started] == 0
    assert before[succeeded] == 0
    assert after[started] == 1
    assert result["cutoff_seq"] == 4
    assert result["removed"] == 3
    assert logged_seqs(event_log, 4) == [None, None, None, 4]
