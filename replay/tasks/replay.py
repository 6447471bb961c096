"""The replay tasks: verify, snapshot and view building, one shard per task, on queue `replay`.

Each task reads the stack from the Celery app's configuration
(`app.conf.tiermem_stack`), works on one shard, and returns a JSON-ready
dict. `tiermem replay` and `tiermem snapshot` send one task per shard and
wait for all of them, so shards run in parallel on as many worker processes
as there are.

Each task reports its progress in the worker's replay gauges
(`replay.metrics.replay_progress`), so a scrape of the worker during a run
shows how many log events it has read and the seq it replays up to.

The app acknowledges a task only after it finishes and runs it again when
its worker dies, so every task here is idempotent. `verify_shard` only
reads. `snapshot_shard` with the same `until_seq` leaves the same files,
because it keeps an existing snapshot at that seq. `build_view_shard`
writes the same bytes again.
"""

from __future__ import annotations

from typing import Any

import msgspec
from celery import Task

from events.types import TierDigest
from replay import engine
from replay.celery_app import app
from replay.metrics import replay_progress
from replay.snapshot import DEFAULT_KEEP, take_snapshot

__all__ = ["QUEUE", "build_view_shard", "snapshot_shard", "verify_shard"]

QUEUE = "replay"


def _target(task: Task) -> engine.ReplayTarget:
    return engine.target_from_config(task.app.conf.tiermem_stack)


@app.task(bind=True, name="tiermem.replay.verify_shard", queue=QUEUE)
def verify_shard(
    self: Task,
    shard: int,
    seq: int | None = None,
    expected: list[dict[str, Any]] | None = None,
    from_empty: bool = False,
    max_keys: int = engine.DEFAULT_MAX_KEYS,
) -> dict[str, Any]:
    """Rebuild `shard` at `seq` and compare it with the live digests `expected`.

    `expected` is the `tiers` list of a `DigestReply` taken at `seq`, as
    dicts. Without it the task requests a digest from the router and
    verifies at that digest's position, which must not be before `seq`.
    Returns a `ShardVerification` as a dict.
    """
    target = _target(self)
    if expected is None:
        live_seq, digests = engine.live_digest(target.data_dir)
        if seq is not None and live_seq < seq:
            raise engine.ReplayError(f"the live digest is at seq {live_seq}, before the requested seq {seq}")
        seq = live_seq
    else:
        if seq is None:
            raise ValueError("seq is missing: pass the seq at which the expected digests were taken")
        digests = msgspec.convert(expected, list[TierDigest])
    with replay_progress("verify", shard, seq) as progress:
        result = engine.verify_shard(
            target,
            shard,
            seq,
            digests,
            from_empty=from_empty,
            max_keys=max_keys,
            progress=progress,
            redigest=lambda: engine.live_digest(target.data_dir),
        )
    return msgspec.to_builtins(result)


@app.task(bind=True, name="tiermem.replay.snapshot_shard", queue=QUEUE)
def snapshot_shard(self: Task, shard: int, until_seq: int | None = None, keep: int = DEFAULT_KEEP) -> dict[str, Any]:
    """Write the snapshot of `shard` at `until_seq` (default: the log's last seq).

    Returns a `SnapshotResult` as a dict.
    """
    target = _target(self)
    target.check_shard(shard)
    event_log = target.event_log()
    if until_seq is None:
        # Resolved here, so the gauges show the position the snapshot is taken at.
        until_seq = event_log.last_seq()
    with replay_progress("snapshot", shard, until_seq) as progress:
        result = take_snapshot(
            target.data_dir, event_log, target.shards, target.policy, shard, until_seq, keep=keep, progress=progress
        )
    return msgspec.to_builtins(result)


@app.task(bind=True, name="tiermem.replay.build_view_shard", queue=QUEUE)
def build_view_shard(self: Task, shard: int, view: str, seq: int) -> dict[str, Any]:
    """Write `shard`'s state at `seq` into view `view`; return a `ViewShard` as a dict.

    The view is readable once the caller has written its manifest with
    `engine.write_view_manifest`, after every shard's task has finished.
    """
    with replay_progress("view", shard, seq) as progress:
        result = engine.build_view_shard(_target(self), view, shard, seq, progress=progress)
    return msgspec.to_builtins(result)
