"""The check over ZeroMQ: a router with real Redis tiers, shared use, and a broken router.

These use the `start_router` fixture (a router in this process with local
shards over private Redis servers on random ports), so they need no Ray.
"""

from __future__ import annotations

import threading

import pytest

from bus.client import Client
from events.log import RedisEventLog
from events.types import Ack, Get, Store, Value
from tiermem.check.machine import CheckSettings
from tiermem.check.remote import STACK_POLICY, RemoteTarget
from tiermem.check.runner import run_check
from tiermem.commands.check import _require_empty

pytestmark = pytest.mark.integration

SEED = 4_242


def check(
    target: RemoteTarget,
    examples: int,
    *,
    settings: CheckSettings | None = None,
    shrink: bool = False,
):
    return run_check(
        target,
        settings=settings,
        examples=examples,
        steps=20,
        seed=SEED,
        shrink=shrink,
        prefix=lambda number: f"check/x{number}/",
    )


def test_stack_target_passes(start_router, servers):
    router = start_router(shards=2, policy=STACK_POLICY)
    target = RemoteTarget(
        router.endpoints, shards=2, policy=STACK_POLICY, event_log=servers.event_log()
    )
    try:
        result = check(target, 12)
    finally:
        target.close()
    assert result.passed, f"{result.failure}\n{result.traceback}"
    assert result.examples >= 12


def test_stack_target_reads_log_over_bus(start_router):
    router = start_router(shards=2, policy=STACK_POLICY)
    target = RemoteTarget(router.endpoints, shards=2, policy=STACK_POLICY)
    try:
        result = check(target, 6)
    finally:
        target.close()
    assert result.passed, f"{result.failure}\n{result.traceback}"


def test_deployment_target_keeps_to_its_namespaces(start_router, servers):
    """Other clients keep writing; the check ignores them and cleans up after itself."""
    router = start_router(shards=2, policy=STACK_POLICY)
    with router.client() as client:
        client.store("keep", "user data", namespace="tenant")
    stop = threading.Event()

    def other_tenant() -> None:
        with Client(router.endpoints) as client:
            number = 0
            while not stop.is_set():
                number += 1
                client.pipeline(
                    [
                        Store(
                            namespace="tenant", key=f"busy{number % 7}", value=number
                        ),
                        Get(namespace="tenant", key="keep"),
                    ]
                )

    traffic = threading.Thread(target=other_tenant, name="other-tenant")
    traffic.start()
    settings = CheckSettings(ttls=(None, 86_400), global_maintain=False, faults=False)
    target = RemoteTarget(
        router.endpoints,
        shards=2,
        policy=STACK_POLICY,
        exclusive=False,
        name="endpoint",
    )
    try:
        result = check(target, 8, settings=settings)
    finally:
        stop.set()
        traffic.join(timeout=30)
        target.close()
    logged = [event for batch in servers.event_log().iter_from(0) for event in batch]
    ours = [event for event in logged if event.id and event.id.startswith("check/")]
    with router.client() as client:
        kept = client.get("keep", namespace="tenant")
        leftover = [
            client.get(event.key, namespace=event.namespace)
            for event in ours
            if isinstance(event, Store)
        ]
    assert result.passed, f"{result.failure}\n{result.traceback}"
    assert ours, "the check logged nothing"
    assert all((event.namespace or "").startswith("check/") for event in ours)
    assert isinstance(kept, Value)
    assert kept.value == "user data"
    assert not [reply for reply in leftover if isinstance(reply, Value)]


def test_router_without_deduplication_fails(start_router, servers, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(RedisEventLog, "lookup", lambda self, ids: [None] * len(ids))
        router = start_router(shards=2, policy=STACK_POLICY)
        target = RemoteTarget(
            router.endpoints,
            shards=2,
            policy=STACK_POLICY,
            event_log=servers.event_log(),
        )
        try:
            broken = check(target, 60)
        finally:
            target.close()
            router.stop()
    assert not broken.passed
    assert "duplicate" in (broken.failure or "") or "logged again" in (
        broken.failure or ""
    )


def test_store_acked_while_stm_down_survives(start_router, servers):
    """A Store acknowledged while STM is down is readable once STM is back.

    The check found this losing the Store (a failed apply dropped its
    batch); the shard's circuit breaker now applies it from the log.
    """
    router = start_router(shards=1)
    with router.client(timeout=5) as client:
        servers.stm.kill()
        (acked,) = client.pipeline([Store(key="k", value=1)])
        servers.stm.start()
        (read,) = client.pipeline([Get(key="k")])
    assert isinstance(acked, Ack)
    assert acked.seq == 1
    assert isinstance(read, Value)
    assert read.value == 1


def test_stack_target_rejects_router_with_records(start_router):
    """A router that already contains memories would make every tier count differ from the model."""
    router = start_router(shards=2, policy=STACK_POLICY)
    with router.client() as client:
        client.store("mine", "user data", namespace="tenant")

    with pytest.raises(SystemExit, match=r"already contains records \(shard (\d) cache: 1, shard \1 stm: 1\)"):
        _require_empty(router.endpoints)


def test_stack_target_accepts_empty_router(start_router):
    router = start_router(shards=2, policy=STACK_POLICY)

    _require_empty(router.endpoints)
