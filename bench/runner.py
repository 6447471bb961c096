"""Run the selected scenarios in a fixed order and collect one result document."""

from __future__ import annotations

import datetime
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from bench.article import run_article
from bench.context import BenchContext
from bench.ingest import run_durable_ingest
from bench.latency import run_ack_latency, run_priority_isolation, run_read_latency
from bench.machine import load_average, machine_info, versions
from bench.plan import FULL, QUICK
from bench.profile import Profiler
from bench.recovery import run_recovery
from bench.replay import run_replay
from bench.result import ScenarioResult

__all__ = ["SCENARIOS", "run_suite"]

log = structlog.get_logger("tiermem.bench")

# In run order: the scenarios on the bus stack first, then those on the
# history stack, so each stack starts once.
SCENARIOS: dict[str, Callable[[BenchContext], ScenarioResult]] = {
    "durable-ingest": run_durable_ingest,
    "ack-latency": run_ack_latency,
    "read-latency": run_read_latency,
    "priority-isolation": run_priority_isolation,
    "article": run_article,
    "replay": run_replay,
    "recovery": run_recovery,
}


def run_suite(
    names: list[str] | None = None,
    *,
    quick: bool = False,
    data_dir: Path | None = None,
    profile_dir: Path | None = None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Run the named scenarios (all by default) and return the result document.

    Without `data_dir` the stacks live in a temporary directory that is
    removed at the end. A given `data_dir` must be empty or absent, and it is kept.
    """
    selected = [name for name in SCENARIOS if names is None or name in names]
    unknown = sorted(set(names or []) - set(SCENARIOS))
    if unknown:
        raise ValueError(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    plan = QUICK if quick else FULL
    if data_dir is None:
        scratch = Path(tempfile.mkdtemp(prefix="tiermem-bench-"))
        keep = False
    else:
        scratch = data_dir.resolve()
        if scratch.exists() and any(scratch.iterdir()):
            raise ValueError(
                f"--data-dir {scratch} is not empty: pass a new or empty directory"
            )
        scratch.mkdir(parents=True, exist_ok=True)
        keep = True
    profiler = Profiler(profile_dir) if profile_dir is not None else None
    context = BenchContext(plan, scratch, say=say, profiler=profiler)
    document: dict[str, Any] = {
        "suite": "tiermem bench",
        "plan": plan.name,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "scenarios": {},
    }
    started = time.monotonic()
    log.info("bench.started", plan=plan.name, scenarios=selected, data_dir=str(scratch))
    try:
        for name in selected:
            say(f"scenario {name}")
            scenario_started = time.monotonic()
            result = SCENARIOS[name](context)
            result.seconds = time.monotonic() - scenario_started
            document["scenarios"][name] = result.to_document()
            say(f"scenario {name} finished in {result.seconds:.0f}s")
    finally:
        context.close()
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    document["seconds"] = round(time.monotonic() - started, 1)
    document["machine"]["load_average_end"] = load_average()
    if profiler is not None:
        document["profile"] = profiler.summaries()
    log.info("bench.finished", seconds=document["seconds"])
    return document
