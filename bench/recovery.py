"""Recovery: from `kill -9` of the router to serving again, against a Redis restart.

A tiermem round SIGKILLs the router, and Ray then ends the shard actors it
owns. It starts a new router, whose new actors recover from the tiers and
the log, and sends a `Digest`: the reply needs every shard loaded and
caught up. The baseline SIGKILLs a bare redis-server started on a copy of
the history log's append-only files (the same bytes) and starts it again.
It serves once it replies to PING, which it does after loading the whole
file.
"""

from __future__ import annotations

import shutil
import time

from bench.context import BenchContext
from bench.history import aof_bytes, history
from bench.result import ScenarioResult
from bus.client import Client
from tiermem.servers import RedisServer

__all__ = ["run_recovery"]

TIERMEM = "tiermem router"
REDIS = "redis-server, same AOF"


def _copy_log_aof(context: BenchContext) -> RedisServer:
    source = context.history_stack.redis["log"].data_dir / "appendonlydir"
    root = context.scratch / "aof-copy"
    shutil.rmtree(root, ignore_errors=True)
    target = root / "redis-log"
    target.mkdir(parents=True)
    # The stack sends nothing while this runs, and every append was fsynced
    # before its reply, so the files are complete.
    shutil.copytree(source, target / "appendonlydir")
    return RedisServer(root, role="log")


def run_recovery(context: BenchContext) -> ScenarioResult:
    plan = context.plan
    result = ScenarioResult(
        "recovery", "recovery after kill -9", "s", higher_is_better=False
    )
    built = history(context)
    stack = context.history_stack
    server = _copy_log_aof(context)
    result.settings = {
        "events_logged": built.last_seq,
        "aof_bytes": aof_bytes(stack.redis["log"].data_dir),
        "rounds": plan.recovery_rounds,
        "shards": plan.shards,
        "keys": built.replies.get("Ack", 0),
        "history_final_replies": built.replies,
        "serving": "tiermem: the first Digest reply; redis: the first PING reply",
        "router ready": "the new router has written its endpoints, which it does once every shard actor has recovered",
    }
    server.start(timeout=600)
    try:
        for round_index in range(plan.recovery_rounds):
            order = (
                ["tiermem", "redis"] if round_index % 2 == 0 else ["redis", "tiermem"]
            )
            for system in order:
                if system == "tiermem":
                    started = time.monotonic()
                    stack.kill_router()
                    stack.start_router(timeout=600)
                    ready = time.monotonic()
                    with Client(stack.endpoints, timeout=600, attempts=1) as client:
                        client.digest()
                    seconds = time.monotonic() - started
                    result.add(TIERMEM, "serving", seconds)
                    result.add(TIERMEM, "router ready", ready - started)
                    context.say(
                        f"  recovery round {round_index + 1}/{plan.recovery_rounds}: {TIERMEM} ready (actors recovered) after "
                        f"{ready - started:.2f}s, first Digest after {seconds:.2f}s"
                    )
                else:
                    started = time.monotonic()
                    server.kill()
                    server.start(timeout=600)
                    seconds = time.monotonic() - started
                    result.add(REDIS, "serving", seconds)
                    context.say(
                        f"  recovery round {round_index + 1}/{plan.recovery_rounds}: {REDIS} serving after {seconds:.2f}s"
                    )
    finally:
        server.stop()
    result.ratio(TIERMEM, REDIS, "serving")
    result.target(
        f"recovery seconds with {built.last_seq:,} events logged",
        result.median(TIERMEM, "serving"),
        5.0,
        at_most=True,
    )
    return result
