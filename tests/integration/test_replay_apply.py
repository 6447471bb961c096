"""`tiermem replay --apply` and `ShardHost.rebuild`: live tiers restored after STM loses its data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest
import redis

from events.types import Forget, Get, Maintain, Store
from handlers.actor import build_shard
from handlers.policy import Policy
from handlers.shard import RecoveryReport
from handlers.sharding import shard_of
from replay.rebuild import compare_digests
from replay.snapshot import snapshot_root
from tiermem.commands.replay import run
from tiermem.config import StackConfig, write_stack_config

pytestmark = pytest.mark.integration

SMALL = Policy(cache_capacity=8, stm_capacity=3, im_capacity=4, ltm_capacity=6)
SHARDS = 2


def mixed_events(rounds: int, start: int = 0) -> list:
    events = []
    for round_ in range(start, start + rounds):
        for n in range(5):
            for k in range(12):
                events.append(Store(namespace=f"ns{n}", key=f"k{k}", value={"r": round_, "k": k}, importance=((k * 7) % 10) / 10))
            events.append(Get(namespace=f"ns{n}", key=f"k{round_}"))
            events.append(Forget(namespace=f"ns{n}", key=f"k{11 - round_}"))
        events.append(Maintain())
    return events


def own_count(events: list, shard: int) -> int:
    return sum(1 for event in events if isinstance(event, Maintain) or shard_of(event.namespace, SHARDS) == shard)


def write_stack(data_dir: Path, servers) -> None:
    config = StackConfig(
        data_dir=str(data_dir),
        shards=SHARDS,
        policy=SMALL,
        log_url=servers.log.url,
        stm_url=servers.stm.url,
        im_url=servers.im.url,
    )
    write_stack_config(config, data_dir / "stack.json")


def stored_digests(servers, data_dir: Path) -> list:
    """Open each shard on its tiers as a restarted actor would; return the digests it finds."""
    found = []
    for settings in servers.shard_settings(SHARDS, SMALL):
        host = build_shard(msgspec.structs.replace(settings, snapshot_dir=str(snapshot_root(data_dir))))
        try:
            report = host.recover()
            assert report.rebuilt is False, report.reason
            assert report.replayed == 0
            found += host.digests()
        finally:
            host.close()
    return found


def test_apply_local_restores_flushed_stm(start_router, servers, tmp_path, capsys):
    router = start_router(shards=SHARDS, policy=SMALL)
    head, tail = mixed_events(2), mixed_events(1, start=2)
    write_stack(tmp_path, servers)
    with router.client() as client:
        client.pipeline(head)
        assert run(["snapshot", "--local", "--data-dir", str(tmp_path)]) == 0
        snapshot_seq = servers.event_log().last_seq()
        client.pipeline(tail)
        before = client.digest()
    router.stop()
    redis.Redis.from_url(servers.stm.url).flushall()
    capsys.readouterr()

    status = run(["replay", "--apply", "--local", "--json", "--data-dir", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert status == 0
    reports = [msgspec.convert(item, RecoveryReport) for item in summary["shards"]]
    assert [report.snapshot_seq for report in reports] == [snapshot_seq, snapshot_seq]
    assert [report.replayed for report in reports] == [own_count(tail, shard) for shard in range(SHARDS)]
    assert summary["events"] == len(tail) + sum(isinstance(event, Maintain) for event in tail)
    assert compare_digests(before.tiers, stored_digests(servers, tmp_path)) == []


def test_apply_local_refuses_running_router(servers, tmp_path, capsys):
    write_stack(tmp_path, servers)
    (tmp_path / "endpoints.json").write_text(json.dumps({"router_pid": os.getpid()}))

    status = run(["replay", "--apply", "--local", "--data-dir", str(tmp_path)])

    assert status == 1
    assert f"the router (pid {os.getpid()}" in capsys.readouterr().err


def test_apply_through_router_restores_flushed_stm(start_router, servers, tmp_path, capsys):
    """Without --local, the running router rebuilds its shards and keeps serving."""
    router = start_router(shards=SHARDS, policy=SMALL)
    write_stack(tmp_path, servers)
    (tmp_path / "endpoints.json").write_text(json.dumps(router.endpoints))
    with router.client() as client:
        client.pipeline(mixed_events(2))
        before = client.digest()
        redis.Redis.from_url(servers.stm.url).flushall()
        capsys.readouterr()

        status = run(["replay", "--apply", "--json", "--data-dir", str(tmp_path)])
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        after = client.digest()
        found = client.get("k5", namespace="ns1")

    assert status == 0
    assert summary["events"] > 0
    assert after.seq == before.seq
    assert compare_digests(before.tiers, after.tiers) == []
    assert found.value is not None


@pytest.mark.slow
def test_ray_actor_rebuild_restores_digests(ray_cluster, start_router, servers):
    """Ray runs the rebuild call in order with batches, and live digests return to their values."""
    import ray

    router = start_router(shards=SHARDS, policy=SMALL, ray=True)
    events = mixed_events(2)
    with router.client() as client:
        client.pipeline(events)
        before = client.digest()
        redis.Redis.from_url(servers.stm.url).flushall()
        damaged = client.digest()
        payloads = ray.get([actor.rebuild.remote() for actor in router.dispatcher.actors], timeout=120)
        after = client.digest()
        found = client.get("k5", namespace="ns1")

    reports = [msgspec.msgpack.decode(payload, type=RecoveryReport) for payload in payloads]
    assert compare_digests(before.tiers, damaged.tiers) != []
    assert [report.reason for report in reports] == ["rebuild requested", "rebuild requested"]
    assert [report.replayed for report in reports] == [own_count(events, shard) for shard in range(SHARDS)]
    assert after.seq == before.seq
    assert compare_digests(before.tiers, after.tiers) == []
    assert found.value == {"r": 1, "k": 5}
