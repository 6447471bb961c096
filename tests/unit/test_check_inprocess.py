"""The in-process check: it passes on the real code and catches broken variants.

Each variant patches the code under test with one known kind of bug. The
check must fail on it within a bounded number of examples, and the same
examples (same seed, same count) must pass on the real code, so the failure
comes from the bug and not from the harness.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

import handlers.shard
import handlers.sharding
import tiermem.check.model
from events.types import Get
from handlers.shard import Shard
from handlers.state import ShardState
from tiermem.check.runner import CheckResult, run_check
from tiermem.check.targets import InProcessTarget, MemoryEventLog
from tiers.base import TierWrites

# Examples a broken variant may take before the check must have failed. The
# slowest variant needed about 150 examples on the seeds tried here.
VARIANT_BUDGET = 400
SEED = 20_251_203


def run(
    examples: int, *, seed: int = SEED, preload: str | None = None, **options
) -> CheckResult:
    return run_check(
        InProcessTarget(),
        examples=examples,
        seed=seed,
        shrink=False,
        cross_process=True,
        preload=preload,
        **options,
    )


def test_ci_profile_passes_on_real_code(tmp_path: Path):
    """The bounded CI run: the `ci` profile, with shrinking and the failing-run file."""
    result = run_check(
        InProcessTarget(),
        profile="ci",
        seed=SEED,
        cross_process=True,
        failing_run_dir=tmp_path,
    )
    assert result.passed, f"{result.failure}\n" + "\n".join(result.steps)
    assert result.examples >= 600
    assert list(tmp_path.iterdir()) == []


def test_seed_repeats_run():
    first = run(20, seed=7)
    second = run(20, seed=7)
    assert first.passed
    assert first.examples == second.examples


# ----------------------------------------------------------------- variants


def _stamp_wall_clock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    original = ShardState._store

    def store_with_clock(self, event):
        return original(
            self, msgspec.structs.replace(event, ts=int(time.time() * 1000))
        )

    monkeypatch.setattr(ShardState, "_store", store_with_clock)


def _place_by_builtin_hash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Patch placement here and, through a preload file, in the rebuild processes."""
    preload = tmp_path / "salted_placement.py"
    preload.write_text(
        "import handlers.shard, handlers.sharding\n"
        "def salted(namespace, shards):\n"
        "    return hash(namespace) % shards\n"
        "handlers.sharding.shard_of = salted\n"
        "handlers.shard.shard_of = salted\n"
    )

    def salted(namespace: str, shards: int) -> int:
        return hash(namespace) % shards

    monkeypatch.setattr(handlers.sharding, "shard_of", salted)
    monkeypatch.setattr(handlers.shard, "shard_of", salted)
    return str(preload)


def _watermark_before_writes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Commit the new watermark alone, then the writes: a crash between loses them."""
    original = Shard._commit

    def split_commit(self, writes, watermark):
        self.tiers["stm"].commit(TierWrites(), watermark)
        original(self, writes, watermark)

    monkeypatch.setattr(Shard, "_commit", split_commit)


def _no_deduplication(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(MemoryEventLog, "lookup", lambda self, ids: [None] * len(ids))


def _get_before_batch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Reply to each Get from the state before its batch, not after the events before it."""
    original = Shard.apply

    def early_reads(self, events, **kwargs):
        early = {
            event.id: msgspec.structs.replace(
                self.state.peek(event.namespace, event.key, event.seq, event.ts),
                id=event.id,
            )
            for event in events
            if isinstance(event, Get)
        }
        return [early.get(reply.id, reply) for reply in original(self, events, **kwargs)]

    monkeypatch.setattr(Shard, "apply", early_reads)


def _forget_skips_ltm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Drop a forgotten LTM record from memory but leave it in the LTM tier."""
    original = ShardState._forget

    def forget(self, event):
        entry = self._entry(event.namespace, event.key)
        if entry is not None and entry.tier == "ltm" and event.expected_version is None:
            self._drop_entry(event.namespace, event.key)
            self._cache.pop((event.namespace, event.key), None)
            return None
        return original(self, event)

    monkeypatch.setattr(ShardState, "_forget", forget)


VARIANTS = {
    "wall_clock": _stamp_wall_clock,
    "builtin_hash": _place_by_builtin_hash,
    "watermark_before_writes": _watermark_before_writes,
    "no_deduplication": _no_deduplication,
    "get_before_batch": _get_before_batch,
    "forget_skips_ltm": _forget_skips_ltm,
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_check_catches_variant(
    variant: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    with monkeypatch.context() as patch:
        preload = VARIANTS[variant](patch, tmp_path)
        broken = run(VARIANT_BUDGET, preload=preload)
    real = run(broken.examples)
    assert not broken.passed, f"the check missed {variant} in {VARIANT_BUDGET} examples"
    assert real.passed, (
        f"the real code failed the examples that caught {variant}: {real.failure}"
    )


def test_builtin_hash_caught_across_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """With the model placing by the same salted hash, only the other processes see it."""
    preload = _place_by_builtin_hash(monkeypatch, tmp_path)
    monkeypatch.setattr(
        tiermem.check.model,
        "placement",
        lambda namespace, shards: hash(namespace) % shards,
    )
    result = run(VARIANT_BUDGET, preload=preload)
    assert not result.passed
    assert "rebuilt in a process with PYTHONHASHSEED" in (result.failure or "")


def test_tier_outage_check_passes(tmp_path: Path):
    """Tiers down for a step: the breaker pauses the shard, and it catches up after.

    The check found two bugs here: a failed apply dropped its batch, and
    then a resuming shard re-entered its breaker from `catch_up` about 200
    levels deep, which aborts the interpreter on a deep stack ("Fatal
    Python error: Cannot recover from stack overflow"). It runs in a
    subprocess, so a return of that bug fails this test and not pytest.
    """
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiermem.commands.check",
            "check",
            "--faults",
            "--examples",
            str(VARIANT_BUDGET),
            "--seed",
            str(SEED),
            "--no-shrink",
            "--json",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
