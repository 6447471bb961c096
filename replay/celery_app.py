"""The Celery application: broker, JSON-only messages, queues, routes and beat.

`celery -A replay.celery_app worker` and `celery -A replay.celery_app beat`
run this module's `app`. It reads the stack's settings from the file named
by `TIERMEM_CONFIG` (the `DIR/stack.json` that `tiermem up` writes) the first
time Celery needs its configuration, and it reads that file once per
process. Code that talks to another stack in the same process builds its
own app with `create_app(config)`.

Every message is JSON, in both directions: tasks, results and worker
events. Pickle is rejected on receipt, because unpickling a message from a
broker runs whatever code the sender chose.

Tasks are acknowledged after they finish (`task_acks_late`), and a task
whose pool process dies is put back on its queue
(`task_reject_on_worker_lost`), so every task must be safe to run twice.
The tasks here are: each one sends its event under an id derived from the
task id or the schedule slot, and the router replies to a repeated id with
the original acknowledgement instead of logging the event again.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import structlog
from celery import Celery, beat, schedules, signals
from kombu import Exchange, Queue

from events.errors import TiermemError
from tiermem.config import StackConfig, load_stack_config

__all__ = [
    "CONFIG_ENV",
    "JsonScheduler",
    "MAINTAIN_TASK",
    "PROJECTIONS_TASK",
    "SNAPSHOT_TASK",
    "TRIM_IDS_TASK",
    "QUEUES",
    "SlotSchedule",
    "TASK_MODULES",
    "app",
    "celery_settings",
    "create_app",
    "current_slot",
    "importable_task_modules",
    "read_schedule_state",
    "schedule_path",
    "settings_from_environment",
    "slot_number",
]

log = structlog.get_logger("tiermem.celery")

CONFIG_ENV = "TIERMEM_CONFIG"

# memory_ops carries the writes of applications, processing the projections,
# maintenance the Maintain that beat schedules, and replay the rebuild and
# verify jobs.
QUEUES = ("memory_ops", "processing", "maintenance", "replay")

TASK_MODULES = (
    "replay.tasks.memory",
    "replay.tasks.maintenance",
    "replay.tasks.projections",
    "replay.tasks.replay",
    "replay.tasks.erase",
    "replay.tasks.id_index",
)

MAINTAIN_TASK = "tiermem.maintenance.maintain"
PROJECTIONS_TASK = "tiermem.projections.run"
SNAPSHOT_TASK = "tiermem.replay.snapshot_shard"
ERASE_TASK = "tiermem.maintenance.erase"
TRIM_IDS_TASK = "tiermem.maintenance.trim_ids"

# Each queue takes the tasks named `tiermem.<area>.*` and, for tasks left
# with Celery's default name, those named after their module.
ROUTES = (
    ("tiermem.memory.*", "memory_ops"),
    ("replay.tasks.memory.*", "memory_ops"),
    ("tiermem.projections.*", "processing"),
    ("replay.tasks.projections.*", "processing"),
    ("tiermem.maintenance.*", "maintenance"),
    ("replay.tasks.maintenance.*", "maintenance"),
    ("tiermem.replay.*", "replay"),
    ("replay.tasks.replay.*", "replay"),
)

# kombu's Redis transport (5.7) sweeps for deliveries older than the
# visibility timeout every `unacked_restore_interval` seconds. The default is
# 10, and by default only every tenth sweep scans, unless the throttle is 1.
_MAX_RESTORE_INTERVAL_S = 10


def importable_task_modules(candidates: tuple[str, ...] = TASK_MODULES) -> list[str]:
    """Return the task modules of `candidates` that exist in this installation.

    The projection and replay task modules are developed separately, so a
    checkout may lack them. A missing module is left out, so the worker
    still starts and serves the queues whose tasks exist. A module that
    exists but fails to import still stops the worker at start.
    """
    return [name for name in candidates if importlib.util.find_spec(name) is not None]


def schedule_path(config: StackConfig) -> Path:
    """Return where beat keeps its schedule state: `DIR/celerybeat-schedule.json`."""
    return Path(config.data_dir) / "celerybeat-schedule.json"


def celery_settings(config: StackConfig) -> dict[str, Any]:
    """Build the Celery configuration for one stack."""
    if not config.broker_url:
        raise TiermemError(
            "broker_url is not set in the stack config: start the stack with "
            "`tiermem up`, which starts a broker Redis, or set broker_url"
        )
    visibility_timeout = config.broker_visibility_timeout_s
    interval = config.maintain_interval_s
    return {
        "broker_url": config.broker_url,
        "result_backend": config.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": min(_MAX_RESTORE_INTERVAL_S, visibility_timeout),
            "unacked_restore_throttle": 1,
        },
        # result_accept_content defaults to accept_content. It is set anyway,
        # so that widening accept_content cannot let pickle into results.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A late-acknowledged task whose worker loses the broker connection
        # can no longer be acknowledged, and the broker delivers it again, so
        # the worker cancels it rather than run it beside the new delivery.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # The worker reserves one task per pool process, so a long task does
        # not hold back tasks that another, idle worker could run.
        "worker_prefetch_multiplier": 1,
        "task_queues": [
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES
        ],
        "task_routes": ([(pattern, {"queue": queue}) for pattern, queue in ROUTES],),
        # A task that no route names goes to a queue the worker consumes,
        # instead of Celery's default queue `celery`, which nothing consumes.
        "task_default_queue": "processing",
        "task_create_missing_queues": False,
        # structlog writes JSON lines to standard error itself. Celery's
        # redirect would wrap each line in a stdlib log record.
        "worker_redirect_stdouts": False,
        "enable_utc": True,
        "timezone": "UTC",
        "beat_scheduler": "replay.celery_app:JsonScheduler",
        "beat_schedule_filename": str(schedule_path(config)),
        "beat_sync_every": 1,
        "beat_schedule": {
            "maintain": {
                "task": MAINTAIN_TASK,
                "schedule": SlotSchedule(timedelta(seconds=interval)),
                # Beat calls the BeatLazyFunc when it sends, so the slot is
                # fixed in the message and a redelivery carries the same one.
                "kwargs": {
                    "slot": beat.BeatLazyFunc(current_slot, interval),
                    "interval_s": interval,
                },
                # A pass still queued when the next slot begins is dropped,
                # because the next pass does the same work on newer state.
                "options": {"queue": "maintenance", "expires": interval},
            },
            # Projections catch up in coarse runs; an idle run costs one read
            # of the log's end. A run still queued at the next tick is dropped.
            "projections": {
                "task": PROJECTIONS_TASK,
                "schedule": timedelta(seconds=config.projection_interval_s),
                "kwargs": {"max_seconds": max(1.0, config.projection_interval_s * 5)},
                "options": {"queue": "processing", "expires": config.projection_interval_s * 2},
            },
            # Erasure passes rewrite what a Forget could not remove at once;
            # a pass with nothing new to do is one Redis read.
            "erase": {
                "task": ERASE_TASK,
                "schedule": timedelta(seconds=config.erase_interval_s),
                "options": {"queue": "maintenance", "expires": config.erase_interval_s * 2},
            },
            # Each run removes the ids older than ids_retention_s from the
            # log's id index. A run still queued at the next tick is dropped.
            "trim-ids": {
                "task": TRIM_IDS_TASK,
                "schedule": timedelta(seconds=config.ids_trim_interval_s),
                "options": {"queue": "maintenance", "expires": config.ids_trim_interval_s},
            },
            **{
                f"snapshot-{shard}": {
                    "task": SNAPSHOT_TASK,
                    "schedule": timedelta(seconds=config.snapshot_interval_s),
                    "kwargs": {"shard": shard},
                    "options": {"queue": "replay", "expires": config.snapshot_interval_s},
                }
                for shard in range(config.shards)
            },
        },
        # The tasks read the stack's data directory and limits from here.
        "tiermem_stack": config,
    }


def settings_from_environment() -> dict[str, Any]:
    """Build the Celery configuration for the stack whose stack.json `TIERMEM_CONFIG` names."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise TiermemError(
            f"{CONFIG_ENV} is not set: set it to the stack.json that "
            "`tiermem up --data-dir DIR` writes (DIR/stack.json)"
        )
    try:
        config = load_stack_config(Path(path))
    except FileNotFoundError:
        raise TiermemError(
            f"{CONFIG_ENV}={path!r} does not exist: start the stack with "
            "`tiermem up` first, or point the variable at its DIR/stack.json"
        ) from None
    return celery_settings(config)


