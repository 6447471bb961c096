"""`tiermem replay --verify` against a router with real Redis tiers: pass, and fail on tampering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import redis

from events.types import Forget, Get, Maintain, Store
from handlers.policy import Policy
from handlers.sharding import shard_of
from replay.snapshot import take_snapshot
from tiermem.commands.replay import run
from tiermem.config import StackConfig, write_stack_config
from tiers.base import Meta
from tiers.redis_tier import redis_key_prefix

pytestmark = pytest.mark.integration

# The command as a program, as `tiermem replay` runs it.
PROGRAM = "import sys; from tiermem.commands.replay import main; sys.exit(main(sys.argv[1:]))"

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


@pytest.fixture
def stack_dir(start_router, servers, tmp_path) -> Path:
    """A data directory whose stack.json and endpoints.json name an in-process router."""
    router = start_router(shards=SHARDS, policy=SMALL)
    with router.client() as client:
        client.pipeline(mixed_events(3))
    config = StackConfig(
        data_dir=str(tmp_path),
        shards=SHARDS,
        policy=SMALL,
        log_url=servers.log.url,
        stm_url=servers.stm.url,
        im_url=servers.im.url,
    )
    write_stack_config(config, tmp_path / "stack.json")
    (tmp_path / "endpoints.json").write_text(json.dumps(router.endpoints))
    return tmp_path


def verify(data_dir: Path, capsys, *extra: str) -> tuple[int, str, dict]:
    status = run(["replay", "--verify", "--local", "--json", "--data-dir", str(data_dir), *extra])
    out = capsys.readouterr().out
    return status, out, json.loads(out.strip().splitlines()[-1])


def tamper_stm(servers, shard: int, value) -> tuple[str, str]:
    """Overwrite one STM value directly in Redis; return its (namespace, key)."""
    client = redis.Redis.from_url(servers.stm.url)
    values_key = f"{redis_key_prefix('stm', shard)}:v"
    field = sorted(client.hkeys(values_key))[0]
    client.hset(values_key, field, b"\x00" + msgspec.msgpack.encode(value))
    namespace, key = field.decode().split("\0")
    return namespace, key


def test_verify_passes_healthy(stack_dir, servers, capsys):
    status, _, summary = verify(stack_dir, capsys)

    assert status == 0
    assert summary["verified"] is True
    assert summary["events"] > 0
    assert summary["seq"] == servers.event_log().last_seq()
    assert summary["events_per_s"] > 0
    assert summary["seconds"] > 0
    assert [item["verified"] for item in summary["shards"]] == [True, True]


def test_verify_from_snapshot_replays_tail(stack_dir, start_router, servers, capsys):
    event_log = servers.event_log()
    snapshot_seq = event_log.last_seq()
    for shard in range(SHARDS):
        take_snapshot(stack_dir, event_log, SHARDS, SMALL, shard, snapshot_seq)

    status, _, from_snapshot = verify(stack_dir, capsys)
    full_status, _, from_empty = verify(stack_dir, capsys, "--from-empty")

    assert status == 0
    assert full_status == 0
    assert [item["base_seq"] for item in from_snapshot["shards"]] == [snapshot_seq, snapshot_seq]
    assert from_snapshot["events"] == 0
    assert [item["base_seq"] for item in from_empty["shards"]] == [0, 0]
    assert from_empty["events"] > 0


def test_verify_fails_on_tampered_record(stack_dir, servers, capsys):
    namespace, key = tamper_stm(servers, 0, {"tampered": True})

    status, out, summary = verify(stack_dir, capsys)

    assert status == 1
    assert summary["verified"] is False
    shard0, shard1 = summary["shards"]
    assert shard1["verified"] is True
    assert [item["tier"] for item in shard0["mismatches"]] == ["stm"]
    assert [(item["tier"], item["namespace"], item["key"], item["problem"]) for item in shard0["differences"]] == [
        ("stm", namespace, key, "differs")
    ]
    assert shard0["differences"][0]["live"] == 'value={"tampered": true}'


def test_verify_prints_differing_keys(stack_dir, servers, capsys):
    namespace, key = tamper_stm(servers, 1, "tampered")

    status = run(["replay", "--verify", "--local", "--data-dir", str(stack_dir)])
    out = capsys.readouterr().out

    assert status == 1
    assert "verified: false" in out
    assert "shard 1 stm: digest" in out
    assert f"  {namespace}/{key}: differs" in out
    assert 'live:    value="tampered"' in out


def test_verify_names_differing_meta_field(stack_dir, servers, capsys):
    client = redis.Redis.from_url(servers.stm.url)
    metas_key = f"{redis_key_prefix('stm', 0)}:m"
    field = sorted(client.hkeys(metas_key))[0]
    meta = msgspec.msgpack.decode(client.hget(metas_key, field), type=Meta)
    client.hset(metas_key, field, msgspec.msgpack.encode(msgspec.structs.replace(meta, access_count=meta.access_count + 5)))

    status, _, summary = verify(stack_dir, capsys)

    assert status == 1
    (difference,) = summary["shards"][0]["differences"]
    assert difference["problem"] == "differs"
    assert difference["rebuilt"] == f"access_count={meta.access_count}"
    assert difference["live"] == f"access_count={meta.access_count + 5}"


def test_verify_lists_extra_live_key(stack_dir, servers, capsys):
    client = redis.Redis.from_url(servers.stm.url)
    prefix = redis_key_prefix("stm", 0)
    meta = client.hget(f"{prefix}:m", sorted(client.hkeys(f"{prefix}:m"))[0])
    client.hset(f"{prefix}:v", b"zz-intruder\0k", b"\x00" + msgspec.msgpack.encode(1))
    client.hset(f"{prefix}:m", b"zz-intruder\0k", meta)

    status, _, summary = verify(stack_dir, capsys)

    assert status == 1
    differences = summary["shards"][0]["differences"]
    assert [(item["namespace"], item["key"], item["problem"]) for item in differences] == [("zz-intruder", "k", "only in live")]


def test_verify_without_stack_explains(tmp_path, capsys):
    status = run(["replay", "--verify", "--local", "--data-dir", str(tmp_path)])

    assert status == 1
    assert f"{tmp_path / 'stack.json'} does not exist: run `tiermem up --data-dir {tmp_path}` once" in capsys.readouterr().err


def test_verify_command_json_last_line(stack_dir):
    """As a program, logs go to standard error and the JSON object ends standard output."""
    env = dict(os.environ, TIERMEM_LOG_JSON="1")
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, "replay", "--verify", "--local", "--json", "--data-dir", str(stack_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )

    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["verified"] is True
    assert {"verified", "events", "events_per_s", "seconds"} <= summary.keys()
    assert "shard 0: verified" in done.stderr
    assert "replay.verify.passed" in done.stderr


def test_verify_after_later_forget_retries_at_fresh_digest(stack_dir):
    from bus.client import Client
    from handlers.sharding import shard_of
    from replay.engine import live_digest, load_target, verify_shard

    target = load_target(stack_dir)
    seq, digests = live_digest(stack_dir)
    # Forget a key that live still had at `seq`: its data key is destroyed,
    # so a rebuild at `seq` reads the value as erased.
    with Client.from_data_dir(stack_dir) as client:
        client.request(Forget(namespace="ns0", key="k0"))
    shard = shard_of("ns0", SHARDS)

    stale = verify_shard(target, shard, seq, digests)
    fresh = verify_shard(target, shard, seq, digests, redigest=lambda: live_digest(stack_dir))

    assert not stale.verified
    assert fresh.verified
    assert fresh.retries == 1
    assert fresh.seq > seq


def test_verify_retry_reads_only_the_tail(stack_dir):
    """A retry goes on from the first attempt's seq instead of rebuilding from the start."""
    from bus.client import Client
    from replay.engine import live_digest, load_target, verify_shard

    target = load_target(stack_dir)
    seq, digests = live_digest(stack_dir)
    with Client.from_data_dir(stack_dir) as client:
        client.pipeline(mixed_events(1, start=3))
        client.request(Forget(namespace="ns1", key="k1"))
    read: list[int] = []

    result = verify_shard(
        target,
        shard_of("ns1", SHARDS),
        seq,
        digests,
        from_empty=True,
        progress=read.append,
        redigest=lambda: live_digest(stack_dir),
    )

    assert result.verified
    assert result.retries == 1
    # Each event of the log up to the fresh seq is read once.
    assert sum(read) == result.seq
    assert result.seq > seq
