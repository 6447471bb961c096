"""Beat's slot-aligned schedule and its JSON state file, without a broker."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest

from replay.celery_app import JsonScheduler, SlotSchedule, create_app, read_schedule_state, slot_number
from tiermem.config import StackConfig


def at(unix_time: float) -> datetime:
    return datetime.fromtimestamp(unix_time, tz=timezone.utc)


def schedule_at(now: float, interval_s: float = 60.0) -> SlotSchedule:
    return SlotSchedule(timedelta(seconds=interval_s), nowfun=lambda: at(now))


def test_slot_number_floors():
    assert slot_number(0.0, 60.0) == 0
    assert slot_number(59.999, 60.0) == 0
    assert slot_number(60.0, 60.0) == 1
    assert slot_number(1.25, 0.5) == 2


def test_slot_schedule_due_in_later_slot():
    state = schedule_at(6010.0).is_due(at(5999.0))
    assert state.is_due is True
    assert state.next == pytest.approx(50.0)


def test_slot_schedule_not_due_in_same_slot():
    state = schedule_at(6050.0).is_due(at(6001.0))
    assert state.is_due is False
    assert state.next == pytest.approx(10.0)


def test_slot_schedule_due_at_boundary():
    state = schedule_at(6000.0).is_due(at(5999.99))
    assert state.is_due is True


def test_slot_schedule_reads_naive_time_as_utc():
    naive = datetime(1970, 1, 1, 1, 39, 59)  # 5999 s after the epoch
    assert schedule_at(6010.0).is_due(naive).is_due is True


@pytest.fixture
def app(tmp_path):
    return create_app(StackConfig(data_dir=str(tmp_path), broker_url="redis://127.0.0.1:1/0"))


def test_scheduler_writes_state_file(app, tmp_path):
    path = tmp_path / "beat.json"
    JsonScheduler(app=app, schedule_filename=str(path))
    state = read_schedule_state(path)
    assert state is not None
    assert state.beat_pid == os.getpid()
    assert sorted(state.entries) == ["erase", "maintain", "projections", "snapshot-0", "snapshot-1", "trim-ids"]


def test_scheduler_restores_last_run(app, tmp_path):
    path = tmp_path / "beat.json"
    first = JsonScheduler(app=app, schedule_filename=str(path))
    last_run = at(1_700_000_000.0)
    first.schedule["maintain"].last_run_at = last_run
    first.schedule["maintain"].total_run_count = 4
    first.close()

    second = JsonScheduler(app=app, schedule_filename=str(path))
    assert second.schedule["maintain"].last_run_at == last_run
    assert second.schedule["maintain"].total_run_count == 4


def test_scheduler_defaults_to_configured_path(app, tmp_path):
    JsonScheduler(app=app)
    assert read_schedule_state(tmp_path / "celerybeat-schedule.json") is not None


def test_unreadable_state_starts_fresh(app, tmp_path):
    path = tmp_path / "beat.json"
    path.write_bytes(b"\x80\x04not json")
    scheduler = JsonScheduler(app=app, schedule_filename=str(path))
    state = read_schedule_state(path)
    assert scheduler.schedule["maintain"].total_run_count == 0
    assert state is not None
    assert state.entries["maintain"].total_run_count == 0


def test_missing_state_file_reads_none(tmp_path):
    assert read_schedule_state(tmp_path / "absent.json") is None
