"""The beat check of `tiermem doctor` on schedule files written here, at chosen times."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import msgspec
import pytest

from replay.celery_app import ScheduleState, schedule_path
from tiermem.config import StackConfig
from tiermem.doctor import BEAT_SLACK_S, DoctorOptions, check_beat

SENT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def stack_config(tmp_path, **fields) -> StackConfig:
    return StackConfig(data_dir=str(tmp_path), broker_url="redis://127.0.0.1:1", **fields)


def write_schedule(
    config: StackConfig, *times: datetime, pid: int = 4321, written: datetime | None = None
) -> None:
    """Write a schedule file with these send times, modified at `written` (the newest send by default)."""
    state = {
        "beat_pid": pid,
        "entries": {
            f"entry-{index}": {"last_run_at": moment.isoformat()} for index, moment in enumerate(times)
        },
    }
    # Through the Struct, so the file has the shape beat writes.
    encoded = msgspec.json.encode(msgspec.convert(state, ScheduleState))
    path = schedule_path(config)
    path.write_bytes(encoded)
    modified = (written or max(times)).timestamp()
    os.utime(path, (modified, modified))


def test_beat_recent_schedule_passes(tmp_path):
    config = stack_config(tmp_path, projection_interval_s=1.0)
    write_schedule(config, SENT.replace(second=0), SENT)

    check = check_beat(config, DoctorOptions(), now=SENT.timestamp() + 2)

    assert check.ok is True
    assert check.detail.startswith("beat (pid 4321) last wrote ")
    assert "celerybeat-schedule.json 2.0 s ago" in check.detail
    assert "it sends a task every 1 s" in check.detail


def test_beat_restart_old_times_passes(tmp_path):
    """A beat that just started again has written the file but sent nothing yet."""
    config = stack_config(tmp_path, projection_interval_s=1.0)
    restarted = SENT.replace(hour=5)
    write_schedule(config, SENT, written=restarted)

    check = check_beat(config, DoctorOptions(), now=restarted.timestamp() + 1)

    assert check.ok is True


def test_beat_stale_schedule_fails(tmp_path):
    config = stack_config(tmp_path, projection_interval_s=1.0)
    write_schedule(config, SENT)
    limit = 2 * 1.0 + BEAT_SLACK_S

    check = check_beat(config, DoctorOptions(), now=SENT.timestamp() + limit + 1)

    assert check.ok is False
    assert f"nothing written for more than {limit:g} s" in check.detail
    assert "`TIERMEM_CONFIG=DIR/stack.json celery -A replay.celery_app beat`" in check.fix


@pytest.mark.parametrize(("offset", "ok"), [(0.0, True), (1.0, False)])
def test_beat_limit_follows_shortest_interval(tmp_path, offset, ok):
    config = stack_config(tmp_path, projection_interval_s=30.0, maintain_interval_s=10.0)
    write_schedule(config, SENT)
    limit = 2 * 10.0 + BEAT_SLACK_S

    check = check_beat(config, DoctorOptions(), now=SENT.timestamp() + limit + offset)

    assert check.ok is ok


def test_beat_naive_time_read_as_utc(tmp_path):
    config = stack_config(tmp_path)
    write_schedule(config, SENT.replace(tzinfo=None))

    check = check_beat(config, DoctorOptions(), now=SENT.timestamp() + 1)

    assert check.ok is True


def test_beat_unreadable_schedule_fails(tmp_path):
    config = stack_config(tmp_path)
    schedule_path(config).write_text("not json")

    check = check_beat(config, DoctorOptions(), now=SENT.timestamp())

    assert check.ok is False
    assert "cannot be read or lists no tasks" in check.detail


def test_beat_without_broker_unset(tmp_path):
    config = StackConfig(data_dir=str(tmp_path))

    check = check_beat(config, DoctorOptions())

    assert check.ok is False
    assert "broker_url is not set" in check.detail


def test_beat_log_unreachable_named(tmp_path):
    config = stack_config(tmp_path, log_url="redis://127.0.0.1:1")

    check = check_beat(config, DoctorOptions(timeout_s=1.0))

    assert check.ok is False
    assert "is not on this host, and the log cannot be read" in check.detail
