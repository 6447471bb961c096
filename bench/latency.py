"""Latency scenarios: Store acks, Gets per tier, and the high lane under a low-lane flood.

Every request is sent by the open-loop sender of `bench.paced` at a fixed
offered rate, and its latency is measured from its scheduled send time.
The pyzmq baseline is the same sender against the bare echo ROUTER; the
Redis baseline is a blocking redis-py client paced the same way.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from bench.context import BenchContext
from bench.drivers import flood_stores, text_value
from bench.paced import PacedResult, paced_redis, paced_zmq
from bench.result import ScenarioResult
from bench.stats import latency_percentiles
from bus.client import Client
from events.codec import MSGPACK, decode_reply, encode_request
from events.types import Busy, Get, Maintain, Status, Store, Value
from tiermem.servers import RedisServer

__all__ = ["ReadKeys", "run_ack_latency", "run_priority_isolation", "run_read_latency"]

TIERS = ("cache", "stm", "im", "ltm")
_TIER_LABELS = {"cache": "cache hit", "stm": "STM", "im": "IM", "ltm": "LTM"}
# Requests of the read mix, in order: every other one reads a hot (cached)
# key, and the others cycle through keys that should be in STM, IM and LTM.
_READ_PATTERN = ("hot", "stm", "hot", "im", "hot", "ltm")
_HOT_KEYS = 16
_PIPELINE_WINDOW = 1000
# Namespaces that the Stores of the ack scenario and of the flood spread
# over, so both shards get load.
_NAMESPACES = 64


def _dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(endpoint)
    # One round trip first, so connecting is not charged to the first request.
    sock.send(encode_request(Status(id="warm-up"), MSGPACK))
    if not sock.poll(30_000):
        sock.close(linger=0)
        raise TimeoutError(f"no reply from {endpoint} to a Status request within 30s")
    sock.recv()
    return sock


def _busy_retry(reply: Any) -> float | None:
    """Return the retry hint of a `Busy` in seconds; None for a final reply."""
    return reply.retry_after_ms / 1000 if isinstance(reply, Busy) else None


def _paced(
    endpoint: str, requests: Sequence[tuple[str, bytes]], rate: float
) -> PacedResult:
    """Run the open-loop sender; a `Busy` is resent after its hint, as `Client` does."""
    sock = _dealer(endpoint)
    try:
        return paced_zmq(sock, requests, rate, decode_reply, retry_after=_busy_retry)
    finally:
        sock.close(linger=0)


def _add_percentiles(
    result: ScenarioResult, system: str, seconds: Sequence[float]
) -> dict[str, float]:
    figures = latency_percentiles(seconds)
    for label, value in figures.items():
        result.add(system, label, value)
    return figures


def _tally(result: ScenarioResult, system: str, run: PacedResult) -> None:
    result.tally(system, "requests", len(run.latency))
    result.tally(system, "no reply within the drain time", run.missing)
    result.tally(system, "send failed", run.send_failures)
    result.tally(system, "Busy replies, resent after the hint", run.retries)


def _rotated(items: Sequence[Any], round_index: int) -> list[Any]:
    shift = round_index % len(items)
    return list(itertools.chain(items[shift:], items[:shift]))


def _rate_label(rate: int) -> str:
    return f"{rate // 1000}k/s" if rate % 1000 == 0 else f"{rate}/s"


# ----------------------------------------------------------- ack latency


def run_ack_latency(context: BenchContext) -> ScenarioResult:
    plan = context.plan
    result = ScenarioResult(
        "ack-latency", "Store ack latency", "ms", higher_is_better=False
    )
    result.settings = {
        "offered_rates_per_s": list(plan.ack_rates),
        "seconds_per_round": plan.latency_seconds,
        "rounds": plan.latency_rounds,
        "value_bytes": plan.value_bytes,
        "lane": "normal",
        "namespaces": _NAMESPACES,
    }
    stack = context.bus
    echo = context.echo
    value = text_value(plan.value_bytes)
    for rate in plan.ack_rates:
        count = int(rate * plan.latency_seconds)
        tiermem = f"tiermem Store, {_rate_label(rate)}"
        baseline = f"pyzmq round trip, {_rate_label(rate)}"
        for round_index in range(plan.latency_rounds):
            requests = []
            for index in range(count):
                request_id = f"ack-{rate}-{round_index}-{index}"
                store = Store(
                    id=request_id,
                    namespace=f"ack-{index % _NAMESPACES}",
                    key=f"k{round_index}-{index}",
                    value=value,
                )
                requests.append((request_id, encode_request(store, MSGPACK)))
            for system, endpoint in _rotated(
                [(tiermem, stack.endpoints["normal"]), (baseline, echo.endpoint)],
                round_index,
            ):
                run = _paced(endpoint, requests, rate)
                figures = _add_percentiles(result, system, run.answered)
                _tally(result, system, run)
                context.say(
                    f"  ack latency round {round_index + 1}/{plan.latency_rounds}: {system} "
                    f"p50 {figures['p50']:.3f} ms, p99 {figures['p99']:.3f} ms"
                )
        ratio = result.ratio(tiermem, baseline, "p99")
        result.ratio(tiermem, baseline, "p50")
        result.target(
            f"Store ack p99 / pyzmq round-trip p99 at {rate:,}/s",
            ratio,
            3.0,
            at_most=True,
        )
    return result


# ----------------------------------------------------------- read keys


@dataclass
class ReadKeys:
    """Keys stored for the read scenarios, by the tier maintenance should have put them in.

    `cursors` is where each tier's next read continues, so a round reads
    keys that the previous rounds have long pushed out of the cache again.
    """

    hot: list[tuple[str, str]]
    tiers: dict[str, list[tuple[str, str]]]
    records: dict[str, int]
    redis: RedisServer
    cursors: dict[str, int] = field(default_factory=dict)

    def take(self, tier: str) -> tuple[str, str]:
        keys = self.tiers[tier]
        position = self.cursors.get(tier, 0)
        self.cursors[tier] = position + 1
        return keys[position % len(keys)]


def _read_keys(context: BenchContext) -> ReadKeys:
    """Store the read keys on the bus stack once, run maintenance, and mirror them in Redis."""
    if context.read_keys is not None:
        return context.read_keys
    plan = context.plan
    per_tier = plan.read_keys_per_tier
    namespaces = [f"read-{index:03d}" for index in range(plan.read_namespaces)]
    keys = [f"k{index:02d}" for index in range(3 * per_tier)]
    stores = [
        Store(
            namespace=namespace,
            key=key,
            value=text_value(plan.value_bytes, salt=offset),
        )
        for namespace in namespaces
        for offset, key in enumerate(keys)
    ]
    context.say(
        f"storing {len(stores):,} read keys in {len(namespaces)} namespaces and running maintenance on each"
    )
    with Client(context.bus.endpoints, timeout=60) as client:
        replies = client.pipeline(stores, window=_PIPELINE_WINDOW)
        failed = [reply for reply in replies if type(reply).__name__ != "Ack"]
        if failed:
            raise RuntimeError(
                f"{len(failed)} of {len(stores)} read-key Stores were not acknowledged "
                f"(first reply: {failed[0]!r}); rerun with --data-dir to keep the router log"
            )
        client.pipeline(
            [Maintain(namespace=namespace) for namespace in namespaces],
            window=_PIPELINE_WINDOW,
        )
        digest = client.digest()
    records: Counter[str] = Counter()
    for item in digest.tiers:
        records[item.tier] += item.records
    # All keys of a namespace share importance and access history, and the
    # stores were sequenced in key order. Maintenance breaks such ties by the
    # older access time, then the smaller key, so it keeps the newest keys in
    # STM and moves the oldest furthest down. Each read is classified by the
    # tier its reply names, so this expectation only steers the mix.
    tiers = {
        "ltm": [
            (namespace, keys[index])
            for index in range(per_tier)
            for namespace in namespaces
        ],
        "im": [
            (namespace, keys[per_tier + index])
            for index in range(per_tier)
            for namespace in namespaces
        ],
        "stm": [
            (namespace, keys[2 * per_tier + index])
            for index in range(per_tier)
            for namespace in namespaces
        ],
    }
    hot = [(namespace, keys[-1]) for namespace in namespaces[:_HOT_KEYS]]

    server = RedisServer(context.scratch / "get", role="stm").start()
    client = server.client()
    pipe = client.pipeline(transaction=False)
    for store in stores:
        pipe.set(f"{store.namespace}:{store.key}", store.value)
    pipe.execute()
    client.close()
    context.read_keys = ReadKeys(
        hot=hot, tiers=tiers, records=dict(records), redis=server
    )
    return context.read_keys


def _read_mix(keys: ReadKeys, count: int) -> list[tuple[str, str]]:
    hot = itertools.cycle(keys.hot)
    return [
        next(hot) if kind == "hot" else keys.take(kind)
        for kind, _ in zip(itertools.cycle(_READ_PATTERN), range(count))
    ]


def _get_requests(
    prefix: str, keys: Sequence[tuple[str, str]]
) -> list[tuple[str, bytes]]:
    requests = []
    for index, (namespace, key) in enumerate(keys):
        request_id = f"{prefix}-{index}"
        requests.append(
            (
                request_id,
                encode_request(
                    Get(id=request_id, namespace=namespace, key=key), MSGPACK
                ),
            )
        )
    return requests


def _by_tier(run: PacedResult) -> tuple[dict[str, list[float]], Counter[str]]:
    latencies: dict[str, list[float]] = {tier: [] for tier in TIERS}
    served: Counter[str] = Counter()
    for latency, reply in zip(run.latency, run.replies, strict=True):
        if reply is None:
            continue
        if isinstance(reply, Value) and reply.tier in latencies:
            latencies[reply.tier].append(latency)
            served[reply.tier] += 1
        else:
            served[type(reply).__name__] += 1
    return latencies, served


# ----------------------------------------------------------- read latency


def _read_round_tiermem(
    context: BenchContext, result: ScenarioResult, requests: Sequence[tuple[str, bytes]]
) -> Counter[str]:
    """Run one tiermem round of the read mix; return how many replies each tier served."""
    with context.profiled("read-latency", context.bus_pids):
        run = _paced(context.bus.endpoints["normal"], requests, context.plan.read_rate)
    latencies, served = _by_tier(run)
    for tier in TIERS:
        _add_percentiles(result, f"tiermem Get, {_TIER_LABELS[tier]}", latencies[tier])
    _tally(result, "tiermem Get", run)
    return served


def run_read_latency(context: BenchContext) -> ScenarioResult:
    plan = context.plan
    result = ScenarioResult(
        "read-latency", "Get latency per tier", "ms", higher_is_better=False
    )
    keys = _read_keys(context)
    count = int(plan.read_rate * plan.latency_seconds)
    result.settings = {
        "offered_rate_per_s": plan.read_rate,
        "seconds_per_round": plan.latency_seconds,
        "rounds": plan.latency_rounds,
        "value_bytes": plan.value_bytes,
        "mix": "every other Get reads one of 16 hot keys; the rest cycle through STM, IM and LTM keys",
        "policy": {
            "cache_capacity": plan.read_cache_capacity,
            "stm_capacity": plan.read_keys_per_tier,
            "im_capacity": plan.read_keys_per_tier,
        },
        "records_per_tier_after_setup": keys.records,
        "lane": "normal",
    }
    redis_client = keys.redis.client()
    served_total: Counter[str] = Counter()
    try:
        for round_index in range(plan.latency_rounds):
            mix = _read_mix(keys, count)
            requests = _get_requests(f"read-{round_index}", mix)
            for system in _rotated(["tiermem", "pyzmq", "redis"], round_index):
                if system == "tiermem":
                    served = _read_round_tiermem(context, result, requests)
                    served_total.update(served)
                    summary = ", ".join(
                        f"{tier} {served.get(tier, 0)}" for tier in TIERS
                    )
                    context.say(
                        f"  read latency round {round_index + 1}/{plan.latency_rounds}: "
                        f"tiermem served {summary}"
                    )
                elif system == "pyzmq":
                    run = _paced(context.echo.endpoint, requests, plan.read_rate)
                    _add_percentiles(result, "pyzmq round trip", run.answered)
                    _tally(result, "pyzmq round trip", run)
                else:
                    names = [f"{namespace}:{key}" for namespace, key in mix]
                    run = paced_redis(
                        lambda index, names=names: redis_client.get(names[index]),
                        count,
                        plan.read_rate,
                    )
                    _add_percentiles(result, "redis GET", run.answered)
    finally:
        redis_client.close()

    result.settings["served_by_tier"] = dict(served_total)
    cache = "tiermem Get, cache hit"
    for tier in TIERS:
        result.ratio(f"tiermem Get, {_TIER_LABELS[tier]}", "pyzmq round trip", "p99")
    result.ratio(cache, "redis GET", "p99")
    result.target(
        f"Get p99 for a cache hit at {plan.read_rate:,} requests/s, ms",
        result.median(cache, "p99"),
        2.0,
        at_most=True,
    )
    return result


# ----------------------------------------------------------- priority isolation


# Seconds the flood runs before the probe starts, so the low lane is full,
# and after the probe ends, so it stays full until the last probe reply.
_FLOOD_LEAD_S = 1.0
_FLOOD_TAIL_S = 0.5


def _probe_under_flood(
    context: BenchContext, requests: Sequence[tuple[str, bytes]]
) -> tuple[PacedResult, dict[str, Any]]:
    """Run the high-lane probe while a worker floods the low lane; return both outcomes."""
    plan = context.plan
    stack = context.bus
    start_at = time.monotonic() + 0.2
    future = context.workers.submit(
        flood_stores,
        endpoints=stack.endpoints,
        lane="low",
        namespace_prefix="flood-",
        namespaces=_NAMESPACES,
        value_bytes=plan.value_bytes,
        window=plan.isolation_window,
        start_at=start_at,
        until=start_at + _FLOOD_LEAD_S + plan.latency_seconds + _FLOOD_TAIL_S,
    )
    time.sleep(max(0.0, start_at + _FLOOD_LEAD_S - time.monotonic()))
    run = _paced(stack.endpoints["high"], requests, plan.isolation_rate)
    return run, future.result()


def run_priority_isolation(context: BenchContext) -> ScenarioResult:
    plan = context.plan
    result = ScenarioResult(
        "priority-isolation",
        "high lane under a low-lane flood",
        "ms",
        higher_is_better=False,
    )
    keys = _read_keys(context)
    count = int(plan.isolation_rate * plan.latency_seconds)
    result.settings = {
        "probe": f"Gets of {len(keys.hot)} hot keys on the high lane at {plan.isolation_rate}/s",
        "flood": (
            f"one client process streaming {plan.value_bytes}-byte Stores over {_NAMESPACES} namespaces "
            f"on the low lane, window {plan.isolation_window}"
        ),
        "seconds_per_round": plan.latency_seconds,
        "rounds": plan.latency_rounds,
    }
    quiet = "high lane, no flood"
    flooded = "high lane, low lane flooded"
    flood_rates: list[float] = []
    flood_replies: Counter[str] = Counter()
    probe_tiers: dict[str, Counter[str]] = {quiet: Counter(), flooded: Counter()}
    hot = itertools.cycle(keys.hot)

    for round_index in range(plan.latency_rounds):
        for flood in _rotated([False, True], round_index):
            system = flooded if flood else quiet
            requests = _get_requests(
                f"iso-{round_index}-{int(flood)}", [next(hot) for _ in range(count)]
            )
            if flood:
                run, outcome = _probe_under_flood(context, requests)
            else:
                run, outcome = (
                    _paced(
                        context.bus.endpoints["high"], requests, plan.isolation_rate
                    ),
                    None,
                )

            _, served = _by_tier(run)
            probe_tiers[system].update(served)
            figures = _add_percentiles(result, system, run.answered)
            _tally(result, system, run)
            line = f"  priority isolation round {round_index + 1}/{plan.latency_rounds}: {system} p99 {figures['p99']:.3f} ms"
            if outcome is not None:
                flood_replies.update(outcome["replies"])
                rate = outcome["replies"].get("Ack", 0) / (
                    outcome["finished"] - outcome["started"]
                )
                flood_rates.append(rate)
                line += f", flood acknowledged {rate:,.0f} events/s"
            context.say(line)

    result.settings["flood_acked_per_s"] = [round(rate) for rate in flood_rates]
    result.settings["flood_replies"] = dict(flood_replies)
    result.settings["probe_served_by"] = {
        system: dict(counts) for system, counts in probe_tiers.items()
    }
    ratio = result.ratio(flooded, quiet, "p99")
    result.ratio(flooded, quiet, "p50")
    result.target(
        "high-lane Get p99 under a low-lane flood / unloaded", ratio, 1.5, at_most=True
    )
    return result
