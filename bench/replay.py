"""Replay: rebuild every tier from the log, against the `eventsourcing` library.

tiermem's side is `replay.rebuild.rebuild`: it reads the history log from
its Redis in batches, applies every event with the same `Shard` code as the
live actors to in-memory tiers, and digests them. The baseline records the
same Stores and Gets with `eventsourcing` (SQLite) once, untimed, and each
round loads every namespace's aggregate from it.
"""

from __future__ import annotations

import os
import time

from bench import eventsourcing_baseline
from bench.context import BenchContext
from bench.history import event_log, history
from bench.result import ScenarioResult
from bus.client import Client
from replay.rebuild import compare_digests, rebuild

__all__ = ["run_replay"]

TIERMEM = "tiermem rebuild"
EVENTSOURCING = "eventsourcing (SQLite)"


def run_replay(context: BenchContext) -> ScenarioResult:
    plan = context.plan
    result = ScenarioResult(
        "replay", "replay from the log", "events/s", higher_is_better=True
    )
    built = history(context)
    stack = context.history_stack
    log = event_log(context)
    with Client(stack.endpoints, timeout=300) as client:
        live = client.digest()

    database = context.scratch / "eventsourcing.sqlite"
    database.unlink(missing_ok=True)
    context.say(
        f"recording the same {built.last_seq:,} events with eventsourcing (untimed)"
    )
    filled = eventsourcing_baseline.fill(database, log.iter_from(0, built.last_seq))
    result.settings = {
        "events": built.last_seq,
        "rounds": plan.replay_rounds,
        "shards": plan.shards,
        "value_bytes": plan.history_value_bytes,
        "namespaces": plan.history_namespaces,
        "history_final_replies": built.replies,
        "eventsourcing_fill_events_per_s": round(filled["events"] / filled["seconds"]),
        "eventsourcing_database_bytes": database.stat().st_size,
    }
    try:
        for round_index in range(plan.replay_rounds):
            order = (
                ["tiermem", "eventsourcing"]
                if round_index % 2 == 0
                else ["eventsourcing", "tiermem"]
            )
            for system in order:
                if system == "tiermem":
                    with context.profiled("replay", lambda: {"bench": os.getpid()}):
                        started = time.monotonic()
                        rebuilt = rebuild(
                            log,
                            shards=plan.shards,
                            policy=stack.config.policy,
                            until_seq=live.seq,
                        )
                        rate = rebuilt.events / (time.monotonic() - started)
                    result.add(TIERMEM, "events/s", rate)
                    mismatches = compare_digests(live.tiers, rebuilt.digests)
                    if mismatches:
                        result.notes.append(
                            f"round {round_index + 1}: the rebuild differs from live state in {len(mismatches)} shard tiers"
                        )
                    context.say(
                        f"  replay round {round_index + 1}/{plan.replay_rounds}: {TIERMEM} {rate:,.0f} events/s, digests {'match' if not mismatches else 'DIFFER'}"
                    )
                else:
                    loaded = eventsourcing_baseline.rebuild_all(
                        database, filled["namespaces"]
                    )
                    rate = filled["events"] / loaded["seconds"]
                    result.add(EVENTSOURCING, "events/s", rate)
                    if loaded["keys"] != filled["keys"]:
                        result.notes.append(
                            f"round {round_index + 1}: eventsourcing rebuilt {loaded['keys']} keys, expected {filled['keys']}"
                        )
                    context.say(
                        f"  replay round {round_index + 1}/{plan.replay_rounds}: {EVENTSOURCING} {rate:,.0f} events/s"
                    )
    finally:
        log.client.close()
    ratio = result.ratio(TIERMEM, EVENTSOURCING, "events/s")
    result.target(
        "replay events/s", result.median(TIERMEM, "events/s"), 200_000, at_most=False
    )
    result.target("replay / eventsourcing", ratio, 10.0, at_most=False)
    return result