def create_app(config: StackConfig | None = None) -> Celery:
    """Create a Celery app for `config`, or for the stack named by `TIERMEM_CONFIG`.

    The configuration is built when Celery first needs it, so importing
    this module does not require the variable to be set.
    """
    # replay.metrics connects the worker's signal handlers (its metrics endpoint).
    app = Celery("tiermem", include=[*importable_task_modules(), "replay.metrics"], set_as_current=config is None)
    if config is None:
        app.add_defaults(settings_from_environment)
    else:
        app.add_defaults(lambda: celery_settings(config))
    return app


# ----------------------------------------------------------------- beat


def slot_number(unix_time: float, interval_s: float) -> int:
    """Return the index of the slot of length `interval_s` that contains `unix_time`."""
    return math.floor(unix_time / interval_s)


def current_slot(interval_s: float) -> int:
    return slot_number(time.time(), interval_s)


class SlotSchedule(schedules.schedule):
    """An interval schedule aligned to the Unix epoch: due once in each slot.

    Celery's plain interval schedule counts from the last run, so its runs
    drift and two of them can fall into one slot. This one is due as soon as
    the clock enters a slot later than that of the last run, so one beat
    sends each slot number at most once, unless the clock is set back.
    """

    def is_due(self, last_run_at: datetime) -> schedules.schedstate:
        interval = self.run_every.total_seconds()
        if last_run_at.tzinfo is None:
            last_run_at = last_run_at.replace(tzinfo=timezone.utc)
        now = self.now().timestamp()
        current = slot_number(now, interval)
        due = current > slot_number(last_run_at.timestamp(), interval)
        return schedules.schedstate(due, (current + 1) * interval - now)


