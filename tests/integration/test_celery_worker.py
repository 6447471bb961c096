"""The Celery tasks on a real worker: publishing, idempotency, kill -9, JSON only.

One worker, started by `Stack.start_worker` on a broker Redis of its own,
serves the whole module. It sends to a router that runs in this process
with in-process shards. A test can therefore hold the router just after an
event is durable, and kill the worker before the task finishes.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from bus.client import Client
from bus.dispatch import LocalDispatcher, Waker
from bus.router import Router
from events.log import RedisEventLog
from events.types import Event, Value
from handlers.actor import ShardSettings, build_shard
from tiermem.config import StackConfig, write_stack_config
from tiermem.servers import RedisServer
from tiermem.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Short, so that the task of a worker killed outright comes back within
# seconds. Every task in this module finishes well within it.
VISIBILITY_TIMEOUT_S = 3

# A healthy task here finishes in well under a second. A task that cannot
# reach the bus keeps retrying for minutes, so the wait for it is cut short.
RESULT_TIMEOUT_S = 30


class GatedLog:
    """An event log that can hold the router right after one event is durable."""

    def __init__(self, inner: RedisEventLog) -> None:
        self.inner = inner
        self._gates: dict[str, tuple[threading.Event, threading.Event]] = {}

    def hold_after(self, event_id: str) -> tuple[threading.Event, threading.Event]:
        """Block the append that contains `event_id` once it is durable.

        Returns (appended, release). `appended` is set when the event is in
        the log, and the router stays blocked until `release` is set.
        """
        gate = (threading.Event(), threading.Event())
        self._gates[event_id] = gate
        return gate

    def append(self, events, body_hashes):
        written = self.inner.append(events, body_hashes)
        for event in events:
            gate = self._gates.pop(event.id or "", None)
            if gate is not None:
                appended, release = gate
                appended.set()
                release.wait(timeout=120)
        return written

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class CeleryStack:
    def __init__(self, stack: Stack, event_log: GatedLog, endpoints: dict[str, str]) -> None:
        self.stack = stack
        self.event_log = event_log
        self.endpoints = endpoints

    def client(self) -> Client:
        return Client(self.endpoints, timeout=10)

    def logged(self, event_id: str) -> list[Event]:
        return [event for event in self.event_log.inner.read(0, 100_000) if event.id == event_id]


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory) -> Iterator[CeleryStack]:
    root = tmp_path_factory.mktemp("celery")
    servers = {role: RedisServer(root / role, role=role).start() for role in ("log", "stm", "im", "broker")}
    data_dir = root / "data"
    data_dir.mkdir()
    config = StackConfig(
        data_dir=str(data_dir),
        shards=2,
        log_url=servers["log"].url,
        stm_url=servers["stm"].url,
        im_url=servers["im"].url,
        broker_url=servers["broker"].url,
        broker_visibility_timeout_s=VISIBILITY_TIMEOUT_S,
    )
    config.router = msgspec.structs.replace(config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0})

    waker = Waker()
    shards = [
        build_shard(
            ShardSettings(
                shard=index,
                shards=config.shards,
                log_url=config.log_url,
                stm_url=config.stm_url,
                im_url=config.im_url,
                ltm_dir=config.ltm_dir,
            )
        )
        for index in range(config.shards)
    ]
    for shard in shards:
        shard.recover()
    dispatcher = LocalDispatcher(shards, waker)
    event_log = GatedLog(RedisEventLog(redis.Redis.from_url(config.log_url)))
    router = Router(config.router, event_log, dispatcher, waker)
    endpoints = router.bind()
    thread = threading.Thread(target=router.serve_forever, name="router", daemon=True)
    thread.start()
    (data_dir / "endpoints.json").write_text(json.dumps(endpoints))
    write_stack_config(config, data_dir / "stack.json")

    stack = Stack(config, celery=True)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("TIERMEM_CONFIG", str(stack.config_path))
    try:
        from replay.celery_app import app

        if app.conf.broker_url != config.broker_url:
            pytest.fail(
                "replay.celery_app.app was configured by an earlier test for broker "
                f"{app.conf.broker_url}; it reads TIERMEM_CONFIG once per process"
            )
        stack.start_worker()
        yield CeleryStack(stack, event_log, endpoints)
    finally:
        stack.stop()
        monkeypatch.undo()
        router.stop()
        thread.join(timeout=30)
        router.close()
        dispatcher.close()
        waker.close()
        for server in reversed(servers.values()):
            server.stop()


def wait_for(condition, *, timeout: float, what: str):
    """Poll `condition` until it returns a true value, and return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def active_pool_pid(stack: Stack, task_id: str) -> int | None:
    """Return the pid of the pool process running `task_id`, if the worker reports one."""
    from replay.celery_app import app

    replies = app.control.inspect(destination=[stack.worker_name], timeout=1.0).active() or {}
    for tasks in replies.values():
        for task in tasks:
            if task["id"] == task_id:
                return task["worker_pid"]
    return None


