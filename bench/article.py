"""The reference article's benchmark shape: 1,000 writes, then 1,000 reads, per value size.

The article times a loop of 1,000 awaited stores and then 1,000 gets of
the same keys, for 1 KB, 10 KB and 100 KB values, and reports operations
per second. Here the tiermem side is the synchronous `Client`, with one
request in flight and each Store acknowledged after fsync. The baseline is
redis-py SET and GET on a bare redis-server with `appendfsync always`, so
both sides make every write durable before they reply.
"""

from __future__ import annotations

import time
from collections import Counter

import redis

from bench.context import BenchContext
from bench.drivers import text_value
from bench.result import ScenarioResult
from bus.client import Client
from events.types import Get, Store, Value
from tiermem.servers import RedisServer

__all__ = ["run_article"]


def _size_label(size: int) -> str:
    return f"{size // 1024} KB"


def _tiermem_pass(
    client: Client, namespace: str, keys: list[str], value: str, tally: Counter[str]
) -> tuple[float, float]:
    """Store `value` under every key, then read each back; return writes/s and reads/s.

    `tally` counts the tier that served each correct read, and "mismatch"
    for a read that returned no value or a different one.
    """
    started = time.perf_counter()
    for key in keys:
        client.request(Store(namespace=namespace, key=key, value=value))
    writes = len(keys) / (time.perf_counter() - started)

    started = time.perf_counter()
    for key in keys:
        reply = client.request(Get(namespace=namespace, key=key))
        if isinstance(reply, Value) and reply.value == value:
            tally[reply.tier] += 1
        else:
            tally["mismatch"] += 1
    return writes, len(keys) / (time.perf_counter() - started)


def _redis_pass(
    client: redis.Redis,
    namespace: str,
    keys: list[str],
    value: str,
    tally: Counter[str],
) -> tuple[float, float]:
    """SET `value` under every key, then GET each back; return writes/s and reads/s."""
    names = [f"{namespace}:{key}" for key in keys]
    started = time.perf_counter()
    for name in names:
        client.set(name, value)
    writes = len(names) / (time.perf_counter() - started)

    encoded = value.encode()
    started = time.perf_counter()
    for name in names:
        if client.get(name) != encoded:
            tally["mismatch"] += 1
    return writes, len(names) / (time.perf_counter() - started)


def run_article(context: BenchContext) -> ScenarioResult:
    plan = context.plan
    result = ScenarioResult(
        "article", "the article's shape", "ops/s", higher_is_better=True
    )
    result.settings = {
        "ops_per_size": plan.article_ops,
        "value_bytes": list(plan.article_sizes),
        "rounds": plan.article_rounds,
        "in_flight": 1,
        "redis_appendfsync": "always",
    }
    server = RedisServer(context.scratch / "article", role="log").start()
    redis_client = server.client()
    tallies: dict[str, Counter[str]] = {"tiermem": Counter(), "redis": Counter()}
    keys = [f"test_key_{index}" for index in range(plan.article_ops)]
    try:
        with Client(context.bus.endpoints, timeout=60) as client:
            for round_index in range(plan.article_rounds):
                for size in plan.article_sizes:
                    value = text_value(size, salt=round_index)
                    namespace = f"article-{size}"
                    label = _size_label(size)
                    order = (
                        ["tiermem", "redis"]
                        if round_index % 2 == 0
                        else ["redis", "tiermem"]
                    )
                    measured = {}
                    for system in order:
                        if system == "tiermem":
                            rates = _tiermem_pass(
                                client, namespace, keys, value, tallies[system]
                            )
                        else:
                            rates = _redis_pass(
                                redis_client, namespace, keys, value, tallies[system]
                            )
                        result.add(system, f"write {label}", rates[0])
                        result.add(system, f"read {label}", rates[1])
                        measured[system] = rates
                    context.say(
                        f"  article round {round_index + 1}/{plan.article_rounds}, {label}: "
                        f"tiermem {measured['tiermem'][0]:,.0f} writes/s and "
                        f"{measured['tiermem'][1]:,.0f} reads/s, redis "
                        f"{measured['redis'][0]:,.0f} and {measured['redis'][1]:,.0f}"
                    )
    finally:
        redis_client.close()
        server.stop()

    for system, tally in tallies.items():
        if tally.get("mismatch"):
            result.notes.append(
                f"{system}: {tally['mismatch']} reads returned no value or a different one"
            )
    result.settings["tiermem_reads_served_by"] = {
        tier: count for tier, count in tallies["tiermem"].items() if tier != "mismatch"
    }
    for size in plan.article_sizes:
        label = _size_label(size)
        result.ratio("tiermem", "redis", f"write {label}")
        result.ratio("tiermem", "redis", f"read {label}")
    return result
