"""The projection task: catch every projection up with the log, on queue `processing`.

Beat sends it every `projection_interval_s`; each run reads from the
projections' checkpoints, so a run delivered twice, or two runs at once,
apply each event once (the runner re-reads the checkpoint inside its write
transaction). One task covers many events, since a Celery task costs
about a millisecond and one per event would cap the index far below the
router's rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import redis
import structlog
from celery import Task

from events.log import RedisEventLog
from handlers.effects import RedisEffectLog
from replay.celery_app import PROJECTIONS_TASK, app
from replay.projections import run_projections
from tiers.redis_tier import client_from_url

__all__ = ["run"]

log = structlog.get_logger("tiermem.tasks.projections")


@app.task(bind=True, name=PROJECTIONS_TASK)
def run(self: Task, max_seconds: float | None = None) -> dict[str, Any]:
    """Apply the log's new events to every projection; return the report as a dict."""
    config = self.app.conf.tiermem_stack
    log_client = redis.Redis.from_url(config.log_url)
    stm_client = client_from_url(config.stm_url)
    try:
        report = run_projections(
            Path(config.projections_db),
            RedisEventLog(log_client, stream=config.log_stream),
            RedisEffectLog(log_client),
            stm_client,
            config.shards,
            max_seconds=max_seconds,
        )
    finally:
        log_client.close()
        stm_client.close()
    return msgspec.to_builtins(report)
