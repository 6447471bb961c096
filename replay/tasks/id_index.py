"""The id index trim: remove expired ids from the log's id index, on queue `maintenance`.

The router detects a retried event id by looking it up in the log's id
index (`RedisEventLog.lookup`), which would otherwise grow by one entry per
event forever. Beat sends `tiermem.maintenance.trim_ids` every
`ids_trim_interval_s`. Each run removes the ids of the events ingested more
than `ids_retention_s` before the run started. A retry within
`ids_retention_s` of the first append still gets the original Ack with
`"duplicate": true`, and a later one may be logged as a new event.

A run is idempotent: with the same clock it finds the same cutoff, and a
second run removes nothing more. Two runs at the same time are safe too,
because `RedisEventLog.trim_ids` checks each entry again in the script that
deletes it.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import redis
import structlog
from celery import Task

from events.errors import TiermemError
from events.log import RedisEventLog
from replay.celery_app import TRIM_IDS_TASK, app
from replay.engine import seq_at_time

__all__ = ["IdTrimReport", "cutoff_seq", "trim_expired_ids", "trim_ids"]

log = structlog.get_logger("tiermem.tasks.id_index")


class IdTrimReport(msgspec.Struct, kw_only=True):
    """The outcome of one trim run.

    `cutoff_ms` is the ingest time (Unix ms) below which ids were removed,
    and `cutoff_seq` the first seq at or after it, so entries with a lower
    seq were removed. Both are None when `ids_retention_s` is 0 and the run
    removed nothing.
    """

    enabled: bool
    retention_s: float
    cutoff_ms: int | None = None
    cutoff_seq: int | None = None
    removed: int = 0
    seconds: float = 0.0


def cutoff_seq(event_log: RedisEventLog, cutoff_ms: int) -> int:
    """Return the first seq whose ingest time is at or after `cutoff_ms`.

    Returns the log's last seq plus one when every event is older, and 1
    for an empty log. `seq_at_time` returns the last seq with `ts <= T`,
    and ingest times are whole milliseconds, so the last seq before
    `cutoff_ms` is `seq_at_time(cutoff_ms - 1)`.
    """
    return seq_at_time(event_log, cutoff_ms - 1) + 1


def trim_expired_ids(config: Any, *, now_ms: int) -> IdTrimReport:
    """Remove the ids older than `config.ids_retention_s` at `now_ms` from the id index.

    `config` is a `StackConfig`. Logs `ids.trimmed`, or
    `ids.trim.disabled` when `ids_retention_s` is 0.
    """
    retention_s = config.ids_retention_s
    if retention_s == 0:
        log.info("ids.trim.disabled", ids_retention_s=0, next="keeping every event id")
        return IdTrimReport(enabled=False, retention_s=retention_s)
    if not config.log_url:
        raise TiermemError(
            "log_url is not set in the stack config, so the id index cannot be "
            "trimmed: set log_url to the URL of the log Redis"
        )
    started = time.monotonic()
    cutoff_ms = now_ms - round(retention_s * 1000)
    client = redis.Redis.from_url(config.log_url)
    try:
        event_log = RedisEventLog(client, stream=config.log_stream)
        first_kept = cutoff_seq(event_log, cutoff_ms)
        removed = event_log.trim_ids(first_kept)
    finally:
        client.close()
    report = IdTrimReport(
        enabled=True,
        retention_s=retention_s,
        cutoff_ms=cutoff_ms,
        cutoff_seq=first_kept,
        removed=removed,
        seconds=round(time.monotonic() - started, 3),
    )
    log.info(
        "ids.trimmed",
        cutoff_seq=first_kept,
        cutoff_ms=cutoff_ms,
        removed=removed,
        ids_retention_s=retention_s,
        seconds=report.seconds,
    )
    return report


@app.task(bind=True, name=TRIM_IDS_TASK)
def trim_ids(self: Task) -> dict[str, Any]:
    """Run one id index trim at the current time; return its report as a dict."""
    now_ms = int(time.time() * 1000)
    report = trim_expired_ids(self.app.conf.tiermem_stack, now_ms=now_ms)
    return msgspec.to_builtins(report)
