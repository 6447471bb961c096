"""Snapshots against real Redis and SQLite: built from the log, equal to live, used by recovery."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import redis

from events.types import Forget, Get, Maintain, Store
from handlers.actor import build_shard
from handlers.policy import Policy
from handlers.sharding import shard_of
from replay.snapshot import snapshot_root, take_snapshot
from tiermem.commands.replay import run
from tiermem.config import StackConfig, write_stack_config
from tiers.snapshot import list_snapshots, read_snapshot

pytestmark = pytest.mark.integration

SMALL = Policy(cache_capacity=8, stm_capacity=3, im_capacity=4, ltm_capacity=6)
SHARDS = 2


def mixed_events(rounds: int, start: int = 0, namespaces: int = 5, keys: int = 12) -> list:
    events = []
    for round_ in range(start, start + rounds):
        for n in range(namespaces):
            for k in range(keys):
                events.append(Store(namespace=f"ns{n}", key=f"k{k}", value={"r": round_, "text": f"note {k}"}, importance=((k * 7) % 10) / 10))
            events.append(Get(namespace=f"ns{n}", key=f"k{round_ % keys}"))
            events.append(Forget(namespace=f"ns{n}", key=f"k{(round_ + 3) % keys}"))
        events.append(Maintain())
    return events


def write_stack(data_dir: Path, servers, router=None) -> StackConfig:
    config = StackConfig(
        data_dir=str(data_dir),
        shards=SHARDS,
        policy=SMALL,
        log_url=servers.log.url,
        stm_url=servers.stm.url,
        im_url=servers.im.url,
    )
    write_stack_config(config, data_dir / "stack.json")
    if router is not None:
        (data_dir / "endpoints.json").write_text(json.dumps(router.endpoints))
    return config


def tier_digests(digests, shard: int) -> dict[str, tuple[str, int]]:
    return {item.tier: (item.digest, item.records) for item in digests if item.shard == shard and item.tier != "cache"}


def own_count(events: list, shard: int) -> int:
    return sum(1 for event in events if isinstance(event, Maintain) or shard_of(event.namespace, SHARDS) == shard)


def test_snapshot_equals_live_digest(start_router, servers, tmp_path):
    router = start_router(shards=SHARDS, policy=SMALL)
    with router.client() as client:
        client.pipeline(mixed_events(3))
        live = client.digest()
    event_log = servers.event_log()

    for shard in range(SHARDS):
        result = take_snapshot(tmp_path, event_log, SHARDS, SMALL, shard, live.seq)
        snapshot = read_snapshot(result.path)

        assert result.watermark == live.seq
        assert snapshot.digests() == tier_digests(live.tiers, shard)
    assert sum(len(read_snapshot(path).tiers["ltm"]) for shard in range(SHARDS) for _, path in list_snapshots(snapshot_root(tmp_path), shard)) > 0


def test_recovery_from_snapshot_replays_tail(start_router, servers, tmp_path):
    router = start_router(shards=SHARDS, policy=SMALL)
    head, tail = mixed_events(3), mixed_events(2, start=3)
    with router.client() as client:
        client.pipeline(head)
        snapshot_seq = client.digest().seq
        for shard in range(SHARDS):
            take_snapshot(tmp_path, servers.event_log(), SHARDS, SMALL, shard, snapshot_seq)
        client.pipeline(tail)
        before = client.digest()
    router.stop()
    redis.Redis.from_url(servers.stm.url).flushall()

    for settings in servers.shard_settings(SHARDS, SMALL):
        host = build_shard(msgspec.structs.replace(settings, snapshot_dir=str(snapshot_root(tmp_path))))
        try:
            report = host.recover()
            after = host.digests()
        finally:
            host.close()

        assert report.rebuilt is True
        assert report.snapshot_seq == snapshot_seq
        assert report.replayed == own_count(tail, settings.shard)
        assert report.watermark <= before.seq
        assert [item for item in after] == [item for item in before.tiers if item.shard == settings.shard]


def test_snapshot_command_local(start_router, servers, tmp_path, capsys):
    router = start_router(shards=SHARDS, policy=SMALL)
    with router.client() as client:
        client.pipeline(mixed_events(2))
        live = client.digest()
    write_stack(tmp_path, servers, router)

    status = run(["snapshot", "--data-dir", str(tmp_path), "--local", "--json"])
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    again = run(["snapshot", "--data-dir", str(tmp_path), "--local", "--json"])
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert status == 0
    assert again == 0
    assert first["seq"] == live.seq
    assert [item["written"] for item in first["shards"]] == [True, True]
    assert [item["written"] for item in second["shards"]] == [False, False]
    assert second["events"] == 0
    for shard in range(SHARDS):
        (watermark, path), = list_snapshots(snapshot_root(tmp_path), shard)
        assert watermark == live.seq
        assert read_snapshot(path).digests() == tier_digests(live.tiers, shard)


def test_snapshot_command_one_shard(start_router, servers, tmp_path, capsys):
    router = start_router(shards=SHARDS, policy=SMALL)
    with router.client() as client:
        client.pipeline(mixed_events(1))
    write_stack(tmp_path, servers, router)

    status = run(["snapshot", "--data-dir", str(tmp_path), "--local", "--shard", "1"])
    missing = run(["snapshot", "--data-dir", str(tmp_path), "--local", "--shard", "5"])
    error = capsys.readouterr().err

    assert status == 0
    assert list_snapshots(snapshot_root(tmp_path), 0) == []
    assert len(list_snapshots(snapshot_root(tmp_path), 1)) == 1
    assert missing == 1
    assert "--shard 5 does not exist: the stack has shards 0 to 1" in error