# ----------------------------------------------------------------- publish


def test_publish_event_stores_memory(celery_stack):
    from replay.tasks.memory import publish_event

    event = {"type": "Store", "v": 2, "namespace": "celery-a", "key": "greeting", "value": {"text": "hello"}}
    result = publish_event.delay(event)
    reply = result.get(timeout=RESULT_TIMEOUT_S)
    with celery_stack.client() as client:
        found = client.get("greeting", namespace="celery-a")
    assert reply["type"] == "Ack"
    assert reply["id"] == f"celery:{result.id}"
    assert reply["duplicate"] is False
    assert isinstance(found, Value)
    assert found.value == {"text": "hello"}
    assert len(celery_stack.logged(f"celery:{result.id}")) == 1


def test_publish_event_keeps_caller_id(celery_stack):
    from replay.tasks.memory import publish_event

    event = {"type": "Store", "id": "caller-1", "namespace": "celery-a", "key": "k", "value": 1}
    reply = publish_event.delay(event, lane="high").get(timeout=RESULT_TIMEOUT_S)
    assert reply["type"] == "Ack"
    assert reply["id"] == "caller-1"
    assert len(celery_stack.logged("caller-1")) == 1


def test_publish_event_get_returns_value(celery_stack):
    from replay.tasks.memory import publish_event, store_memory

    stored = store_memory.delay("celery-b", "color", "blue", importance=0.9, tags=["prefs"])
    # The Get is sent after the Store is acknowledged, so it is sequenced after it.
    stored = stored.get(timeout=RESULT_TIMEOUT_S)
    read = publish_event.delay({"type": "Get", "namespace": "celery-b", "key": "color"})
    read = read.get(timeout=RESULT_TIMEOUT_S)
    assert stored["type"] == "Ack"
    assert read["type"] == "Value"
    assert read["value"] == "blue"
    assert read["importance"] == 0.9
    assert read["tags"] == ["prefs"]


def test_publish_event_invalid_returns_error(celery_stack):
    from replay.tasks.memory import publish_event

    result = publish_event.delay({"type": "Store", "namespace": "celery-a", "key": "k", "value": 1, "importance": 7})
    reply = result.get(timeout=RESULT_TIMEOUT_S)
    assert reply["type"] == "Error"
    assert reply["code"] == "invalid_field"
    assert reply["field"] == "$.importance"
    assert celery_stack.logged(f"celery:{result.id}") == []


def test_publish_event_rejects_admin_request(celery_stack):
    from replay.tasks.memory import publish_event

    reply = publish_event.delay({"type": "Status"}).get(timeout=RESULT_TIMEOUT_S)
    assert reply["type"] == "Error"
    assert reply["code"] == "invalid_field"
    assert reply["field"] == "$.type"


def test_same_task_id_logs_one_event(celery_stack):
    from replay.tasks.memory import publish_event

    event = {"type": "Store", "namespace": "celery-c", "key": "once", "value": "x"}
    first_result = publish_event.apply_async(args=[event], task_id="fixed-task-id")
    first = first_result.get(timeout=RESULT_TIMEOUT_S)
    # Both runs store their result under the task id: drop the first, so
    # that the wait below is for the second run.
    first_result.forget()
    second_result = publish_event.apply_async(args=[event], task_id="fixed-task-id")
    second = second_result.get(timeout=RESULT_TIMEOUT_S)
    assert first["type"] == "Ack"
    assert first["duplicate"] is False
    assert second["type"] == "Ack"
    assert second["duplicate"] is True
    assert second["seq"] == first["seq"]
    assert len(celery_stack.logged("celery:fixed-task-id")) == 1


def test_publish_retries_until_router_found(celery_stack):
    from replay.tasks.memory import publish_event

    endpoints_path = Path(celery_stack.stack.data_dir, "endpoints.json")
    worker_log = Path(celery_stack.stack.data_dir, "logs", "celery-worker.log")
    saved = endpoints_path.read_text()
    endpoints_path.unlink()
    try:
        result = publish_event.delay({"type": "Store", "namespace": "celery-g", "key": "k", "value": 1})
        wait_for(
            lambda: f'"task_id": "{result.id}"' in worker_log.read_text()
            and "celery.task.retrying" in worker_log.read_text(),
            timeout=30,
            what="the task to log a retry",
        )
    finally:
        endpoints_path.write_text(saved)
    reply = result.get(timeout=RESULT_TIMEOUT_S)
    assert reply["type"] == "Ack"
    assert len(celery_stack.logged(f"celery:{result.id}")) == 1


