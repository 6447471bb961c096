"""`tiermem demo`: the chitchat corpus through the whole stack, a crash, and recovery.

Steps: start the embedded stack; store every utterance as a `Store` event
(one namespace per conversation) from a pipelined client; read a sample
back and check each value; run maintenance; take the digests of every tier;
kill -9 the shard actors and the router; restart the router (its new actors
recover from the tiers and the log); compare the digests, rebuild the same
log prefix in scratch tiers and compare again, and read the sample back.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import redis
import structlog

from bus.client import Client
from events.log import RedisEventLog
from events.types import Ack, Error, Get, Maintain, Store, Value
from replay.rebuild import compare_digests, rebuild
from tiermem.config import StackConfig
from tiermem.stack import Stack, stack_lock_held

__all__ = ["DemoResult", "corpus", "run_demo"]

log = structlog.get_logger("tiermem.demo")


class DemoResult(msgspec.Struct, kw_only=True):
    ingested: int
    acked: int
    verified: bool
    events_per_s: float
    recovery_s: float
    get_p99_ms: float
    get_p50_ms: float
    sample_checked: int
    sample_mismatches: int
    maintenance_cycles: int
    digests_match: bool
    rebuild_matches: bool
    rebuild_events_per_s: float
    last_seq: int
    tiers: dict[str, int]
    seconds: float
    data_dir: str


def corpus(limit: int | None = None) -> Iterator[tuple[str, str, dict[str, Any], float]]:
    """Yield (namespace, key, value, importance) for each utterance, in a fixed order."""
    import chitchat_dataset

    dataset = chitchat_dataset.Dataset()
    produced = 0
    for conversation_id in sorted(dataset):
        conversation = dataset[conversation_id]
        ratings = conversation.get("ratings") or {}
        importance = min(1.0, max(0.0, ratings.get("interesting", 5) / 10))
        index = 0
        for message in conversation["messages"]:
            for utterance in message:
                if limit is not None and produced >= limit:
                    return
                value = {
                    "text": utterance["text"],
                    "sender": utterance["sender"],
                    "timestamp": utterance["timestamp"],
                    "prompt": conversation.get("prompt", ""),
                }
                yield conversation_id, f"u{index:04d}", value, importance
                index += 1
                produced += 1


def _store_events(limit: int | None) -> Iterator[Store]:
    for namespace, key, value, importance in corpus(limit):
        yield Store(
            id=f"demo:{namespace}:{key}",
            namespace=namespace,
            key=key,
            value=value,
            importance=importance,
            tags=["chitchat"],
        )


def _progress(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", file=sys.stderr, disable=not enabled, smoothing=0.1, mininterval=0.5)


def _percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# Written into the data directory by the demo, so a later demo clears only
# a directory that an earlier demo made, never the data of `tiermem up`.
DEMO_MARKER = "demo.marker"


def _prepare_dir(data_dir: Path) -> None:
    """Create an empty data directory, clearing one that an earlier demo left behind."""
    if data_dir.exists() and not data_dir.is_dir():
        raise SystemExit(f"--data-dir {data_dir} is not a directory")
    if data_dir.exists() and any(data_dir.iterdir()):
        if not (data_dir / DEMO_MARKER).exists():
            raise SystemExit(
                f"{data_dir} is not empty and is not an earlier demo's directory "
                f"(it has no {DEMO_MARKER}); the demo deletes its data directory "
                "before it starts, so pass --data-dir with a new path"
            )
        if stack_lock_held(data_dir):
            raise SystemExit(
                f"a stack runs in {data_dir} (its stack.lock is held): stop it, "
                "or pass --data-dir with a new path"
            )
        log.info("demo.data_dir.cleared", path=str(data_dir), reason="the demo starts from an empty log")
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / DEMO_MARKER).write_text(
        "This directory belongs to `tiermem demo`, which deletes it on its next run.\n"
    )


def run_demo(
    *,
    limit: int | None,
    data_dir: Path,
    shards: int = 2,
    settings: StackConfig | None = None,
    sample_size: int = 2000,
    maintenance_cycles: int = 3,
    show_progress: bool = True,
    say=print,
) -> DemoResult:
    started = time.monotonic()
    _prepare_dir(data_dir)
    # The demo runs its own maintenance passes, so beat's schedule is set
    # beyond the demo's length; digests are still checked against the log
    # if another event arrives.
    # `settings` (from --config and the environment) is the base, and the
    # demo replaces the data directory, shard count and ports.
    config = msgspec.structs.replace(
        settings or StackConfig(), data_dir=str(data_dir), shards=shards, maintain_interval_s=3600.0
    )
    config.router = msgspec.structs.replace(config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0})
    stack = Stack(config, supervised=True)
    say(f"starting the embedded stack in {data_dir} (4 Redis servers, Ray, the router with {shards} shards, a Celery worker and beat)")
    stack.start()
    try:
        return _run(stack, limit, sample_size, maintenance_cycles, show_progress, say, started)
    finally:
        stack.stop()


def _run(stack: Stack, limit, sample_size, maintenance_cycles, show_progress, say, started) -> DemoResult:
    events = list(_store_events(limit))
    total = len(events)
    say(f"streaming {total:,} utterances from the chitchat corpus as Store events")
    acked = 0
    errors: dict[str, int] = {}
    with Client(stack.endpoints, timeout=30) as client:
        bar = _progress(total, show_progress)
        ingest_started = time.monotonic()
        for reply in client.stream(events, window=2000):
            if isinstance(reply, Ack):
                acked += 1
            elif isinstance(reply, Error):
                errors[reply.code] = errors.get(reply.code, 0) + 1
            bar.update(1)
        ingest_seconds = time.monotonic() - ingest_started
        bar.close()
        rate = total / ingest_seconds if ingest_seconds else 0.0
        say(f"acknowledged {acked:,} of {total:,} in {ingest_seconds:.1f}s ({rate:,.0f} events/s)")

        rng = random.Random(7)
        sample = rng.sample(events, min(sample_size, total))
        latencies, mismatches = _read_back(client, sample)
        say(f"read back {len(sample):,} sampled memories: {mismatches} mismatches, Get p50 {_percentile(latencies, 0.5):.2f} ms, p99 {_percentile(latencies, 0.99):.2f} ms")

        for _ in range(maintenance_cycles):
            client.maintain()
        before = client.digest()
        tiers_before = _tier_counts(before.tiers)
        say(f"ran {maintenance_cycles} maintenance passes; records per tier: {tiers_before}")
        status = client.status()
        pids = [shard.pid for shard in status.shards]

    say(f"killing shard actors {pids} and the router (pid {stack.router_pid}) with SIGKILL")
    crash_at = time.monotonic()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stack.kill_router()
    stack.start_router()
    with Client(stack.endpoints, timeout=60) as client:
        after = client.digest()
        recovery_s = time.monotonic() - crash_at
        mismatched = compare_digests(before.tiers, after.tiers)
        say(f"recovered in {recovery_s:.1f}s at seq {after.seq}; digests {'match' if not mismatched else 'DIFFER'} for {len(after.tiers)} shard tiers")
        for item in mismatched:
            say(f"  mismatch: shard {item.shard} {item.tier}: {item.expected} != {item.actual}")

        event_log = RedisEventLog(redis.Redis.from_url(stack.config.log_url or ""))
        rebuilt = rebuild(event_log, shards=stack.config.shards, policy=stack.config.policy, until_seq=after.seq)
        rebuild_mismatches = compare_digests(after.tiers, rebuilt.digests)
        if after.seq != before.seq:
            # Another writer (Celery beat's Maintain) added events between
            # the two digests, so compare each with the log prefix it covers.
            say(f"  {after.seq - before.seq} events arrived between the digests; checking the earlier digest against its own rebuild")
            earlier = rebuild(event_log, shards=stack.config.shards, policy=stack.config.policy, until_seq=before.seq)
            mismatched = compare_digests(before.tiers, earlier.digests)
        say(f"rebuilt {rebuilt.events:,} events from the log in scratch tiers in {rebuilt.seconds:.1f}s; digests {'match' if not rebuild_mismatches else 'DIFFER'}")
        _, after_mismatches = _read_back(client, sample[:200])
        say(f"read back {min(200, len(sample))} memories after recovery: {after_mismatches} mismatches")

    digests_match = not mismatched
    verified = (
        acked == total
        and mismatches == 0
        and after_mismatches == 0
        and digests_match
        and not rebuild_mismatches
        and after.seq >= acked + maintenance_cycles
    )
    return DemoResult(
        ingested=total,
        acked=acked,
        verified=verified,
        events_per_s=round(rate, 1),
        recovery_s=round(recovery_s, 2),
        get_p99_ms=round(_percentile(latencies, 0.99), 3),
        get_p50_ms=round(_percentile(latencies, 0.5), 3),
        sample_checked=len(sample),
        sample_mismatches=mismatches + after_mismatches,
        maintenance_cycles=maintenance_cycles,
        digests_match=digests_match,
        rebuild_matches=not rebuild_mismatches,
        rebuild_events_per_s=round(rebuilt.events_per_s, 1),
        last_seq=after.seq,
        tiers=tiers_before,
        seconds=round(time.monotonic() - started, 1),
        data_dir=str(stack.data_dir),
    )


def _read_back(client: Client, sample: list[Store]) -> tuple[list[float], int]:
    latencies: list[float] = []
    mismatches = 0
    for event in sample:
        began = time.perf_counter()
        reply = client.request(Get(namespace=event.namespace, key=event.key))
        latencies.append((time.perf_counter() - began) * 1000)
        if not isinstance(reply, Value) or reply.value != event.value:
            mismatches += 1
            log.error("demo.readback.mismatch", namespace=event.namespace, key=event.key, reply=type(reply).__name__)
    return latencies, mismatches


def _tier_counts(digests) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in digests:
        counts[item.tier] = counts.get(item.tier, 0) + item.records
    return counts


def print_result(result: DemoResult, as_json: bool, say=print) -> None:
    say("")
    say(f"verified: {'true' if result.verified else 'false'}")
    say(f"  ingested {result.ingested:,}, acknowledged {result.acked:,} at {result.events_per_s:,.0f} events/s")
    say(f"  Get p50 {result.get_p50_ms} ms, p99 {result.get_p99_ms} ms")
    say(f"  recovery after kill -9: {result.recovery_s} s; rebuild from log {result.rebuild_events_per_s:,.0f} events/s")
    say(f"  records per tier: {result.tiers}; total {result.seconds} s")
    if as_json:
        print(json.dumps(msgspec.to_builtins(result)))
