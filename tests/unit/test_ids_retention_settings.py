"""The id index retention settings and the beat entry of the trim, without a broker."""

from __future__ import annotations

import pytest

from replay.celery_app import (
    TASK_MODULES,
    TRIM_IDS_TASK,
    create_app,
    importable_task_modules,
)
from tiermem.config import StackConfig
from tiermem.settings import SettingsError, load_config

BROKER = "redis://127.0.0.1:1/0"


def test_defaults_keep_ids_a_week():
    config = StackConfig()
    assert config.ids_retention_s == 604800.0
    assert config.ids_trim_interval_s == 3600.0


def test_config_accepts_zero_retention():
    assert StackConfig(ids_retention_s=0.0).ids_retention_s == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ids_retention_s", -1.0),
        ("ids_trim_interval_s", 0.0),
        ("ids_trim_interval_s", -5.0),
    ],
)
def test_config_rejects_invalid_value(field, value):
    with pytest.raises(ValueError, match=field):
        StackConfig(**{field: value})


@pytest.mark.parametrize(
    ("variable", "text", "message"),
    [
        (
            "TIERMEM_IDS_RETENTION_S",
            "-1",
            "ids_retention_s: expected a number >= 0, got -1.0",
        ),
        (
            "TIERMEM_IDS_TRIM_INTERVAL_S",
            "0",
            "ids_trim_interval_s: expected a number > 0, got 0.0",
        ),
    ],
)
def test_settings_reject_invalid_variable(variable, text, message):
    with pytest.raises(SettingsError) as raised:
        load_config(None, environ={variable: text})
    problems = raised.value.problems
    assert any(message in problem for problem in problems), problems


def test_settings_read_variables():
    environ = {"TIERMEM_IDS_RETENTION_S": "0", "TIERMEM_IDS_TRIM_INTERVAL_S": "60"}
    config = load_config(None, environ=environ)
    assert config.ids_retention_s == 0.0
    assert config.ids_trim_interval_s == 60.0


def test_settings_reject_retention_below_two_maintain_intervals():
    environ = {"TIERMEM_IDS_RETENTION_S": "100", "TIERMEM_MAINTAIN_INTERVAL_S": "60"}
    with pytest.raises(SettingsError) as raised:
        load_config(None, environ=environ)
    (problem,) = raised.value.problems
    assert problem.startswith("ids_retention_s: 100 is below twice maintain_interval_s (60)")
    assert "raise ids_retention_s to at least 120" in problem


def test_settings_accept_retention_of_two_maintain_intervals():
    environ = {"TIERMEM_IDS_RETENTION_S": "120", "TIERMEM_MAINTAIN_INTERVAL_S": "60"}
    assert load_config(None, environ=environ).ids_retention_s == 120.0


def test_beat_schedules_trim(tmp_path):
    config = StackConfig(
        data_dir=str(tmp_path), broker_url=BROKER, ids_trim_interval_s=90.0
    )
    app = create_app(config)
    entry = app.conf.beat_schedule["trim-ids"]
    assert entry["task"] == TRIM_IDS_TASK
    assert entry["schedule"].total_seconds() == 90.0
    assert entry["options"]["queue"] == "maintenance"
    assert entry["options"]["expires"] == 90.0


def test_trim_task_routed_to_maintenance(tmp_path):
    app = create_app(StackConfig(data_dir=str(tmp_path), broker_url=BROKER))
    assert app.amqp.router.route({}, TRIM_IDS_TASK)["queue"].name == "maintenance"


def test_worker_imports_trim_module():
    assert "replay.tasks.id_index" in importable_task_modules(TASK_MODULES)
