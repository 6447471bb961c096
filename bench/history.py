"""The long log that replay and recovery start from, built through the real bus.

Every worker streams its share of the events through `Client.stream`, so
the tiers hold exactly what the log defines when the scenarios begin:
Stores of unique keys over many namespaces, and a Get after every nine
Stores (`Plan.history_get_every`).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.context import BenchContext
from bench.drivers import build_log
from events.log import RedisEventLog

__all__ = ["History", "aof_bytes", "history"]


@dataclass
class History:
    """The contents of the history stack's log once it is built."""

    last_seq: int
    events: int  # events in the log, without requests still Busy after every resend
    seconds: float
    replies: dict[str, int]  # final replies by type
    aof_bytes: int

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def aof_bytes(redis_dir: Path) -> int:
    """Return the size of a redis-server's append-only files under its `--dir`."""
    return sum(
        path.stat().st_size
        for path in (redis_dir / "appendonlydir").glob("*")
        if path.is_file()
    )


def event_log(context: BenchContext) -> RedisEventLog:
    config = context.history_stack.config
    return RedisEventLog(
        redis.Redis.from_url(config.log_url or ""), stream=config.log_stream
    )


def _send_log(context: BenchContext) -> tuple[float, Counter[str]]:
    """Send every event of the log from the workers; return the seconds and final replies."""
    plan = context.plan
    start_at = time.monotonic() + 0.3
    calls = [
        (
            build_log,
            {
                "endpoints": context.history_stack.endpoints,
                "worker": worker,
                "workers": plan.workers,
                "count": plan.history_events,
                "namespaces": plan.history_namespaces,
                "value_bytes": plan.history_value_bytes,
                "get_every": plan.history_get_every,
                "window": plan.history_window,
                "start_at": start_at,
            },
        )
        for worker in range(plan.workers)
    ]
    results = context.workers.run_together(calls)
    replies: Counter[str] = Counter()
    for item in results:
        replies.update(item["replies"])
    started = min(item["started"] for item in results)
    return max(item["finished"] for item in results) - started, replies


def history(context: BenchContext) -> History:
    """Build the history stack's log once per run; return what it contains."""
    if context.history is not None:
        return context.history
    plan = context.plan
    stack = context.history_stack
    context.say(
        f"logging {plan.history_events:,} events ({plan.history_value_bytes}-byte values, "
        f"{plan.history_namespaces:,} namespaces) through the history stack"
    )
    seconds, replies = _send_log(context)

    log = event_log(context)
    last_seq = log.last_seq()
    log.client.close()
    built = History(
        last_seq=last_seq,
        events=last_seq,
        seconds=seconds,
        replies=dict(replies),
        aof_bytes=aof_bytes(stack.redis["log"].data_dir),
    )
    context.say(
        f"logged {built.events:,} events in {built.seconds:.1f}s "
        f"({built.events_per_s:,.0f} events/s); last seq {built.last_seq:,}, "
        f"log AOF {built.aof_bytes / 2**20:,.0f} MiB"
    )
    unlogged = sum(
        count
        for kind, count in replies.items()
        if kind not in ("Ack", "Value", "NotFound")
    )
    if unlogged:
        context.say(
            f"warning: {unlogged:,} requests were not logged; final replies by type: {dict(replies)}"
        )
    context.history = built
    return built
