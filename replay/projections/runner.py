"""The projection runner: reads the log and the shards' effects into the database.

The runner reads from the lowest checkpoint of its projections up to the
readable end, in batches. Each batch is one SQLite transaction that writes
every projection's rows and its new checkpoint, so a crash mid-batch leaves
no trace of that batch, and the next run consumes it again: nothing is
counted twice or skipped. Checkpoints are read again after `BEGIN
IMMEDIATE`, so two runners on one database never apply a batch twice.

An event is readable once every shard that applies it has committed it,
that is, its seq is at or below the STM watermark of each such shard. A
shard writes a batch's effects before that commit, so the effects of a
readable event are complete. The runner consumes only the readable prefix
of the log: it stops before the first event that is not readable.

After committing a batch that applied a `Forget`, the runner truncates the
database's WAL (`db.scrub`), which still contains the forgotten rows'
old page images. A scrub that a reader blocks is retried after the next batch
and at the start of the next run.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Sequence

import msgspec
import redis
import structlog

from events.log import EventLog
from events.types import Event, Forget, Maintain, Search
from handlers.effects import Effect, EffectLog
from handlers.sharding import shard_of
from replay.projections.base import EventWithEffects, Projection, StageReport
from replay.projections.db import (
    connect,
    create_core_tables,
    read_checkpoints,
    request_scrub,
    scrub,
    write_checkpoint,
    write_transaction,
)
from replay.projections.errors import LogGapError, ProjectionError
from replay.projections.registry import resolve_projections
from tiers.redis_tier import RedisTier

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "ProjectionReport",
    "ProjectionResult",
    "follow_projections",
    "readable_count",
    "run_projections",
    "shard_watermarks",
]

log = structlog.get_logger("tiermem.projections")

DEFAULT_BATCH_SIZE = 5000
"""Events per transaction; the log's own read batch is 5,000 too."""

# The maximum wait, in seconds, of a scrub after a Forget for readers
# (searches) to leave older snapshots of the WAL. Searches read for
# milliseconds.
_SCRUB_TIMEOUT_S = 1.0


class ProjectionResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one run for one projection.

    `checkpoint` is the last seq its tables cover after the run, `events`
    the events it applied, and `stages` the per-stage timings of a
    pipeline. `error` is the exception that failed a batch: the projection
    stopped there for this run, and its checkpoint stayed before that batch.
    """

    name: str
    checkpoint: int
    events: int
    seconds: float
    stages: list[StageReport] = []
    error: str | None = None


class ProjectionReport(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one `run_projections` call.

    `last_seq` is the log's last seq and `watermarks` each shard's STM
    watermark when the run started. `readable_end` is the last seq the run
    could consume: exact when `complete`, an upper bound otherwise.
    `complete` means every projection reached it without failing before
    `max_seconds` ran out. `events` counts the log events read.
    """

    events: int
    seconds: float
    last_seq: int
    watermarks: list[int]
    readable_end: int
    complete: bool
    checkpoints: dict[str, int]
    projections: dict[str, ProjectionResult]


def shard_watermarks(stm_client: redis.Redis, shards: int) -> list[int]:
    """Return the STM watermark of every shard: the last seq it committed."""
    return [RedisTier("stm", stm_client, shard).watermark() for shard in range(shards)]


def _owners(event: Event, shards: int) -> Sequence[int]:
    if isinstance(event, Maintain):
        return range(shards)
    if isinstance(event, Search):
        return ()  # the router serves searches from the index, so no shard applies them
    return (shard_of(event.namespace, shards),)


def readable_count(events: Sequence[Event], watermarks: Sequence[int]) -> int:
    """Return how many leading `events` every shard that applies them has committed.

    A shard's watermark only moves when it gets events, so requiring the
    lowest watermark of all shards would stall on an idle shard. Checking
    the shards of each event consumes as much and never an uncommitted one.
    """
    shards = len(watermarks)
    for index, event in enumerate(events):
        seq = event.seq or 0
        if any(watermarks[shard] < seq for shard in _owners(event, shards)):
            return index
    return len(events)


def _check_dense(events: Sequence[Event], after_seq: int) -> None:
    """Raise `LogGapError` unless `events` are seqs after_seq + 1, + 2, … without a hole."""
    if not events:
        raise LogGapError(after_seq + 1, None)
    for offset, event in enumerate(events, start=1):
        if event.seq != after_seq + offset:
            raise LogGapError(after_seq + offset, event.seq)


