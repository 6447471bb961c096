"""Subscriptions end with every committed event exactly once, in order."""

from __future__ import annotations

import itertools

import pytest
import zmq

from bus.router import RouterSettings
from bus.subscriber import Subscriber
from events.types import Get, Store
RANDOM_PORTS = {"high": 0, "normal": 0, "low": 0, "pub": 0}

pytestmark = pytest.mark.integration


def collect(subscriber: Subscriber, count: int) -> list:
    return list(itertools.islice(subscriber.events(timeout=30), count))


def test_late_subscriber_gets_everything(start_router):
    router = start_router(shards=2)
    with router.client() as client:
        client.pipeline([Store(namespace=f"n{i % 4}", key=f"k{i}", value=i) for i in range(2000)])
    with Subscriber(router.endpoints) as subscriber:
        events = collect(subscriber, 2000)
    assert [event.seq for event in events] == list(range(1, 2001))
    assert subscriber.filled == 2000


def test_live_and_gap_filled_events_in_order(start_router):
    router = start_router(shards=2)
    with Subscriber(router.endpoints) as subscriber, router.client() as client:
        client.pipeline([Store(key=f"a{i}", value=i) for i in range(300)])
        first = collect(subscriber, 300)
        client.pipeline([Store(key=f"b{i}", value=i) for i in range(300)])
        second = collect(subscriber, 300)
    assert [event.seq for event in first + second] == list(range(1, 601))


def test_slow_subscriber_recovers_dropped_events(start_router):
    """PUB drops past its high-water mark; the subscriber reads the gap from the log."""
    settings = RouterSettings(ports=dict(RANDOM_PORTS), pub_hwm=20)
    router = start_router(shards=2, settings=settings)
    subscriber = Subscriber(router.endpoints, receive_hwm=20)
    try:
        with router.client() as client:
            client.pipeline([Store(key=f"k{i}", value="x" * 200) for i in range(5000)], window=1000)
        events = collect(subscriber, 5000)
    finally:
        subscriber.close()
    assert [event.seq for event in events] == list(range(1, 5001))
    assert subscriber.filled > 0


def test_filtered_subscription(start_router):
    router = start_router(shards=2)
    with router.client() as client:
        client.pipeline(
            [Store(namespace="keep", key="a", value=1), Store(namespace="drop", key="b", value=2), Get(namespace="keep", key="a"), Store(namespace="keep", key="c", value=3)]
        )
    with Subscriber(router.endpoints, types={"Store"}, namespaces={"keep"}) as subscriber:
        events = collect(subscriber, 2)
    assert [(event.namespace, event.key) for event in events] == [("keep", "a"), ("keep", "c")]


def test_topics_filter_by_type_and_namespace(start_router):
    router = start_router(shards=1)
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"Store/agent-1/")
    sock.connect(router.endpoints["pub"])
    try:
        with router.client() as client:
            # The subscription takes effect asynchronously: publish until one
            # arrives, with a deadline, instead of sleeping.
            received = []
            for attempt in range(200):
                client.pipeline([Store(namespace="agent-10", key=f"x{attempt}", value=1), Store(namespace="agent-1", key=f"y{attempt}", value=1)])
                if sock.poll(50):
                    received.append(sock.recv_multipart())
                    break
    finally:
        sock.close(linger=0)
    assert received
    assert received[0][0] == b"Store/agent-1/"
