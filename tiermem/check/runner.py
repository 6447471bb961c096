"""Run the state machine against a target, report the outcome, save a failing run.

`run_check` runs hypothesis with a seed (random unless given) and returns a
`CheckResult`. On failure the result contains the shrunk sequence of steps as
hypothesis printed it, and the failing example's log is written as JSON
lines (one event per line, in seq order) next to a `.json` file with the
seed, the policy and the steps. `load_failing_run` replays such a file into
fresh in-process shards and the model, event by event, and returns every
disagreement.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, Phase
from hypothesis import seed as hypothesis_seed
from hypothesis import settings as hypothesis_settings
from hypothesis.reporting import with_reporter
from hypothesis.stateful import run_state_machine_as_test

from events.types import AnyEvent, Event, Get, TierDigest
from handlers.policy import Policy
from handlers.shard import Shard
from replay.rebuild import compare_digests, rebuild
from tiermem.check.machine import (
    INVARIANTS,
    CheckHooks,
    CheckSettings,
    live_state_problems,
    machine_class,
    reply_problem,
)
from tiermem.check.model import Model
from tiermem.check.targets import (
    CHECK_POLICY,
    LiveShard,
    MemoryEventLog,
    Target,
    body_hash,
)
from tiers.base import TIER_NAMES
from tiers.memory import MemoryTier

__all__ = [
    "PROFILES",
    "CheckResult",
    "RebuildWorkers",
    "ReplayReport",
    "load_failing_run",
    "run_check",
    "write_failing_run",
]

# Hypothesis settings per profile. `ci` is the bounded CI run (about 20 s of
# CPU time in-process on a 2-core machine), and `long` the soak run.
PROFILES: dict[str, dict[str, int]] = {
    "ci": {"max_examples": 600, "stateful_step_count": 40},
    "long": {"max_examples": 2000, "stateful_step_count": 60},
}

# Hash seeds of the two rebuild processes. Two fixed seeds that differ make
# salted placement disagree between them whatever this process's seed is.
WORKER_HASH_SEEDS = ("1", "2")


@dataclass
class CheckResult:
    """The outcome of one `run_check`."""

    passed: bool
    examples: int
    seed: int
    target: str
    seconds: float
    steps_run: int = 0
    faults: int = 0
    failure: str | None = None
    steps: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    failing_run: str | None = None
    traceback: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def check_settings_for(
    profile: str, *, examples: int | None, steps: int | None, shrink: bool
) -> hypothesis_settings:
    """Return the hypothesis settings of a profile, with any overrides."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} is not one of {sorted(PROFILES)}")
    chosen = dict(PROFILES[profile])
    if examples is not None:
        chosen["max_examples"] = examples
    if steps is not None:
        chosen["stateful_step_count"] = steps
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    return hypothesis_settings(
        max_examples=chosen["max_examples"],
        stateful_step_count=chosen["stateful_step_count"],
        deadline=None,
        # No example database: a run is reproduced by its seed alone.
        database=None,
        phases=phases,
        report_multiple_bugs=False,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )


class RebuildWorkers:
    """Two `tiermem.check.rebuild_worker` processes, each with its own hash seed."""

    def __init__(
        self, shards: int, policy: Policy, *, preload: str | None = None
    ) -> None:
        command = [
            sys.executable,
            "-m",
            "tiermem.check.rebuild_worker",
            "--shards",
            str(shards),
            "--policy",
            msgspec.json.encode(policy).decode(),
        ]
        if preload:
            command += ["--preload", str(preload)]
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        for hash_seed in WORKER_HASH_SEEDS:
            env = dict(os.environ, PYTHONHASHSEED=hash_seed)
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
            )
            self.processes.append((f"PYTHONHASHSEED={hash_seed}", process))
        self._encoder = msgspec.json.Encoder()

    def rebuild(self, events: list[Event]) -> list[tuple[str, list[TierDigest]]]:
        """Return each worker's digests of `events`, labelled by its hash seed."""
        line = self._encoder.encode({"events": events}) + b"\n"
        for _, process in self.processes:
            assert process.stdin is not None
            process.stdin.write(line)
            process.stdin.flush()
        results = []
        for label, process in self.processes:
            assert process.stdout is not None
            answer = process.stdout.readline()
            if not answer:
                raise RuntimeError(
                    f"the rebuild worker with {label} exited with status {process.poll()}"
                )
            reply = json.loads(answer)
            if "error" in reply:
                raise AssertionError(
                    f"the rebuild in a process with {label} failed: {reply['error']}"
                )
            results.append((label, msgspec.convert(reply["digests"], list[TierDigest])))
        return results

    def close(self) -> None:
        for _, process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
        for _, process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


