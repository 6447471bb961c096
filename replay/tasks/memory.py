"""The memory_ops tasks: send events to the bus from any Celery application.

`publish_event.delay({"type": "Store", ...})` sends one event, written as
the JSON object of docs/protocol.md, and the task's result is the router's
reply as a dict (`{"type": "Ack", "seq": 41, ...}`). An event without an id
gets one derived from the Celery task id. A task that runs again, because
its worker was killed after sending or because it was retried, therefore
resends the same id, and the router replies with the first acknowledgement
instead of logging the event twice.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import msgspec
import structlog
from celery import Task

from bus.client import Client, ClientError, RequestTimeout, load_endpoints
from events.codec import decode_request
from events.errors import ErrorCode, ProtocolError, TiermemError
from events.types import Busy, Error, Event, Message
from events.upcast import CURRENT_VERSIONS
from replay.celery_app import app
from tiermem.config import StackConfig

__all__ = ["PublishFailed", "publish_event", "send_event", "store_memory", "task_event_id"]

log = structlog.get_logger("tiermem.celery.memory")

LANES = ("high", "normal", "low")

# One attempt of a task waits up to REQUEST_TIMEOUT_S per send, and sends
# REQUEST_ATTEMPTS times, before the task is retried with a backoff of
# 1, 2, 4 ... seconds, capped at RETRY_BACKOFF_MAX_S. The cap stays far below
# the broker's default visibility timeout (an hour), past which Redis would
# deliver a waiting retry to a second worker.
REQUEST_TIMEOUT_S = 5.0
REQUEST_ATTEMPTS = 3
MAX_RETRIES = 10
RETRY_BACKOFF_MAX_S = 30

_RETRYABLE_CODES = (ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL)

_clients = threading.local()


class PublishFailed(TiermemError):
    """The bus did not acknowledge an event after every retry of its task."""


def task_event_id(task_id: str, max_bytes: int = 128) -> str:
    """Return the event id for the task `task_id`: `celery:<task id>`.

    A task id too long for an event id (callers may choose their own task
    ids) is replaced by its SHA-256, so the result is still stable.
    """
    event_id = f"celery:{task_id}"
    if len(event_id.encode()) <= max_bytes:
        return event_id
    return "celery:sha256:" + hashlib.sha256(task_id.encode()).hexdigest()


def _bus_client(data_dir: str) -> Client:
    """Return this thread's client, reconnected if `DIR/endpoints.json` changed.

    The endpoints are read on every call, so a router restarted on other
    ports is found without restarting the worker.
    """
    endpoints = {lane: url for lane, url in load_endpoints(Path(data_dir)).items() if lane in LANES}
    client: Client | None = getattr(_clients, "client", None)
    if client is not None and client.endpoints == endpoints:
        return client
    if client is not None:
        client.close()
    client = Client(endpoints, timeout=REQUEST_TIMEOUT_S, attempts=REQUEST_ATTEMPTS)
    _clients.client = client
    return client


def _stack(task: Task) -> StackConfig:
    return task.app.conf.tiermem_stack


def _retry(task: Task, message: Message, lane: str, reason: str) -> NoReturn:
    """Raise Celery's retry for `task`, or `PublishFailed` once the retries are spent."""
    countdown = min(RETRY_BACKOFF_MAX_S, 2 ** task.request.retries)
    error = PublishFailed(
        f"{type(message).__name__} {message.id!r} was not acknowledged on lane {lane!r} "
        f"after {task.request.retries + 1} task attempts: {reason}. Resending it "
        "with the same id is safe."
    )
    if task.request.retries < (task.max_retries or 0):
        log.warning(
            "celery.task.retrying",
            task_id=task.request.id,
            event_id=message.id,
            attempt=task.request.retries + 1,
            countdown_s=countdown,
            reason=reason,
            next="retry with the same event id",
        )
    raise task.retry(exc=error, countdown=countdown)


def send_event(task: Task, message: Message, lane: str) -> dict[str, Any]:
    """Send `message` on `lane` and return the router's reply as a dict.

    Timeouts, `Busy` and the retryable `Error` codes retry the task. Any
    other `Error` is logged and returned, because sending the same event
    again gets the same `Error`.
    """
    with structlog.contextvars.bound_contextvars(task_id=task.request.id, event_id=message.id):
        try:
            client = _bus_client(_stack(task).data_dir)
        except TiermemError as error:
            # endpoints.json is missing: the router has not started yet.
            _retry(task, message, lane, str(error))
        try:
            reply = client.request(message, lane=lane)
        except RequestTimeout as error:
            _retry(task, message, lane, str(error))
        except ClientError as error:
            if error.reply.code in _RETRYABLE_CODES:
                _retry(task, message, lane, f"{error.reply.code}: {error.reply.message}")
            log.error(
                "celery.event.rejected",
                task_id=task.request.id,
                event_id=message.id,
                code=error.reply.code,
                field=error.reply.field,
                error=error.reply.message,
            )
            return msgspec.to_builtins(error.reply)
        if isinstance(reply, Busy):
            _retry(task, message, lane, f"the {reply.lane} lane stayed busy")
        return msgspec.to_builtins(reply)


def _decode(event: Any, task: Task) -> Message | Error:
    """Check `event` as the router would, and give it the task's event id if it has none."""
    limits = _stack(task).router.limits
    try:
        message, _ = decode_request(msgspec.json.encode(event), limits)
    except ProtocolError as error:
        return Error(id=error.event_id, code=error.code, message=error.message, field=error.field)
    if not isinstance(message, Event):
        kind = type(message).__name__
        return Error(
            id=message.id,
            code=ErrorCode.INVALID_FIELD,
            message=(
                f"{kind} is an admin request, not an event: publish_event "
                "sends Store, Get, Forget, Maintain and Search"
            ),
            field="$.type",
        )
    if message.id is None and task.request.id is not None:
        event_id = task_event_id(task.request.id, limits.max_id_bytes)
        message = msgspec.structs.replace(message, id=event_id)
    return message


def _publish(task: Task, event: Any, lane: str) -> dict[str, Any]:
    if lane not in LANES:
        raise ValueError(f"lane {lane!r} is not one of {', '.join(LANES)}")
    message = _decode(event, task)
    if isinstance(message, Error):
        log.error(
            "celery.event.invalid",
            task_id=task.request.id,
            event_id=message.id,
            code=message.code,
            field=message.field,
            error=message.message,
        )
        return msgspec.to_builtins(message)
    return send_event(task, message, lane)


@app.task(bind=True, name="tiermem.memory.publish_event", max_retries=MAX_RETRIES)
def publish_event(self: Task, event: dict[str, Any], lane: str = "normal") -> dict[str, Any]:
    """Send one event to the bus; return the router's reply as a dict.

    `event` is a JSON object as in docs/protocol.md. An invalid event is
    not sent, and the result is the `Error` the router would have sent.
    """
    return _publish(self, event, lane)


@app.task(bind=True, name="tiermem.memory.store_memory", max_retries=MAX_RETRIES)
def store_memory(
    self: Task,
    namespace: str,
    key: str,
    value: Any,
    importance: float = 0.5,
    tags: Iterable[str] = (),
    ttl_s: int | None = None,
    lane: str = "normal",
) -> dict[str, Any]:
    """Store one memory (a `Store` event); return the router's reply as a dict."""
    event = {
        "type": "Store",
        "v": CURRENT_VERSIONS["Store"],
        "namespace": namespace,
        "key": key,
        "value": value,
        "importance": importance,
        "tags": list(tags),
        "ttl_s": ttl_s,
    }
    return _publish(self, event, lane)
