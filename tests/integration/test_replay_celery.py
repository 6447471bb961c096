"""The replay commands through Celery: one task per shard on a real worker, idempotent tasks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from events.types import Forget, Get, Maintain, Store
from handlers.policy import Policy
from replay.engine import view_get
from replay.snapshot import snapshot_root
from tiermem.commands.replay import run
from tiermem.config import StackConfig, write_stack_config
from tiermem.stack import Stack
from tiers.redis_tier import redis_key_prefix
from tiers.snapshot import list_snapshots

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = Policy(cache_capacity=8, stm_capacity=3, im_capacity=4, ltm_capacity=6)
SHARDS = 2


def mixed_events(rounds: int) -> list:
    events = []
    for round_ in range(rounds):
        for n in range(5):
            for k in range(12):
                events.append(Store(namespace=f"ns{n}", key=f"k{k}", value={"r": round_, "k": k}, importance=((k * 7) % 10) / 10))
            events.append(Get(namespace=f"ns{n}", key=f"k{round_}"))
            events.append(Forget(namespace=f"ns{n}", key=f"k{11 - round_}"))
        events.append(Maintain())
    return events


class WorkerStack:
    def __init__(self, data_dir: Path, stack: Stack, config: StackConfig) -> None:
        self.data_dir = data_dir
        self.stack = stack
        self.config = config

    def replay(self, capsys, *argv: str) -> tuple[int, dict, str]:
        """Run a command without --local; return its status, its JSON summary and its standard error."""
        status = run([*argv, "--json", "--timeout", "120", "--data-dir", str(self.data_dir)])
        captured = capsys.readouterr()
        return status, json.loads(captured.out.strip().splitlines()[-1]), captured.err


@pytest.fixture
def worker_stack(start_router, servers, redis_factory, tmp_path) -> Iterator[WorkerStack]:
    """An in-process router, and a Celery worker for its stack.json, started by PID."""
    router = start_router(shards=SHARDS, policy=SMALL)
    with router.client() as client:
        client.pipeline(mixed_events(3))
    broker = redis_factory("broker")
    config = StackConfig(
        data_dir=str(tmp_path),
        shards=SHARDS,
        policy=SMALL,
        log_url=servers.log.url,
        stm_url=servers.stm.url,
        im_url=servers.im.url,
        broker_url=broker.url,
    )
    write_stack_config(config, tmp_path / "stack.json")
    (tmp_path / "endpoints.json").write_text(json.dumps(router.endpoints))
    stack = Stack(config, celery=True)
    stack.start_worker()
    try:
        yield WorkerStack(tmp_path, stack, config)
    finally:
        stack.stop()


def test_verify_through_celery(worker_stack, servers, capsys):
    status, summary, err = worker_stack.replay(capsys, "replay", "--verify")

    assert status == 0
    assert summary["verified"] is True
    assert summary["seq"] == servers.event_log().last_seq()
    assert sorted(item["shard"] for item in summary["shards"]) == [0, 1]
    assert "shard 0: verified" in err
    assert "shard 1: verified" in err


def test_verify_through_celery_fails_on_tampering(worker_stack, servers, capsys):
    client = redis.Redis.from_url(servers.stm.url)
    values_key = f"{redis_key_prefix('stm', 1)}:v"
    field = sorted(client.hkeys(values_key))[0]
    client.hset(values_key, field, b"\x00" + msgspec.msgpack.encode("tampered"))

    status, summary, _ = worker_stack.replay(capsys, "replay", "--verify")

    assert status == 1
    assert summary["verified"] is False
    namespace, key = field.decode().split("\0")
    differences = [item for shard in summary["shards"] for item in shard["differences"]]
    assert [(item["tier"], item["namespace"], item["key"]) for item in differences] == [("stm", namespace, key)]


def test_snapshot_and_view_through_celery(worker_stack, servers, capsys):
    last = servers.event_log().last_seq()

    status, first, _ = worker_stack.replay(capsys, "snapshot")
    files = {path: path.read_bytes() for shard in range(SHARDS) for _, path in list_snapshots(snapshot_root(worker_stack.data_dir), shard)}
    again_status, again, _ = worker_stack.replay(capsys, "snapshot")
    view_status, view, _ = worker_stack.replay(capsys, "replay", "--to-seq", str(last - 10), "--view", "celery-view")

    assert status == 0
    assert again_status == 0
    assert first["seq"] == last
    assert sorted(item["written"] for item in first["shards"]) == [True, True]
    assert sorted(item["written"] for item in again["shards"]) == [False, False]
    assert {path: path.read_bytes() for path in files} == files
    assert len(files) == SHARDS
    assert view_status == 0
    assert view["seq"] == last - 10
    assert view_get(worker_stack.data_dir, "celery-view", "ns0", "k5").value == {"r": 2, "k": 5}


def test_snapshot_task_idempotent(worker_stack, servers):
    from replay.celery_app import create_app

    app = create_app(worker_stack.config)
    last = servers.event_log().last_seq()

    first = app.send_task("tiermem.replay.snapshot_shard", kwargs={"shard": 0, "until_seq": last}, queue="replay").get(timeout=120)
    path = Path(first["path"])
    data = path.read_bytes()
    second = app.send_task("tiermem.replay.snapshot_shard", kwargs={"shard": 0, "until_seq": last}, queue="replay").get(timeout=120)

    assert first["written"] is True
    assert second["written"] is False
    assert second["path"] == first["path"]
    assert path.read_bytes() == data
    assert [watermark for watermark, _ in list_snapshots(snapshot_root(worker_stack.data_dir), 0)] == [last]


def test_verify_task_takes_own_digest(worker_stack, servers):
    from replay.celery_app import create_app

    app = create_app(worker_stack.config)

    result = app.send_task("tiermem.replay.verify_shard", kwargs={"shard": 1}, queue="replay").get(timeout=120)

    assert result["verified"] is True
    assert result["seq"] == servers.event_log().last_seq()
    assert json.loads(json.dumps(result)) == result
