"""Idempotency for the whole log, and optimistic concurrency on keys."""

from __future__ import annotations

import pytest

from events.types import Ack, Conflict, Forget, Get, NotFound, Store, Value

pytestmark = pytest.mark.integration


def test_retry_after_long_log_returns_original_ack(start_router):
    """A resend 20,000 events later (an hour of log, by distance) is a duplicate."""
    router = start_router(shards=2)
    with router.client() as client:
        original = client.request(Store(id="early", namespace="a", key="k", value="first"))
        client.pipeline([Store(namespace=f"n{i % 50}", key=f"k{i}", value=i) for i in range(20_000)], window=2000)
        resent = client.request(Store(id="early", namespace="a", key="k", value="first"))
        value = client.get("k", namespace="a")
    assert resent.seq == original.seq
    assert resent.duplicate is True
    assert value.value == "first"


def test_retry_after_router_restart_is_duplicate(start_router):
    router = start_router(shards=1)
    with router.client() as client:
        original = client.request(Store(id="before-restart", key="k", value=1))
    router.stop()
    again = start_router(shards=1)
    with again.client() as client:
        resent = client.request(Store(id="before-restart", key="k", value=1))
    assert resent.seq == original.seq
    assert resent.duplicate is True


def test_expected_version_conflict(start_router):
    router = start_router(shards=1)
    with router.client() as client:
        created = client.request(Store(key="doc", value="v1", expected_version=0))
        agent_a = client.request(Store(key="doc", value="from a", expected_version=1))
        agent_b = client.request(Store(key="doc", value="from b", expected_version=1))
        value = client.get("doc")
    assert isinstance(created, Ack)
    assert isinstance(agent_a, Ack)
    assert isinstance(agent_b, Conflict)
    assert agent_b.expected_version == 1
    assert agent_b.actual_version == 2
    assert value.value == "from a"


def test_create_only_store_conflicts_when_key_exists(start_router):
    router = start_router(shards=1)
    with router.client() as client:
        client.store("k", 1)
        reply = client.request(Store(key="k", value=2, expected_version=0))
    assert isinstance(reply, Conflict)
    assert reply.actual_version == 1


def test_conditional_forget(start_router):
    router = start_router(shards=1)
    with router.client() as client:
        client.store("k", 1)
        client.store("k", 2)
        stale = client.request(Forget(key="k", expected_version=1))
        kept = client.get("k")
        current = client.request(Forget(key="k", expected_version=2))
        gone = client.get("k")
    assert isinstance(stale, Conflict)
    assert isinstance(kept, Value)
    assert isinstance(current, Ack)
    assert isinstance(gone, NotFound)


def test_resent_conflict_gets_same_conflict(start_router):
    router = start_router(shards=1)
    with router.client() as client:
        client.store("k", 1)
        first = client.request(Store(id="cas-1", key="k", value=9, expected_version=5))
        again = client.request(Store(id="cas-1", key="k", value=9, expected_version=5))
    assert isinstance(first, Conflict)
    assert isinstance(again, Conflict)
    assert again.seq == first.seq
    assert again.actual_version == first.actual_version


def test_resent_conditional_success_is_duplicate_ack(start_router):
    router = start_router(shards=1)
    with router.client() as client:
        first = client.request(Store(id="cas-2", key="k", value=1, expected_version=0))
        again = client.request(Store(id="cas-2", key="k", value=1, expected_version=0))
        value = client.request(Get(key="k"))
    assert isinstance(first, Ack)
    assert again.seq == first.seq
    assert again.duplicate is True
    assert value.value == 1
