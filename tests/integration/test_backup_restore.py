"""`tiermem backup` and `tiermem restore`: a stack's state survives losing its data directory.

The module takes one backup of a stack whose projections lag behind its
shards, records what the stack contains, and deletes the data directory. The
tests restore that backup into new directories.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import msgspec
import pytest
import redis

from bus.client import Client
from events.log import RedisEventLog
from events.types import Ack, Forget, Get, NotFound, Store, Value
from handlers.effects import RedisEffectLog
from replay.projections import run_projections
from replay.rebuild import compare_digests
from tiermem.config import StackConfig
from tiermem.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARDS = 2
RANDOM_PORTS = {"high": 0, "normal": 0, "low": 0, "pub": 0}


def start_stack(ray_address: str, data_dir: Path) -> Stack:
    config = StackConfig(data_dir=str(data_dir), shards=SHARDS, ray_address=ray_address)
    config.router = msgspec.structs.replace(config.router, ports=dict(RANDOM_PORTS))
    stack = Stack(config, celery=False)
    stack.start()
    return stack


def project(stack: Stack):
    """Run the projections of `stack` up to the log's readable end, in this process."""
    log_client = redis.Redis.from_url(stack.config.log_url or "")
    stm_client = redis.Redis.from_url(stack.config.stm_url or "")
    with log_client, stm_client:
        report = run_projections(
            stack.config.projections_db,
            RedisEventLog(log_client, stream=stack.config.log_stream),
            RedisEffectLog(log_client),
            stm_client,
            SHARDS,
        )
    assert report.complete, report
    return report


def projection_rows(db_path: str) -> dict[str, list[tuple]]:
    """Return every row of every table of a projection database, sorted."""
    with closing(sqlite3.connect(db_path)) as conn:
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {table: sorted(conn.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr) for table in tables}


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiermem.commands.backup", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TIERMEM_LOG_LEVEL="WARNING"),
    )


class Original(msgspec.Struct, kw_only=True):
    """What the backed-up stack held, and the backup's manifest."""

    backup: Path
    manifest: dict
    stores: list[Store]
    forgotten: set[str]
    digest_seq: int
    digest: list
    first_ack: Ack
    projections: dict[str, list[tuple]]


@pytest.fixture(scope="module")
def original(ray_cluster, tmp_path_factory) -> Original:
    root = tmp_path_factory.mktemp("backup")
    data_dir = root / "data"
    stack = start_stack(ray_cluster, data_dir)
    try:
        stores = [
            Store(id=f"s{i}", namespace=f"agent-{i % 5}", key=f"k{i}", value={"text": f"note {i} of agent {i % 5}"})
            for i in range(1200)
        ]
        with Client(stack.endpoints, timeout=30) as client:
            replies = client.pipeline(stores[:600], window=300)
            project(stack)
            # Projected after the backup only: their effects must come from
            # the exported effect streams.
            replies += client.pipeline(stores[600:], window=300)
            client.pipeline([Get(namespace=event.namespace, key=event.key) for event in stores[::7]], window=300)
            forgets = [Forget(id=f"f{i}", namespace=stores[i].namespace, key=stores[i].key) for i in range(0, 1200, 50)]
            client.pipeline(forgets, window=300)
            client.maintain()
            live = client.digest()
        assert all(isinstance(reply, Ack) for reply in replies)

        backup = root / "backup"
        result = run_command("backup", "--data-dir", str(data_dir), str(backup), "--json")
        assert result.returncode == 0, result.stderr
        manifest = json.loads(result.stdout.splitlines()[-1])

        # The live stack's projections catch up to compare with the restored one's.
        project(stack)
        rows = projection_rows(stack.config.projections_db)
    finally:
        stack.stop()
    shutil.rmtree(data_dir)
    return Original(
        backup=backup,
        manifest=manifest,
        stores=stores,
        forgotten={stores[i].key for i in range(0, 1200, 50)},
        digest_seq=live.seq,
        digest=list(live.tiers),
        first_ack=replies[0],
        projections=rows,
    )


def test_backup_manifest_covers_log(original):
    manifest = original.manifest
    paths = {entry["path"] for entry in manifest["files"]}
    assert manifest["snapshot_seq"] == original.digest_seq
    assert manifest["log_seq"] == original.digest_seq
    assert manifest["shards"] == SHARDS
    assert {"log.tmlog", "stack.json", "projections.sqlite3"} <= paths
    for shard in range(SHARDS):
        assert f"snapshots/shard-{shard}/{original.digest_seq:020d}.snap" in paths
    # Every logged event has an id of its own (the router assigns one to a
    # request without), and no id was sent twice here.
    assert manifest["ids"] == manifest["log_seq"]
    assert sum(manifest["effects"].values()) > 0
    assert 0 < min(manifest["projection_checkpoints"].values()) < manifest["log_seq"]


def shard_ready_lines(data_dir: Path) -> list[dict]:
    lines = (data_dir / "logs" / "router.log").read_text().splitlines()
    return [record for record in map(_json_or_none, lines) if record and record.get("event") == "shard.ready"]


