"""The projection protocol, and pipelines: projections built from ordered stages.

A projection is a read model kept in the projection database. The runner
hands it batches of logged events, each with the effects shards recorded for
it, inside the transaction that also advances the projection's checkpoint.
A `Pipeline` is a projection made of stages that each see every event in
order, and each have their own error policy and timings.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, Protocol, runtime_checkable

import msgspec
import structlog

from events.types import Event
from handlers.effects import Effect
from replay.projections.db import create_core_tables
from replay.projections.errors import ProjectionError

__all__ = [
    "EventWithEffects",
    "OnError",
    "Pipeline",
    "Projection",
    "Stage",
    "StageReport",
    "check_name",
]

log = structlog.get_logger("tiermem.projections")

_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")


class EventWithEffects(NamedTuple):
    """One logged event and the effects that applying it had, in shard order."""

    event: Event
    effects: tuple[Effect, ...]

    @property
    def seq(self) -> int:
        return self.event.seq or 0

    @property
    def ts(self) -> int:
        return self.event.ts or 0

    @property
    def conflicted(self) -> bool:
        """Whether the event was a conditional write that its shard rejected.

        A `Store` or `Forget` with a stale `expected_version` changes
        nothing, and its shard records a `conflict` effect instead.
        """
        return any(effect.kind == "conflict" for effect in self.effects)


class StageReport(msgspec.Struct, frozen=True, kw_only=True):
    """The work of one stage in one run: events seen, events skipped, seconds spent."""

    name: str
    events: int
    skipped: int
    seconds: float


@runtime_checkable
class Projection(Protocol):
    """A read model built from the log.

    `name` is its checkpoint key: lowercase letters, digits and underscores,
    starting with a letter. `setup` creates its tables if they are missing.
    `apply` writes the effect of a batch, in seq order, on the connection,
    inside the runner's transaction. It must not commit, roll back or open
    a transaction. It raises to fail the batch, which leaves the
    projection's tables and checkpoint as they were.
    """

    name: str

    def setup(self, conn: sqlite3.Connection) -> None: ...

    def apply(
        self, conn: sqlite3.Connection, batch: Sequence[EventWithEffects]
    ) -> list[StageReport] | None:
        """Apply the batch; return a report per stage, or None without stages."""
        ...


def check_name(name: str, kind: str = "projection") -> str:
    """Return `name` if it is a valid projection or stage name, else raise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ProjectionError(
            f"{kind} name {name!r} is invalid: use 1 to 63 lowercase letters, "
            "digits and underscores, starting with a letter"
        )
    return name


class OnError(StrEnum):
    """The policy of a pipeline stage for an exception it raises on an event."""

    FAIL = "fail"
    """Fail the batch: the projection's writes and checkpoint roll back, and
    the next run retries from the checkpoint."""

    SKIP = "skip"
    """Undo the stage's writes for this event, record the event in
    `projection_skips`, and go on with the next stage and event."""


StageFunction = Callable[[sqlite3.Connection, EventWithEffects], None]
SetupFunction = Callable[[sqlite3.Connection], None]
FinishFunction = Callable[[sqlite3.Connection, Sequence[EventWithEffects]], None]


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline: a function applied to every event, in seq order."""

    name: str
    apply: StageFunction
    setup: SetupFunction | None = None
    on_error: OnError = OnError.FAIL


class _StageCounters:
    __slots__ = ("events", "skipped", "seconds")

    def __init__(self) -> None:
        self.events = 0
        self.skipped = 0
        self.seconds = 0.0


class Pipeline:
    """A projection made of stages, which every event goes through in order.

    Stages run event by event, so stage 2 reads stage 1's writes for an
    event. Each stage has its own `OnError` policy, and an event that one
    stage skipped still goes through the later stages. Timings are per
    stage, per `apply` call. `finish`, when given, runs once per batch
    after the stages, in the same transaction, for work that is cheaper
    per batch than per event, such as merging an index. An exception from
    it fails the batch.
    """

    def __init__(
        self,
        name: str,
        stages: Sequence[Stage],
        *,
        finish: FinishFunction | None = None,
    ) -> None:
        self.name = check_name(name)
        if not stages:
            raise ProjectionError(f"pipeline {name!r} has no stages: give it at least one")
        seen: set[str] = set()
        for stage in stages:
            check_name(stage.name, "stage")
            if stage.name in seen:
                raise ProjectionError(
                    f"pipeline {name!r} has two stages named {stage.name!r}: "
                    "stage names must be unique, because reports and skips use them"
                )
            seen.add(stage.name)
            OnError(stage.on_error)
        self.stages = tuple(stages)
        self.finish = finish

    def __repr__(self) -> str:
        names = ", ".join(stage.name for stage in self.stages)
        return f"Pipeline({self.name!r}, stages=[{names}])"

    def setup(self, conn: sqlite3.Connection) -> None:
        create_core_tables(conn)
        for stage in self.stages:
            if stage.setup is not None:
                stage.setup(conn)

    def apply(
        self, conn: sqlite3.Connection, batch: Sequence[EventWithEffects]
    ) -> list[StageReport]:
        counters = [_StageCounters() for _ in self.stages]
        for item in batch:
            for stage, counter in zip(self.stages, counters, strict=True):
                started = time.perf_counter()
                if stage.on_error == OnError.SKIP:
                    self._apply_or_skip(conn, stage, item, counter)
                else:
                    stage.apply(conn, item)
                counter.events += 1
                counter.seconds += time.perf_counter() - started
        if self.finish is not None and batch:
            self.finish(conn, batch)
        return [
            StageReport(
                name=stage.name,
                events=counter.events,
                skipped=counter.skipped,
                seconds=counter.seconds,
            )
            for stage, counter in zip(self.stages, counters, strict=True)
        ]

    def _apply_or_skip(
        self,
        conn: sqlite3.Connection,
        stage: Stage,
        item: EventWithEffects,
        counter: _StageCounters,
    ) -> None:
        # A savepoint per event, so a failure undoes only this stage's
        # writes for this event and keeps the rest of the batch.
        conn.execute("SAVEPOINT pipeline_stage")
        try:
            stage.apply(conn, item)
        except Exception as error:  # noqa: BLE001 - the SKIP policy catches whatever the stage raises
            if not conn.in_transaction:
                # SQLite rolled the whole transaction back (disk full, for
                # example), so there is nothing left to skip within.
                raise
            conn.execute("ROLLBACK TO pipeline_stage")
            conn.execute("RELEASE pipeline_stage")
            self._record_skip(conn, stage, item, error)
            counter.skipped += 1
            if counter.skipped == 1:
                log.warning(
                    "projection.stage.skipped",
                    projection=self.name,
                    stage=stage.name,
                    seq=item.seq,
                    error=repr(error),
                    next="recorded in projection_skips; later skips of this batch are only counted",
                )
            return
        conn.execute("RELEASE pipeline_stage")

    def _record_skip(
        self,
        conn: sqlite3.Connection,
        stage: Stage,
        item: EventWithEffects,
        error: Exception,
    ) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO projection_skips (projection, stage, seq, error) "
            "VALUES (?, ?, ?, ?)",
            (self.name, stage.name, item.seq, repr(error)),
        )
