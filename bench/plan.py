"""How much each scenario runs: the full suite and the `--quick` one.

Sizes are chosen so that `--quick` finishes in a few minutes on a 2-core
machine while each latency figure still rests on hundreds of samples per
round. The full suite runs longer rounds, more of them, and a log of 1M
events.
"""

from __future__ import annotations

import msgspec

__all__ = ["FULL", "QUICK", "Plan"]


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """Sizes of every scenario; counts are per round unless stated."""

    name: str = "full"
    shards: int = 2
    # Client processes that drive the pipelined scenarios together.
    workers: int = 2

    ingest_rounds: int = 5
    ingest_events: int = 100_000  # over all workers
    ingest_window: int = 1000  # per worker
    value_bytes: int = 1024

    latency_rounds: int = 5
    latency_seconds: float = 10.0
    ack_rates: tuple[int, ...] = (1000, 5000)
    read_rate: int = 1000

    # Read keys: per namespace, this many records in each of STM, IM and LTM.
    read_namespaces: int = 100
    read_keys_per_tier: int = 20
    read_cache_capacity: int = 64

    isolation_rate: int = 200
    isolation_window: int = 2000

    article_rounds: int = 5
    article_ops: int = 1000
    article_sizes: tuple[int, ...] = (1024, 10 * 1024, 100 * 1024)

    history_events: int = 1_000_000
    history_namespaces: int = 1000
    history_value_bytes: int = 256
    history_get_every: int = 10
    history_window: int = 1000
    replay_rounds: int = 3
    recovery_rounds: int = 3


FULL = Plan()

QUICK = msgspec.structs.replace(
    FULL,
    name="quick",
    ingest_rounds=3,
    ingest_events=20_000,
    latency_rounds=3,
    latency_seconds=3.0,
    article_rounds=3,
    history_events=100_000,
    replay_rounds=3,
    recovery_rounds=3,
)