def _check_not_ahead(
    checkpoints: dict[str, int], last_seq: int, db_path: str | os.PathLike[str]
) -> None:
    """Raise `ProjectionError` if a checkpoint is past the end of the log."""
    for name, checkpoint in checkpoints.items():
        if checkpoint > last_seq:
            raise ProjectionError(
                f"projection {name!r} in {os.fspath(db_path)!r} is at seq "
                f"{checkpoint}, past the log's last seq {last_seq}, so the "
                "database was built from another log: delete it to rebuild"
            )


def _with_effects(
    effect_log: EffectLog,
    events: Sequence[Event],
    watermarks: Sequence[int],
    after_seq: int,
) -> list[EventWithEffects]:
    end = events[-1].seq or 0
    by_seq: dict[int, list[Effect]] = {}
    for shard, watermark in enumerate(watermarks):
        until = min(end, watermark)
        if until <= after_seq:
            continue
        for effect in effect_log.read(shard, after_seq, until):
            by_seq.setdefault(effect.seq, []).append(effect)
    return [
        EventWithEffects(event, tuple(by_seq.get(event.seq or 0, ()))) for event in events
    ]


class _Progress:
    """Counters of one projection over one run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events = 0
        self.seconds = 0.0
        self.stages: dict[str, StageReport] = {}
        self.error: str | None = None

    def add(self, events: int, seconds: float, stages: list[StageReport] | None) -> None:
        self.events += events
        self.seconds += seconds
        for stage in stages or ():
            seen = self.stages.get(stage.name)
            if seen is not None:
                stage = StageReport(
                    name=stage.name,
                    events=seen.events + stage.events,
                    skipped=seen.skipped + stage.skipped,
                    seconds=seen.seconds + stage.seconds,
                )
            self.stages[stage.name] = stage

    def result(self, checkpoint: int) -> ProjectionResult:
        return ProjectionResult(
            name=self.name,
            checkpoint=checkpoint,
            events=self.events,
            seconds=self.seconds,
            stages=list(self.stages.values()),
            error=self.error,
        )


def _has_forget(items: Sequence[EventWithEffects]) -> bool:
    return any(isinstance(item.event, Forget) and not item.conflicted for item in items)


def _apply_batch(
    conn: sqlite3.Connection,
    active: dict[str, Projection],
    progress: dict[str, _Progress],
    items: list[EventWithEffects],
) -> None:
    """Apply one batch to every active projection in one transaction.

    A projection whose `apply` raises is rolled back to a savepoint, so the
    others still commit this batch, and it leaves `active` for this run.
    A batch with a `Forget` also records a scrub request, and after the
    commit any pending request is served (`db.scrub`).
    """
    end, end_ts = items[-1].seq, items[-1].ts
    with write_transaction(conn):
        checkpoints = read_checkpoints(conn, active)
        for name, projection in list(active.items()):
            checkpoint = checkpoints[name]
            if checkpoint >= end:
                continue  # another runner committed this batch first
            batch = [item for item in items if item.seq > checkpoint]
            started = time.perf_counter()
            conn.execute("SAVEPOINT projection_batch")
            try:
                stages = projection.apply(conn, batch)
                write_checkpoint(conn, name, end, end_ts)
            except Exception as error:  # noqa: BLE001 - any projection failure fails only its batch
                if not conn.in_transaction:
                    raise  # SQLite ended the transaction itself: no savepoint is left
                conn.execute("ROLLBACK TO projection_batch")
                conn.execute("RELEASE projection_batch")
                del active[name]
                progress[name].error = repr(error)
                log.error(
                    "projection.batch.failed",
                    projection=name,
                    from_seq=checkpoint + 1,
                    to_seq=end,
                    error=repr(error),
                    exc_info=error,
                    next=f"stopped for this run; the next run retries after seq {checkpoint}",
                )
                continue
            conn.execute("RELEASE projection_batch")
            progress[name].add(len(batch), time.perf_counter() - started, stages)
        if _has_forget(items):
            request_scrub(conn, end)
    scrub(conn, _SCRUB_TIMEOUT_S)


def run_projections(
    db_path: str | os.PathLike[str],
    event_log: EventLog,
    effect_log: EffectLog,
    stm_client: redis.Redis,
    shards: int,
    projections: Sequence[Projection | str] | None = None,
    max_seconds: float | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ProjectionReport:
    """Bring the projections in `db_path` up to the log's readable end, and report.

    `projections` defaults to the built-ins plus those registered with
    `register`; strings are `module:attribute` specs. `stm_client` is the
    STM Redis (bytes responses) and `shards` the deployment's shard count,
    which decides which shard applies each event. The run reads the
    watermarks and the log's last seq once, at the start, and returns when
    every projection has reached that end, has failed a batch, or
    `max_seconds` has passed (checked between batches). Running it again,
    or in two processes at once, applies each event once.
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} is invalid: use 1 or more")
    started = time.monotonic()
    chosen = resolve_projections(projections)
    active = {projection.name: projection for projection in chosen}
    progress = {name: _Progress(name) for name in active}

    conn = connect(db_path)
    try:
        with write_transaction(conn):
            create_core_tables(conn)
            for projection in chosen:
                projection.setup(conn)
        # A run that stopped before its scrub, or whose scrub a reader
        # blocked, left the request behind.
        scrub(conn, _SCRUB_TIMEOUT_S)

        watermarks = shard_watermarks(stm_client, shards)
        last_seq = event_log.last_seq()
        _check_not_ahead(read_checkpoints(conn, active), last_seq, db_path)
        end = last_seq
        reached_end = False
        consumed = 0
        while active:
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                break
            position = min(read_checkpoints(conn, active).values())
            if position >= end:
                reached_end = True
                break
            events = event_log.read(position, min(batch_size, end - position))
            _check_dense(events, position)
            readable = readable_count(events, watermarks)
            if readable < len(events):
                end = position + readable
                events = events[:readable]
            if not events:
                reached_end = True
                break
            items = _with_effects(effect_log, events, watermarks, position)
            _apply_batch(conn, active, progress, items)
            consumed += len(events)
        checkpoints = read_checkpoints(conn, progress)
    finally:
        conn.close()

    failed = [name for name, item in progress.items() if item.error is not None]
    report = ProjectionReport(
        events=consumed,
        seconds=time.monotonic() - started,
        last_seq=last_seq,
        watermarks=watermarks,
        readable_end=end,
        complete=reached_end and not failed,
        checkpoints=checkpoints,
        projections={name: item.result(checkpoints[name]) for name, item in progress.items()},
    )
    level = log.info if consumed or failed else log.debug
    level(
        "projection.run.completed",
        db=os.fspath(db_path),
        events=consumed,
        seconds=round(report.seconds, 3),
        readable_end=end,
        complete=report.complete,
        failed=failed,
        checkpoints=checkpoints,
    )
    return report