class _EntryState(msgspec.Struct):
    last_run_at: datetime
    total_run_count: int = 0


class ScheduleState(msgspec.Struct):
    """The contents of beat's schedule file."""

    beat_pid: int
    entries: dict[str, _EntryState] = {}


def read_schedule_state(path: Path) -> ScheduleState | None:
    """Return the schedule file's contents, or None if it is missing or unreadable."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=ScheduleState)
    except FileNotFoundError:
        return None
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        log.warning(
            "celery.beat.schedule_unreadable",
            path=str(path),
            error=str(error),
            next="start with an empty schedule",
        )
        return None


class JsonScheduler(beat.Scheduler):
    """Beat's scheduler, with each entry's last run kept in a JSON file.

    Celery's default `PersistentScheduler` keeps the same state in a
    `shelve` file, which is pickle. The file also records the pid of the
    beat that wrote it, so a supervisor can tell when beat has started.
    """

    def __init__(self, *args: Any, schedule_filename: str | None = None, **kwargs: Any) -> None:
        self.schedule_filename = schedule_filename
        super().__init__(*args, **kwargs)

    @property
    def path(self) -> Path:
        return Path(self.schedule_filename or self.app.conf.beat_schedule_filename)

    def setup_schedule(self) -> None:
        super().setup_schedule()
        stored = read_schedule_state(self.path)
        if stored is not None:
            for name, entry in self.data.items():
                state = stored.entries.get(name)
                if state is not None:
                    entry.last_run_at = state.last_run_at
                    entry.total_run_count = state.total_run_count
        self.sync()

    def sync(self) -> None:
        state = ScheduleState(
            beat_pid=os.getpid(),
            entries={
                name: _EntryState(entry.last_run_at, entry.total_run_count)
                for name, entry in self.data.items()
            },
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(state))
        tmp.replace(self.path)

    def close(self) -> None:
        super().close()
        log.info("celery.beat.stopped", pid=os.getpid(), schedule=str(self.path))

    @property
    def info(self) -> str:
        return f"    . state -> {self.path}"


# -------------------------------------------------------------- logging


@signals.after_setup_logger.connect
def _configure_structlog(**_: Any) -> None:
    """Configure structlog once Celery has set up logging in a worker or beat."""
    from tiermem.logs import configure_logging

    configure_logging()


@signals.worker_ready.connect
def _log_worker_started(sender: Any = None, **_: Any) -> None:
    queues = sorted(queue.name for queue in sender.app.amqp.queues.consume_from.values())
    log.info("celery.worker.started", hostname=sender.hostname, pid=os.getpid(), queues=queues)


@signals.worker_shutdown.connect
def _log_worker_stopped(sender: Any = None, **_: Any) -> None:
    log.info("celery.worker.stopped", hostname=getattr(sender, "hostname", None), pid=os.getpid())


@signals.beat_init.connect
def _log_beat_started(sender: Any = None, **_: Any) -> None:
    log.info("celery.beat.started", pid=os.getpid(), scheduler=type(sender.scheduler).__name__)


@signals.task_failure.connect
def _log_task_failed(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    **_: Any,
) -> None:
    log.error(
        "celery.task.failed",
        task=getattr(sender, "name", None),
        task_id=task_id,
        error=repr(exception),
    )


app = create_app()
