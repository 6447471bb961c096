"""Durable ingest: Stores acknowledged after fsync, against a bare echo and bare XADD.

Per round, in an order that rotates from round to round:

- tiermem: every worker streams 1 KiB Stores through `Client.stream` with a
  window, on the normal lane. An Ack means the event is fsynced in the log.
- pyzmq echo, tiermem Client: the same client code against the bare echo
  ROUTER, which decodes each request with msgspec and replies with an Ack.
- pyzmq echo, bare DEALER: pre-encoded frames on a plain DEALER with the
  same window, replies decoded with msgspec; the transport's ceiling.
- redis XADD: the same number of 1 KiB entries to a bare redis-server with
  `appendfsync always`, in pipelines of 1,000 (one fsync per pipeline).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import Any

from bench.context import BenchContext
from bench.cputime import CpuMeter
from bench.drivers import bare_dealer, stream_stores, text_value
from bench.result import ScenarioResult
from tiermem.servers import RedisServer

__all__ = ["run_durable_ingest"]

XADD_BATCH = 1000
# Namespaces each client spreads its Stores over, so both shards get load.
NAMESPACES = 64
_START_DELAY_S = 0.3

TIERMEM = "tiermem"
ECHO_CLIENT = "pyzmq echo, tiermem Client"
ECHO_BARE = "pyzmq echo, bare DEALER"
XADD = "redis XADD"


def _rate(results: list[dict[str, Any]], replies: Counter[str]) -> float:
    """Return acknowledged events per second over the span of all drivers."""
    for item in results:
        replies.update(item["replies"])
    acked = sum(item["replies"].get("Ack", 0) for item in results)
    span = max(item["finished"] for item in results) - min(
        item["started"] for item in results
    )
    return acked / span if span > 0 else 0.0


def _xadd_rate(
    server: RedisServer, count: int, value_bytes: int, round_index: int
) -> float:
    client = server.client()
    value = text_value(value_bytes).encode()
    stream = f"bench:xadd:{round_index}"
    try:
        started = time.monotonic()
        for first in range(0, count, XADD_BATCH):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(XADD_BATCH, count - first)):
                pipe.xadd(stream, {b"e": value})
            pipe.execute()
        seconds = time.monotonic() - started
        # Free the memory for the next round; the deletion is not timed.
        client.delete(stream)
    finally:
        client.close()
    return count / seconds


def _tiermem_pids(context: BenchContext) -> dict[str, int]:
    """Return the pids whose CPU time a tiermem round spends: stack, servers, clients."""
    pids = dict(context.bus_pids())
    for role, server in context.bus.redis.items():
        if server.pid is not None:
            pids[f"redis-{role}"] = server.pid
    for index, pid in enumerate(context.workers.pids):
        pids[f"client-{index}"] = pid
    return pids


def run_durable_ingest(context: BenchContext) -> ScenarioResult:
    plan = context.plan
    result = ScenarioResult(
        "durable-ingest", "durable ingest", "events/s", higher_is_better=True
    )
    per_worker = plan.ingest_events // plan.workers
    total = per_worker * plan.workers
    result.settings = {
        "events_per_round": total,
        "rounds": plan.ingest_rounds,
        "client_processes": plan.workers,
        "window_per_client": plan.ingest_window,
        "value_bytes": plan.value_bytes,
        "namespaces_per_client": NAMESPACES,
        "xadd_batch": XADD_BATCH,
        "shards": plan.shards,
    }
    stack = context.bus
    echo = context.echo
    workers = context.workers
    xadd_server = RedisServer(context.scratch / "xadd", role="log").start()
    meter = CpuMeter()
    replies: dict[str, Counter[str]] = {
        TIERMEM: Counter(),
        ECHO_CLIENT: Counter(),
        ECHO_BARE: Counter(),
    }

    def tiermem_round(round_index: int) -> float:
        calls = [
            (
                stream_stores,
                {
                    "endpoints": stack.endpoints,
                    "lane": "normal",
                    "namespace_prefix": f"ingest-{worker}-",
                    "namespaces": NAMESPACES,
                    "key_prefix": f"r{round_index}-",
                    "count": per_worker,
                    "value_bytes": plan.value_bytes,
                    "window": plan.ingest_window,
                    "start_at": time.monotonic() + _START_DELAY_S,
                },
            )
            for worker in range(plan.workers)
        ]
        meter.start(_tiermem_pids(context))
        with context.profiled("durable-ingest", context.bus_pids):
            rate = _rate(workers.run_together(calls), replies[TIERMEM])
        meter.stop()
        return rate

    def echo_client_round(round_index: int) -> float:
        calls = [
            (
                stream_stores,
                {
                    "endpoints": {"normal": echo.endpoint},
                    "lane": "normal",
                    "namespace_prefix": "echo-",
                    "namespaces": NAMESPACES,
                    "key_prefix": f"r{round_index}-",
                    "count": per_worker,
                    "value_bytes": plan.value_bytes,
                    "window": plan.ingest_window,
                    "start_at": time.monotonic() + _START_DELAY_S,
                },
            )
            for _ in range(plan.workers)
        ]
        return _rate(workers.run_together(calls), replies[ECHO_CLIENT])

    def echo_bare_round(round_index: int) -> float:
        calls = [
            (
                bare_dealer,
                {
                    "endpoint": echo.endpoint,
                    "count": per_worker,
                    "value_bytes": plan.value_bytes,
                    "window": plan.ingest_window,
                    # Encoding the frames takes a moment before the clock starts.
                    "start_at": time.monotonic() + _START_DELAY_S + per_worker / 50_000,
                },
            )
            for _ in range(plan.workers)
        ]
        return _rate(workers.run_together(calls), replies[ECHO_BARE])

    systems = [
        (TIERMEM, tiermem_round),
        (ECHO_CLIENT, echo_client_round),
        (ECHO_BARE, echo_bare_round),
        (
            XADD,
            lambda round_index: _xadd_rate(
                xadd_server, total, plan.value_bytes, round_index
            ),
        ),
    ]
    try:
        for round_index in range(plan.ingest_rounds):
            # Rotate the order, so no system always runs first after a pause.
            shift = round_index % len(systems)
            for name, measure in itertools.chain(systems[shift:], systems[:shift]):
                rate = measure(round_index)
                result.add(name, "events/s", rate)
                context.say(
                    f"  durable ingest round {round_index + 1}/{plan.ingest_rounds}: {name} {rate:,.0f} events/s"
                )
    finally:
        xadd_server.stop()

    acked = replies[TIERMEM].get("Ack", 0)
    result.settings["tiermem_cpu_us_per_event"] = meter.per_event_us(acked)
    for name, counts in replies.items():
        unexpected = {kind: number for kind, number in counts.items() if kind != "Ack"}
        if unexpected:
            result.notes.append(
                f"{name}: replies other than Ack over all rounds: {unexpected}"
            )
    echo_ratio = result.ratio(TIERMEM, ECHO_BARE, "events/s")
    result.ratio(TIERMEM, ECHO_CLIENT, "events/s")
    result.ratio(TIERMEM, XADD, "events/s")
    result.target(
        "durable ingest events/s",
        result.median(TIERMEM, "events/s"),
        50_000,
        at_most=False,
    )
    result.target("durable ingest / bare pyzmq echo", echo_ratio, 0.5, at_most=False)
    return result