# ------------------------------------------------------------- maintenance


def test_maintain_puts_maintain_in_log(celery_stack):
    from replay.tasks.maintenance import maintain, maintenance_event_id

    reply = maintain.delay(slot=1001, interval_s=60.0).get(timeout=RESULT_TIMEOUT_S)
    logged = celery_stack.logged(maintenance_event_id(60.0, 1001))
    assert reply["type"] == "Ack"
    assert len(logged) == 1
    assert type(logged[0]).__name__ == "Maintain"
    assert logged[0].namespace is None
    assert logged[0].ts is not None


def test_maintain_same_slot_logs_one_pass(celery_stack):
    from replay.tasks.maintenance import maintain, maintenance_event_id

    replies = []
    for _ in range(2):
        replies.append(maintain.delay(slot=2002, interval_s=60.0).get(timeout=RESULT_TIMEOUT_S))
    other = maintain.delay(slot=2003, interval_s=60.0).get(timeout=RESULT_TIMEOUT_S)
    assert [reply["duplicate"] for reply in replies] == [False, True]
    assert replies[1]["seq"] == replies[0]["seq"]
    assert other["seq"] > replies[0]["seq"]
    assert len(celery_stack.logged(maintenance_event_id(60.0, 2002))) == 1
    assert len(celery_stack.logged(maintenance_event_id(60.0, 2003))) == 1


# ------------------------------------------------------------------ faults


def test_pool_process_killed_redelivers_once(celery_stack):
    from replay.tasks.memory import publish_event

    task_id = "kill-pool-process"
    event_id = f"celery:{task_id}"
    appended, release = celery_stack.event_log.hold_after(event_id)
    event = {"type": "Store", "namespace": "celery-d", "key": "k", "value": "v"}
    result = publish_event.apply_async(args=[event], task_id=task_id)
    try:
        assert appended.wait(timeout=60), "the task's event never reached the log"
        pid = wait_for(lambda: active_pool_pid(celery_stack.stack, task_id), timeout=30, what="the task in inspect().active()")
        os.kill(pid, signal.SIGKILL)
    finally:
        release.set()
    reply = result.get(timeout=RESULT_TIMEOUT_S)
    assert reply["type"] == "Ack"
    assert reply["duplicate"] is True
    assert len(celery_stack.logged(event_id)) == 1


def test_worker_killed_redelivers_once(celery_stack):
    from replay.tasks.memory import publish_event

    task_id = "kill-whole-worker"
    event_id = f"celery:{task_id}"
    appended, release = celery_stack.event_log.hold_after(event_id)
    event = {"type": "Store", "namespace": "celery-e", "key": "k", "value": "v"}
    result = publish_event.apply_async(args=[event], task_id=task_id)
    try:
        assert appended.wait(timeout=60), "the task's event never reached the log"
        celery_stack.stack.kill_worker()
    finally:
        release.set()
    celery_stack.stack.start_worker()
    # The killed worker never acknowledged the task, so the broker delivers
    # it again once the visibility timeout has passed.
    reply = result.get(timeout=RESULT_TIMEOUT_S)
    assert reply["type"] == "Ack"
    assert reply["duplicate"] is True
    assert len(celery_stack.logged(event_id)) == 1


# ---------------------------------------------------------------- json only


def test_pickle_message_not_executed(celery_stack):
    from celery.result import AsyncResult
    from replay.tasks.memory import publish_event

    task_id = "pickled-task"
    worker_log = Path(celery_stack.stack.data_dir, "logs", "celery-worker.log")
    event = {"type": "Store", "namespace": "celery-f", "key": "k", "value": "v"}
    publish_event.apply_async(args=[event], task_id=task_id, serializer="pickle")
    wait_for(
        lambda: "Refusing to deserialize untrusted content of type pickle" in worker_log.read_text(),
        timeout=60,
        what="the worker to reject the pickled message",
    )
    # The worker discards the message before it reaches a pool process.
    later = {"type": "Store", "namespace": "celery-f", "key": "k2", "value": "v"}
    after = publish_event.delay(later).get(timeout=RESULT_TIMEOUT_S)
    assert after["type"] == "Ack"
    assert AsyncResult(task_id, app=publish_event.app).state == "PENDING"
    assert celery_stack.logged(f"celery:{task_id}") == []
    with celery_stack.client() as client:
        assert type(client.get("k", namespace="celery-f")).__name__ == "NotFound"
