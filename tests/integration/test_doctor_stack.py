"""`tiermem doctor` on an embedded stack with Celery: healthy, then one fault at a time.

One stack serves the module. Each test that breaks something restores it
before it ends, so the next test starts from a healthy stack.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import msgspec
import pytest

from bus.client import Client
from events.types import Maintain, Store
from replay.celery_app import slot_number
from replay.tasks.maintenance import maintenance_event_id
from tiermem.commands.doctor import add_doctor_parser
from tiermem.config import StackConfig, write_stack_config
from tiermem.doctor import CHECK_ORDER, DoctorOptions, check_beat
from tiermem.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RANDOM_PORTS = {"high": 0, "normal": 0, "low": 0, "pub": 0}

# Deadline of each request the doctor sends. Generous, because the machine
# that runs the tests also runs the stack.
TIMEOUT_S = "5"

CELERY_CHECKS = (
    "celery.memory_ops",
    "celery.processing",
    "celery.maintenance",
    "celery.replay",
)
BUS_CHECKS = ("bus.high", "bus.normal", "bus.low")


@pytest.fixture(scope="module")
def stack(ray_cluster, tmp_path_factory):
    config = StackConfig(
        data_dir=str(tmp_path_factory.mktemp("doctor") / "data"),
        shards=2,
        ray_address=ray_cluster,
    )
    config.router = msgspec.structs.replace(config.router, ports=dict(RANDOM_PORTS))
    running = Stack(config, celery=True)
    running.start()
    yield running
    running.stop()


def wait_for(condition, *, timeout: float, what: str):
    """Poll `condition` until it returns a true value, and return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def doctor(capsys, *args: str) -> tuple[int, dict]:
    """Run `tiermem doctor --json ARGS` in this process; return the exit status and the report."""
    parser = argparse.ArgumentParser(prog="tiermem")
    add_doctor_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(
        ["doctor", "--json", "--timeout", TIMEOUT_S, "--min-free-mb", "1", *args]
    )
    capsys.readouterr()
    status = parsed.handler(parsed)
    lines = capsys.readouterr().out.strip().splitlines()
    return status, json.loads(lines[-1])


def by_name(report: dict) -> dict[str, dict]:
    return {check["name"]: check for check in report["checks"]}


def failed_names(report: dict) -> list[str]:
    return [check["name"] for check in report["checks"] if not check["ok"]]


def store_events(stack: Stack, count: int, prefix: str) -> int:
    events = [
        Store(namespace=f"doctor-{i % 5}", key=f"{prefix}-{i}", value={"i": i})
        for i in range(count)
    ]
    with Client(stack.endpoints) as client:
        replies = client.pipeline(events)
    return max(reply.seq for reply in replies)


def shard_pids(stack: Stack) -> list[int]:
    with Client(stack.endpoints, timeout=60) as client:
        return [item.pid for item in client.status().shards]


def test_doctor_passes_on_healthy_stack(stack, capsys):
    store_events(stack, 50, "healthy")
    projections_db = Path(stack.config.projections_db)
    wait_for(projections_db.is_file, timeout=60, what="the first projection run")

    status, report = doctor(capsys, "--data-dir", str(stack.data_dir))

    assert failed_names(report) == []
    assert report["ok"] is True
    assert status == 0
    assert [check["name"] for check in report["checks"]] == list(CHECK_ORDER)
    for check in report["checks"]:
        assert set(check) == {"name", "ok", "detail", "fix"}
        assert check["fix"] is None


def test_doctor_reads_toml_config(stack, capsys, tmp_path):
    settings = tmp_path / "tiermem.toml"
    settings.write_text(f'data_dir = "{stack.data_dir}"\nshards = 2\n')

    status, report = doctor(capsys, "--config", str(settings))

    assert failed_names(report) == []
    assert status == 0


def test_doctor_names_log_fsync_no(stack, capsys):
    log_redis = stack.redis["log"].client()
    log_redis.config_set("appendfsync", "no")
    try:
        status, report = doctor(capsys, "--data-dir", str(stack.data_dir))
    finally:
        log_redis.config_set("appendfsync", "always")
        log_redis.close()

    check = by_name(report)["redis.log"]
    assert failed_names(report) == ["redis.log"]
    assert status == 1
    assert "appendfsync no" in check["detail"]
    assert "CONFIG SET appendfsync always" in check["fix"]


def test_doctor_names_stm_eviction(stack, capsys):
    stm_redis = stack.redis["stm"].client()
    stm_redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        status, report = doctor(capsys, "--data-dir", str(stack.data_dir))
    finally:
        stm_redis.config_set("maxmemory-policy", "noeviction")
        stm_redis.close()

    check = by_name(report)["redis.stm"]
    assert failed_names(report) == ["redis.stm"]
    assert status == 1
    assert "maxmemory-policy is 'allkeys-lru'" in check["detail"]
    assert "CONFIG SET maxmemory-policy noeviction" in check["fix"]


def test_doctor_names_stopped_worker(stack, capsys):
    stack.stop_worker()
    try:
        # Nothing consumes the processing queue now, so these stay unprojected.
        store_events(stack, 5, "unprojected")
        status, report = doctor(
            capsys, "--data-dir", str(stack.data_dir), "--max-projection-lag", "4"
        )
    finally:
        stack.start_worker()

    checks = by_name(report)
    assert failed_names(report) == ["projection_lag", *CELERY_CHECKS]
    assert status == 1
    for name in CELERY_CHECKS:
        assert "no Celery worker consumes" in checks[name]["detail"]
    assert "events behind" in checks["projection_lag"]["detail"]