def _json_or_none(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def test_restore_recovers_original_state(original, ray_cluster, tmp_path):
    data_dir = tmp_path / "restored"
    result = run_command("restore", str(original.backup), "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stderr
    assert "tiermem up --data-dir" in result.stderr

    stack = start_stack(ray_cluster, data_dir)
    try:
        ready = shard_ready_lines(data_dir)
        with Client(stack.endpoints, timeout=30) as client:
            live = client.digest()
            # Before the reads below, which are events with effects of their own.
            project(stack)
            rows = projection_rows(stack.config.projections_db)
            reads = client.pipeline(
                [Get(namespace=event.namespace, key=event.key) for event in original.stores], window=300
            )
            resent = client.request(original.stores[0])
            fresh = client.request(Store(id="after-restore", namespace="agent-0", key="new", value=1))
    finally:
        stack.stop()

    assert live.seq == original.digest_seq
    assert compare_digests(original.digest, list(live.tiers)) == []
    for event, reply in zip(original.stores, reads, strict=True):
        if event.key in original.forgotten:
            assert isinstance(reply, NotFound), event.key
        else:
            assert isinstance(reply, Value), event.key
            assert reply.value == event.value
    # The id index came back, so a resent request keeps its original seq.
    assert isinstance(resent, Ack)
    assert resent.duplicate is True
    assert resent.seq == original.first_ack.seq
    assert isinstance(fresh, Ack)
    assert fresh.seq > original.manifest["log_seq"]
    # Each shard loaded its snapshot at the log's end, so it replayed nothing.
    assert sorted(record["shard"] for record in ready) == list(range(SHARDS))
    assert [record["recovery"] for record in ready] == [0] * SHARDS
    # The restored projections consumed the effects of the events after
    # their checkpoint from the exported effect streams, as the live ones did.
    assert rows.keys() == original.projections.keys()
    for table in original.projections:
        assert rows[table] == original.projections[table], table


def test_restore_rejects_damaged_backup(original, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(original.backup, damaged)
    snapshot = next((damaged / "snapshots" / "shard-1").iterdir())
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(data))

    result = run_command("restore", str(damaged), "--data-dir", str(tmp_path / "restored"))

    assert result.returncode == 1
    assert "failed its SHA-256 check" in result.stderr
    assert snapshot.name in result.stderr
    assert not (tmp_path / "restored").exists()


def test_restore_rejects_nonempty_data_dir(original, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "stack.json").write_text("{}")

    result = run_command("restore", str(original.backup), "--data-dir", str(target))

    assert result.returncode == 1
    assert "is not empty" in result.stderr
    assert (target / "stack.json").read_text() == "{}"


def test_restore_rejects_unfinished_backup(tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "log.tmlog").write_bytes(b"")

    result = run_command("restore", str(unfinished), "--data-dir", str(tmp_path / "restored"))

    assert result.returncode == 1
    assert "not a finished tiermem backup" in result.stderr


def test_restore_into_log_url(original, redis_factory, tmp_path):
    log_server = redis_factory("log")
    target = tmp_path / "restored"

    result = run_command("restore", str(original.backup), "--data-dir", str(target), "--log-url", log_server.url, "--json")

    assert result.returncode == 0, result.stderr
    restored = json.loads(result.stdout.splitlines()[-1])
    with log_server.client() as client:
        last_seq = RedisEventLog(client).last_seq()
        ids = client.hlen("tiermem:ids")
    stack_config = json.loads((target / "stack.json").read_text())
    assert restored["log_url"] == log_server.url
    assert last_seq == original.manifest["log_seq"]
    assert ids == original.manifest["ids"]
    assert stack_config["log_url"] == log_server.url
    assert stack_config["stm_url"] is None
    assert not (target / "redis-log").exists()


def test_restore_rejects_nonempty_log_url(original, redis_factory, tmp_path):
    log_server = redis_factory("log")
    with log_server.client() as client:
        client.xadd("tiermem:log", {"f": "1"}, id="1-0")
    target = tmp_path / "restored"

    result = run_command("restore", str(original.backup), "--data-dir", str(target), "--log-url", log_server.url)

    assert result.returncode == 1
    assert "already contains tiermem:log" in result.stderr
    assert list(target.iterdir()) == []


def test_backup_waits_for_unapplied_events(ray_cluster, tmp_path):
    stack = start_stack(ray_cluster, tmp_path / "data")
    try:
        with Client(stack.endpoints, timeout=30) as client:
            client.request(Store(namespace="agent-0", key="applied", value=1))
        stack.stop_router()
        # A router that crashed between its append and its dispatch leaves
        # such an event: in the log, applied by no shard yet.
        with redis.Redis.from_url(stack.config.log_url or "") as log_client:
            event_log = RedisEventLog(log_client, stream=stack.config.log_stream)
            seq = event_log.last_seq() + 1
            event_log.append([Store(id="unapplied", namespace="agent-0", key="late", value=2, seq=seq, ts=1)], [0])
        out = tmp_path / "backup"

        result = run_command("backup", "--data-dir", stack.config.data_dir, str(out), "--timeout", "1")
    finally:
        stack.stop()

    assert result.returncode == 1
    assert f"have not applied the log up to seq {seq} after 1s" in result.stderr
    assert "tiermem up" in result.stderr
    assert not (out / "manifest.json").exists()
