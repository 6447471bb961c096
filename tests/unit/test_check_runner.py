"""The runner and `tiermem check`: failure reports, failing-run files, the command line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from handlers.state import ShardState
from tiermem.check.runner import CheckResult, load_failing_run, run_check
from tiermem.check.targets import InProcessTarget
from tiermem.commands.check import _report, endpoints_from_url


def _stamp_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    original = ShardState._store
    monkeypatch.setattr(
        ShardState,
        "_store",
        lambda self, event: original(
            self, msgspec.structs.replace(event, ts=int(time.time() * 1000))
        ),
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiermem.commands.check", "check", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env=dict(os.environ, TIERMEM_LOG_LEVEL="CRITICAL"),
    )


def test_failure_shrinks_and_writes_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    _stamp_wall_clock(monkeypatch)
    result = run_check(InProcessTarget(), examples=50, seed=3, failing_run_dir=tmp_path)
    assert not result.passed
    assert result.failure is not None
    assert "live_state_matches_model" in result.failure
    assert result.steps[0] == "Failing test case: <state machine>"
    assert result.steps[1] == "state = CheckMachine()"
    # Shrunk: one store is enough to show a wall-clock timestamp.
    assert (
        len([line for line in result.steps if line.startswith(("state.", "written_"))])
        <= 3
    )
    assert result.failing_run == str(tmp_path / "failing-run-3.jsonl")
    lines = Path(result.failing_run).read_text().splitlines()
    assert lines == result.events
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, len(lines) + 1))
    description = json.loads((tmp_path / "failing-run-3.json").read_text())
    assert description["seed"] == 3
    assert description["shards"] == 2


def test_failing_run_replays_with_bug_and_passes_without(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    with monkeypatch.context() as patch:
        _stamp_wall_clock(patch)
        result = run_check(
            InProcessTarget(), examples=50, seed=3, failing_run_dir=tmp_path
        )
        assert result.failing_run is not None
        broken = load_failing_run(result.failing_run)
    fixed = load_failing_run(result.failing_run)
    assert not broken.passed
    assert any("created_ts" in problem for problem in broken.problems)
    assert fixed.passed, fixed.problems
    assert fixed.events == len(result.events)


def test_cli_json_summary(tmp_path: Path):
    completed = run_cli(
        "--examples", "15", "--seed", "5", "--json", "--data-dir", str(tmp_path)
    )
    summary = json.loads(completed.stdout.splitlines()[-1])
    assert completed.returncode == 0, completed.stderr
    assert summary["passed"] is True
    assert summary["seed"] == 5
    assert summary["examples"] >= 15
    assert summary["target"] == "inprocess"


def test_cli_replay_of_failing_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with monkeypatch.context() as patch:
        _stamp_wall_clock(patch)
        result = run_check(
            InProcessTarget(), examples=50, seed=3, failing_run_dir=tmp_path
        )
    assert result.failing_run is not None
    completed = run_cli("--replay", result.failing_run, "--json")
    summary = json.loads(completed.stdout.splitlines()[-1])
    assert completed.returncode == 0, completed.stderr
    assert summary == {"passed": True, "events": len(result.events), "problems": []}


def test_cli_rejects_faults_on_shared_deployment():
    completed = run_cli(
        "--target", "endpoint", "--endpoint", "tcp://127.0.0.1:1", "--faults"
    )
    assert completed.returncode != 0
    assert "--faults needs a stack the check starts itself" in completed.stderr


def test_report_of_failure(capsys: pytest.CaptureFixture[str]):
    result = CheckResult(
        passed=False,
        examples=12,
        seed=99,
        target="inprocess",
        seconds=1.5,
        failure="AssertionError: replies_match_model: step 2: ...",
        steps=["Failing test case: <state machine>", "state = CheckMachine()"],
        events=['{"type":"Store"}'],
        failing_run="/tmp/x/failing-run-99.jsonl",
    )
    code = _report(result, argparse.Namespace(json=True))
    captured = capsys.readouterr()
    summary = json.loads(captured.out.splitlines()[-1])
    assert code == 1
    assert summary["passed"] is False
    assert summary["seed"] == 99
    assert "state = CheckMachine()" in captured.err
    assert "tiermem check --replay /tmp/x/failing-run-99.jsonl" in captured.err
    assert "tiermem check --target inprocess --seed 99" in captured.err


def test_endpoints_from_url():
    assert endpoints_from_url("tcp://127.0.0.1:7451") == {
        "high": "tcp://127.0.0.1:7451",
        "normal": "tcp://127.0.0.1:7452",
        "low": "tcp://127.0.0.1:7453",
        "pub": "tcp://127.0.0.1:7454",
    }
    with pytest.raises(SystemExit, match="expected tcp://HOST:PORT"):
        endpoints_from_url("127.0.0.1:7451")