def test_doctor_names_stopped_beat(stack, capsys):
    stack.stop_beat()
    try:
        # Beat's schedule file ages from the moment beat stops, and the check
        # fails once it is older than twice beat's shortest interval plus a slack.
        wait_for(
            lambda: not check_beat(stack.config, DoctorOptions()).ok,
            timeout=60,
            what="the beat check to fail",
        )
        status, report = doctor(capsys, "--data-dir", str(stack.data_dir))
    finally:
        stack.start_beat()

    check = by_name(report)["celery.beat"]
    assert failed_names(report) == ["celery.beat"]
    assert status == 1
    assert "so it has stopped" in check["detail"]
    assert "celery -A replay.celery_app beat" in check["fix"]
    assert check_beat(stack.config, DoctorOptions()).ok


def test_beat_check_reads_log_elsewhere(stack, tmp_path):
    """Without beat's schedule file on this host, the check looks for beat's Maintain in the log."""
    # An interval this stack's beat does not use, so the log contains no
    # Maintain with its event ids until the test sends one.
    config = msgspec.structs.replace(stack.config, data_dir=str(tmp_path), maintain_interval_s=7200.0)
    now = time.time()

    missing = check_beat(config, DoctorOptions(), now=now)
    slot = slot_number(now, config.maintain_interval_s)
    with Client(stack.endpoints) as client:
        (reply,) = client.pipeline(
            [Maintain(id=maintenance_event_id(config.maintain_interval_s, slot))], lane="low"
        )
    found = check_beat(config, DoctorOptions(), now=now)

    assert missing.ok is False
    assert "no Maintain that beat scheduled is in the log for the last 1000 slots" in missing.detail
    assert "celery.maintenance" in missing.fix
    assert found.ok is True
    assert f"slot {slot} is at seq {reply.seq}" in found.detail


def test_doctor_names_hung_shard(stack, capsys):
    # A stopped process keeps its connections, so Ray does not restart it,
    # and its Status call stays unanswered for as long as it is stopped.
    pid = shard_pids(stack)[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        status, report = doctor(capsys, "--data-dir", str(stack.data_dir))
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: shard_pids(stack), timeout=60, what="Status after SIGCONT")

    checks = by_name(report)
    # Beat's Maintain events keep arriving, and the stopped shard cannot
    # apply them, so apply_lag may fail too; nothing else may.
    assert failed_names(report)[0] == "shards"
    assert set(failed_names(report)) <= {"shards", "apply_lag"}
    assert status == 1
    assert "no Status reply" in checks["shards"]["detail"]
    assert "watermarks from STM" in checks["apply_lag"]["detail"]


def test_doctor_sees_restarted_shard(stack, capsys):
    # Ray restarts a killed shard actor, and Status waits for it to recover,
    # so whether doctor runs during the restart depends on the machine. This
    # test waits for the new process, then checks that doctor reports it.
    killed = shard_pids(stack)[1]
    os.kill(killed, signal.SIGKILL)
    wait_for(
        lambda: shard_pids(stack)[1] != killed,
        timeout=120,
        what="the restarted shard actor",
    )

    status, report = doctor(capsys, "--data-dir", str(stack.data_dir))

    detail = by_name(report)["shards"]["detail"]
    assert failed_names(report) == []
    assert status == 0
    assert f"pid {killed} " not in detail
    assert "shard 1: pid " in detail


def test_doctor_names_stopped_router(stack, capsys):
    stack.stop_router()
    try:
        status, report = doctor(
            capsys, "--data-dir", str(stack.data_dir), "--timeout", "2"
        )
    finally:
        stack.start_router()

    checks = by_name(report)
    assert failed_names(report) == [*BUS_CHECKS, "shards"]
    assert status == 1
    for name in BUS_CHECKS:
        assert "no reply" in checks[name]["detail"]
    assert "watermarks from STM" in checks["apply_lag"]["detail"]


def test_doctor_names_low_disk(stack, capsys):
    status, report = doctor(
        capsys, "--data-dir", str(stack.data_dir), "--min-free-mb", str(2**40)
    )

    assert failed_names(report) == ["disk"]
    assert status == 1
    assert "below the minimum" in by_name(report)["disk"]["detail"]


def test_doctor_without_stack(capsys, tmp_path):
    status, report = doctor(capsys, "--data-dir", str(tmp_path / "nothing"))

    assert status == 1
    assert report["ok"] is False
    assert failed_names(report) == ["settings"]
    assert "stack.json does not exist" in by_name(report)["settings"]["detail"]


def test_doctor_on_stopped_stack(capsys, tmp_path):
    """A data directory whose stack stopped is reported at once, not by every check timing out."""
    data_dir = tmp_path / "stopped"
    data_dir.mkdir()
    config = StackConfig(data_dir=str(data_dir), shards=1)
    write_stack_config(config, data_dir / "stack.json")
    (data_dir / "stack.lock").write_text("12345\n")

    status, report = doctor(capsys, "--data-dir", str(data_dir))

    assert status == 1
    assert failed_names(report) == ["settings"]
    assert "no stack runs in" in by_name(report)["settings"]["detail"]
    assert f"tiermem up --data-dir {data_dir}" in by_name(report)["settings"]["detail"]


def test_doctor_rejects_invalid_config(capsys, tmp_path):
    settings = tmp_path / "tiermem.toml"
    settings.write_text("[policy]\nstm_capacity = 0\n")

    status, report = doctor(capsys, "--config", str(settings))

    assert status == 1
    assert failed_names(report) == ["settings"]
    assert (
        "policy.stm_capacity: expected an integer >= 1, got 0"
        in by_name(report)["settings"]["detail"]
    )