def run_check(
    target: Target,
    *,
    settings: CheckSettings | None = None,
    profile: str = "ci",
    examples: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    shrink: bool = True,
    cross_process: bool = False,
    preload: str | None = None,
    failing_run_dir: Path | None = None,
    prefix: Callable[[int], str] | None = None,
) -> CheckResult:
    """Run the check and return its result: a failed check is returned, not raised.

    `cross_process` rebuilds every example's log in two other processes
    (in-process target only). `prefix(n)` returns the namespace and id
    prefix of example n; remote targets need one that no earlier run used.
    """
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    started = time.monotonic()
    workers = (
        RebuildWorkers(target.shards, target.policy, preload=preload)
        if cross_process
        else None
    )
    last_run: dict[str, list] = {"events": [], "trace": []}
    counter = [0]

    def next_prefix() -> str:
        counter[0] += 1
        return prefix(counter[0]) if prefix else ""

    def save_run(events: list[Event], trace: list[str]) -> None:
        last_run["events"], last_run["trace"] = events, trace

    hooks = CheckHooks(
        prefix=next_prefix,
        cross_process=workers.rebuild if workers else None,
        save_run=save_run,
    )
    machine = machine_class(settings or CheckSettings())

    @hypothesis_seed(seed)
    def factory():
        return machine(target, hooks)

    reported: list[str] = []
    failure: BaseException | None = None
    try:
        with with_reporter(reported.append):
            run_state_machine_as_test(
                factory,
                settings=check_settings_for(
                    profile, examples=examples, steps=steps, shrink=shrink
                ),
            )
    except Exception as error:  # noqa: BLE001 - a failed check is a result, not a crash
        failure = error
    finally:
        if workers is not None:
            workers.close()
    seconds = round(time.monotonic() - started, 2)
    result = CheckResult(
        passed=failure is None,
        examples=hooks.examples[0],
        seed=seed,
        target=target.name,
        seconds=seconds,
        steps_run=hooks.counts["steps"],
        faults=hooks.counts["faults"],
    )
    if failure is None:
        return result
    result.failure = f"{type(failure).__name__}: {failure}"
    result.traceback = "".join(traceback.format_exception(failure))
    result.steps = _steps_of(failure, reported)
    events: list[Event] = last_run["events"]
    result.events = [msgspec.json.encode(event).decode() for event in events]
    if failing_run_dir is not None:
        path = write_failing_run(
            failing_run_dir / f"failing-run-{seed}.jsonl",
            events,
            target=target,
            seed=seed,
            result=result,
            trace=last_run["trace"],
        )
        result.failing_run = str(path)
    return result


def _steps_of(failure: BaseException, reported: Sequence[str]) -> list[str]:
    """Return the shrunk steps: the failing test case hypothesis attached or printed."""
    lines: list[str] = []
    for note in getattr(failure, "__notes__", []):
        lines.extend(str(note).splitlines())
    for text in reported:
        lines.extend(text.splitlines())
    if "Explanation:" in lines:
        lines = lines[: lines.index("Explanation:")]
    # Invariant calls between rules only add noise to the printed sequence.
    noise = {f"state.{name}()" for name in INVARIANTS}
    return [line for line in lines if line.strip() not in noise]


def write_failing_run(
    path: Path,
    events: Sequence[Event],
    *,
    target: Target,
    seed: int,
    result: CheckResult,
    trace: list[str],
) -> Path:
    """Write the events as JSON lines and a `.json` description next to them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(msgspec.json.encode(event) + b"\n" for event in events))
    description = {
        "seed": seed,
        "target": target.name,
        "shards": target.shards,
        "policy": msgspec.to_builtins(target.policy),
        "failure": result.failure,
        "steps": result.steps,
        "trace": trace,
    }
    path.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
    return path


@dataclass
class ReplayReport:
    """The disagreements between shards and model that `load_failing_run` found."""

    events: int
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems


def load_failing_run(
    path: str | Path, *, shards: int | None = None, policy: Policy | None = None
) -> ReplayReport:
    """Replay a failing run's events into fresh in-process shards and the model.

    Each event is applied alone, in seq order, to the shards that own it
    and to the model. Every `Get` reply is compared, and at the end the
    records, the caches and a rebuild's digests. The shard count and policy come
    from the `.json` file written next to the events unless given. Faults
    of the original run are not replayed: rerun `tiermem check --seed S`
    for those.
    """
    path = Path(path)
    description = path.with_suffix(".json")
    if description.exists():
        meta = json.loads(description.read_text())
        shards = shards or meta["shards"]
        policy = policy or msgspec.convert(meta["policy"], Policy)
    shards = shards or 2
    policy = policy or CHECK_POLICY
    decoder = msgspec.json.Decoder(AnyEvent)
    events = [
        decoder.decode(line) for line in path.read_bytes().splitlines() if line.strip()
    ]

    event_log = MemoryEventLog()
    tiers = [
        {name: MemoryTier(name, index) for name in TIER_NAMES}
        for index in range(shards)
    ]
    hosts = [
        Shard(index, shards, tiers[index], policy, event_log) for index in range(shards)
    ]
    for host in hosts:
        host.recover()
    model = Model(shards, policy)
    problems: list[str] = []
    for event in events:
        event_log.append([event], [body_hash(event)])
        expected = model.apply(event)
        replies = [
            reply for host in hosts if host.owns(event) for reply in host.apply([event])
        ]
        if isinstance(event, Get):
            if len(replies) != 1 or expected is None:
                problems.append(
                    f"seq {event.seq}: expected one reply to {event.id!r}, got {len(replies)}"
                )
                continue
            problem = reply_problem(expected, replies[0])
            if problem:
                problems.append(f"seq {event.seq}: {problem}")
    live = [
        LiveShard(
            records={
                name: {(r.namespace, r.key): r for r in tiers[index][name].records()}
                for name in TIER_NAMES
            },
            cache=host.state.cache_keys(),
        )
        for index, host in enumerate(hosts)
    ]
    problems += [
        f"after seq {event_log.last_seq()}: {text}"
        for text in live_state_problems(model, live)
    ]
    digests = [digest for host in hosts for digest in host.digests()]
    rebuilt = rebuild(
        event_log, shards=shards, policy=policy, until_seq=event_log.last_seq()
    ).digests
    problems += [
        f"shard {item.shard} {item.tier}: live digest {item.expected}, rebuilt {item.actual}"
        for item in compare_digests(digests, rebuilt)
    ]
    return ReplayReport(events=len(events), problems=problems)