def follow_projections(
    db_path: str | os.PathLike[str],
    event_log: EventLog,
    effect_log: EffectLog,
    stm_client: redis.Redis,
    shards: int,
    projections: Sequence[Projection | str] | None = None,
    *,
    stop: threading.Event,
    poll_interval: float = 0.05,
    retry_interval: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> None:
    """Run the projections again and again until `stop` is set.

    After a run that found nothing new it waits `poll_interval` seconds, so
    the index trails the shards by about that much (what `Search` with
    `min_seq` waits for). After a failure it logs and waits
    `retry_interval` seconds.
    """
    chosen = resolve_projections(projections)
    failures = 0
    while not stop.is_set():
        try:
            report = run_projections(
                db_path, event_log, effect_log, stm_client, shards, chosen,
                max_seconds=None, batch_size=batch_size,
            )  # fmt: skip
        except (ProjectionError, sqlite3.Error, redis.RedisError) as error:
            failures += 1
            # Logs the 1st, 2nd, 4th, 8th, ... failure in a row, so an outage
            # that lasts does not flood the log.
            if failures & (failures - 1) == 0:
                log.error(
                    "projection.follow.failed",
                    db=os.fspath(db_path),
                    error=repr(error),
                    failures=failures,
                    next=f"retrying every {retry_interval} s",
                )
            stop.wait(retry_interval)
            continue
        if failures:
            log.info("projection.follow.recovered", db=os.fspath(db_path), failures=failures)
            failures = 0
        if any(result.error for result in report.projections.values()):
            stop.wait(retry_interval)
        elif report.events == 0:
            stop.wait(poll_interval)
