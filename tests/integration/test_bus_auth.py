"""CURVE with a ZAP allowlist, and per-client namespace grants."""

from __future__ import annotations

import itertools

import pytest

from bus.auth import AuthSettings, ClientGrant, generate_keypair, load_keys
from bus.client import Client, RequestTimeout
from bus.router import RouterSettings
from bus.subscriber import Subscriber
from events.errors import ErrorCode
from events.types import Ack, Error, Get, Maintain, NotFound, ReadLog, Store, Value

pytestmark = pytest.mark.integration

RANDOM_PORTS = {"high": 0, "normal": 0, "low": 0, "pub": 0}


@pytest.fixture
def keys(tmp_path):
    made = {}
    for name in ("server", "alice", "bob", "mallory"):
        public, secret = generate_keypair(tmp_path / "keys", name)
        made[name] = (public, secret, load_keys(secret))
    return made


@pytest.fixture
def secured(start_router, keys):
    clients = {
        keys["alice"][2].public.decode(): ClientGrant(name="alice"),
        keys["bob"][2].public.decode(): ClientGrant(name="bob", read=["team-b/*"], write=["team-b/*"]),
    }
    auth = AuthSettings(server_secret_file=str(keys["server"][1]), clients=clients)
    router = start_router(shards=1, settings=RouterSettings(ports=dict(RANDOM_PORTS), auth=auth))
    return router


def curve_for(keys, name):
    own = keys[name][2]
    return (keys["server"][2].public, own.public, own.secret)


def test_listed_key_reads_and_writes(secured, keys):
    with Client(secured.endpoints, curve=curve_for(keys, "alice")) as client:
        ack = client.store("k", "v", namespace="anything")
        value = client.get("k", namespace="anything")
    assert isinstance(ack, Ack)
    assert isinstance(value, Value)
    assert value.value == "v"


def test_unlisted_key_is_refused(secured, keys):
    with Client(secured.endpoints, curve=curve_for(keys, "mallory"), timeout=1, attempts=1) as client:
        with pytest.raises(RequestTimeout):
            client.store("k", "v")
    assert secured.router.gatekeeper.rejected >= 1
    with Client(secured.endpoints, curve=curve_for(keys, "alice")) as client:
        assert isinstance(client.get("k"), NotFound)


def test_plain_client_gets_nothing(secured):
    with Client(secured.endpoints, timeout=1, attempts=1) as client:
        with pytest.raises(RequestTimeout):
            client.store("k", "v")


def test_grant_limits_namespaces(secured, keys):
    with Client(secured.endpoints, curve=curve_for(keys, "bob"), attempts=1) as client:
        allowed = client.request(Store(namespace="team-b/notes", key="k", value=1))
        replies = client.pipeline(
            [
                Store(namespace="team-a/notes", key="k", value=1),
                Get(namespace="team-a/notes", key="k"),
                Maintain(),
                ReadLog(from_seq=1),
            ]
        )
    assert isinstance(allowed, Ack)
    assert all(isinstance(reply, Error) for reply in replies)
    assert {reply.code for reply in replies} == {ErrorCode.FORBIDDEN}
    assert "may not write namespace 'team-a/notes'" in replies[0].message
    assert "may not read namespace 'team-a/notes'" in replies[1].message
    assert "every namespace" in replies[2].message
    assert secured.router.counters["error.forbidden"] == 4


def test_subscriber_with_full_grant(secured, keys):
    with Client(secured.endpoints, curve=curve_for(keys, "alice")) as client:
        client.pipeline([Store(key=f"k{i}", value=i) for i in range(20)])
    with Subscriber(secured.endpoints, curve=curve_for(keys, "alice")) as subscriber:
        events = list(itertools.islice(subscriber.events(timeout=20), 20))
    assert [event.seq for event in events] == list(range(1, 21))
