"""The Celery app's settings, routes, task modules and event ids, without a broker.

Every test builds its own app with `create_app(config)`. None touches the
module-level `replay.celery_app.app`, because that app reads
`TIERMEM_CONFIG` once per process, and the tests that run a worker set it.
"""

from __future__ import annotations

import json

import pytest
from celery.exceptions import QueueNotFound
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads

from events.errors import TiermemError
from replay.celery_app import (
    CONFIG_ENV,
    MAINTAIN_TASK,
    QUEUES,
    create_app,
    current_slot,
    importable_task_modules,
    settings_from_environment,
)
from replay.tasks.maintenance import maintenance_event_id
from replay.tasks.memory import task_event_id
from tiermem.config import StackConfig, write_stack_config

BROKER = "redis://127.0.0.1:1/0"


@pytest.fixture
def app(tmp_path):
    return create_app(StackConfig(data_dir=str(tmp_path), broker_url=BROKER, broker_visibility_timeout_s=120))


def test_broker_and_results_use_broker_url(app):
    assert app.conf.broker_url == BROKER
    assert app.conf.result_backend == BROKER


def test_settings_are_json_only(app):
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"
    assert app.conf.event_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]
    assert list(app.conf.result_accept_content) == ["json"]


@pytest.mark.parametrize("side", ["tasks", "results"])
def test_pickle_content_rejected(app, side):
    accept = app.conf.accept_content if side == "tasks" else app.backend.accept
    content_type, encoding, payload = dumps({"type": "Store"}, serializer="pickle")
    with pytest.raises(ContentDisallowed):
        loads(payload, content_type, encoding, accept=accept)


def test_json_content_accepted(app):
    content_type, encoding, payload = dumps({"type": "Store"}, serializer="json")
    assert loads(payload, content_type, encoding, accept=app.backend.accept) == {"type": "Store"}


def test_tasks_acknowledged_late(app):
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.worker_cancel_long_running_tasks_on_connection_loss is True


def test_visibility_timeout_from_config(app):
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] == 120
    assert options["unacked_restore_interval"] == 10
    assert options["unacked_restore_throttle"] == 1


def test_short_visibility_timeout_sweeps_as_often(tmp_path):
    app = create_app(StackConfig(data_dir=str(tmp_path), broker_url=BROKER, broker_visibility_timeout_s=3))
    assert app.conf.broker_transport_options["unacked_restore_interval"] == 3


def test_queues_declared(app):
    assert sorted(app.amqp.queues) == sorted(QUEUES)
    for name in QUEUES:
        assert app.amqp.queues[name].routing_key == name


@pytest.mark.parametrize(
    ("task", "queue"),
    [
        ("tiermem.memory.publish_event", "memory_ops"),
        ("tiermem.memory.store_memory", "memory_ops"),
        (MAINTAIN_TASK, "maintenance"),
        ("tiermem.projections.apply_batch", "processing"),
        ("replay.tasks.projections.apply_batch", "processing"),
        ("tiermem.replay.verify_shard", "replay"),
        ("replay.tasks.replay.rebuild", "replay"),
        ("someone.else.task", "processing"),
    ],
)
def test_task_routes(app, task, queue):
    assert app.amqp.router.route({}, task)["queue"].name == queue


def test_unknown_queue_rejected(app):
    with pytest.raises(QueueNotFound):
        app.amqp.router.route({"queue": "memory-ops"}, "tiermem.memory.publish_event")


def test_missing_broker_url_raises(tmp_path):
    app = create_app(StackConfig(data_dir=str(tmp_path)))
    with pytest.raises(TiermemError, match="broker_url is not set"):
        app.conf.broker_url


def test_settings_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "stack.json"
    write_stack_config(StackConfig(data_dir=str(tmp_path), broker_url=BROKER), path)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    settings = settings_from_environment()
    assert settings["broker_url"] == BROKER
    assert settings["tiermem_stack"].data_dir == str(tmp_path)


def test_settings_without_environment_raise(monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    with pytest.raises(TiermemError, match="TIERMEM_CONFIG is not set"):
        settings_from_environment()


def test_settings_with_missing_file_raise(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "nowhere" / "stack.json"))
    with pytest.raises(TiermemError, match="does not exist"):
        settings_from_environment()


def test_task_modules_skip_missing():
    found = importable_task_modules(("replay.tasks.memory", "replay.tasks.not_written_yet"))
    assert found == ["replay.tasks.memory"]


def test_app_includes_own_task_modules(app):
    assert "replay.tasks.memory" in app.conf.include
    assert "replay.tasks.maintenance" in app.conf.include


def test_beat_schedules_maintain(app):
    entry = app.conf.beat_schedule["maintain"]
    assert entry["task"] == MAINTAIN_TASK
    assert entry["options"]["queue"] == "maintenance"
    assert entry["schedule"].run_every.total_seconds() == 60.0
    assert entry["kwargs"]["interval_s"] == 60.0
    assert abs(entry["kwargs"]["slot"]() - current_slot(60.0)) <= 1


def test_beat_state_file_is_json(app, tmp_path):
    assert app.conf.beat_scheduler == "replay.celery_app:JsonScheduler"
    assert app.conf.beat_schedule_filename == str(tmp_path / "celerybeat-schedule.json")


def test_task_event_id_stable():
    assert task_event_id("0b1c") == "celery:0b1c"
    assert task_event_id("0b1c") == task_event_id("0b1c")


def test_task_event_id_hashes_long_ids():
    long_id = "x" * 500
    event_id = task_event_id(long_id)
    assert len(event_id.encode()) <= 128
    assert event_id == task_event_id(long_id)
    assert event_id != task_event_id("y" * 500)


def test_maintenance_event_id_names_interval_and_slot():
    assert maintenance_event_id(60.0, 29361234) == "maintain:60000ms:29361234"
    assert maintenance_event_id(0.5, 7) == "maintain:500ms:7"
    assert maintenance_event_id(60.0, 7) != maintenance_event_id(30.0, 7)


@pytest.mark.parametrize(
    ("field", "value"),
    [("maintain_interval_s", 0.0), ("celery_concurrency", 0), ("broker_visibility_timeout_s", 0)],
)
def test_config_rejects_invalid_celery_fields(field, value):
    with pytest.raises(ValueError, match=field):
        StackConfig(**{field: value})


def test_config_round_trips_celery_fields(tmp_path):
    config = StackConfig(broker_url=BROKER, maintain_interval_s=1.5, celery_concurrency=3)
    path = tmp_path / "stack.json"
    write_stack_config(config, path)
    stored = json.loads(path.read_text())
    assert stored["broker_url"] == BROKER
    assert stored["maintain_interval_s"] == 1.5
    assert stored["celery_concurrency"] == 3
