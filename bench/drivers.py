"""Load generators that run in worker processes, and the pool that hosts them.

Each driver waits until `start_at` (a `time.monotonic()` reading, which is
system-wide on Linux, so drivers in several processes start together), runs,
and returns a plain dict: when it started and finished, and how many replies
of each type it got. The pool's processes are started once per run, so
their import time never lands inside a measurement.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

# Sends of one request by `build_log` before it gives up on Busy replies.
BUILD_ATTEMPTS = 1200

__all__ = [
    "Workers",
    "bare_dealer",
    "build_log",
    "flood_stores",
    "stream_stores",
    "text_value",
]


@functools.cache
def _corpus() -> str:
    """Return the chitchat corpus's utterances joined by spaces, ASCII only, in a fixed order."""
    import chitchat_dataset

    dataset = chitchat_dataset.Dataset()
    text = " ".join(
        utterance["text"]
        for conversation_id in sorted(dataset)
        for message in dataset[conversation_id]["messages"]
        for utterance in message
    )
    return text.encode("ascii", "ignore").decode("ascii")


def text_value(size: int, salt: int = 0) -> str:
    """Return `size` bytes of chat text, starting at a different place for each salt.

    Real text compresses as memories would, unlike a repeated pattern, which
    would flatter the Redis snapshot and the zstd tiers.
    """
    corpus = _corpus()
    if size > len(corpus):
        raise ValueError(
            f"a value of {size} bytes is longer than the corpus ({len(corpus)} bytes)"
        )
    start = (salt * 7919) % (len(corpus) - size + 1)
    return corpus[start : start + size]


def _wait_until(start_at: float) -> None:
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _consume(replies: Iterator[Any], counts: Counter[str]) -> None:
    for reply in replies:
        counts[type(reply).__name__] += 1


def stream_stores(
    endpoints: dict[str, str],
    *,
    lane: str,
    namespace_prefix: str,
    namespaces: int,
    key_prefix: str,
    count: int,
    value_bytes: int,
    window: int,
    start_at: float,
) -> dict[str, Any]:
    """Send `count` Stores through `Client.stream` with `window` in flight.

    Store `i` goes to namespace `{namespace_prefix}{i % namespaces}`, so the
    load spreads over the shards as many agents' memories would.
    """
    from bus.client import Client
    from events.types import Store

    value = text_value(value_bytes)
    events = (
        Store(
            namespace=f"{namespace_prefix}{index % namespaces}",
            key=f"{key_prefix}{index}",
            value=value,
        )
        for index in range(count)
    )
    counts: Counter[str] = Counter()
    with Client(endpoints, timeout=60) as client:
        _wait_until(start_at)
        started = time.monotonic()
        _consume(client.stream(events, lane=lane, window=window), counts)
        finished = time.monotonic()
    return {"started": started, "finished": finished, "replies": dict(counts)}


def flood_stores(
    endpoints: dict[str, str],
    *,
    lane: str,
    namespace_prefix: str,
    namespaces: int,
    value_bytes: int,
    window: int,
    start_at: float,
    until: float,
) -> dict[str, Any]:
    """Keep `window` Stores in flight on `lane` until the monotonic time `until`."""
    from bus.client import Client
    from events.types import Store

    value = text_value(value_bytes, salt=1)

    def events() -> Iterator[Store]:
        index = 0
        while time.monotonic() < until:
            yield Store(
                namespace=f"{namespace_prefix}{index % namespaces}",
                key=f"flood-{index}",
                value=value,
            )
            index += 1

    counts: Counter[str] = Counter()
    with Client(endpoints, timeout=60) as client:
        _wait_until(start_at)
        started = time.monotonic()
        _consume(client.stream(events(), lane=lane, window=window), counts)
        finished = time.monotonic()
    return {"started": started, "finished": finished, "replies": dict(counts)}


def bare_dealer(
    endpoint: str, *, count: int, value_bytes: int, window: int, start_at: float
) -> dict[str, Any]:
    """Send `count` pre-encoded Store frames on a bare DEALER with `window` in flight.

    The frames are encoded before the clock starts and replies are decoded
    with a plain msgspec decoder: no ids are generated, no resends tracked.
    """
    import msgspec
    import zmq

    from events.codec import MSGPACK, encode_request
    from events.types import Ack, Store

    value = text_value(value_bytes)
    frames = [
        encode_request(
            Store(id=f"bare-{index}", namespace="echo", key=f"k{index}", value=value),
            MSGPACK,
        )
        for index in range(count)
    ]
    decoder = msgspec.msgpack.Decoder(Ack)
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, window * 2)
    sock.setsockopt(zmq.RCVHWM, window * 2)
    sock.connect(endpoint)
    received = 0
    sent = 0
    try:
        _wait_until(start_at)
        started = time.monotonic()
        while received < count:
            while sent < count and sent - received < window:
                sock.send(frames[sent])
                sent += 1
            if not sock.poll(60_000):
                raise TimeoutError(
                    f"the echo server sent no reply for 60s ({received} of {count} received)"
                )
            while True:
                try:
                    decoder.decode(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                received += 1
        finished = time.monotonic()
    finally:
        sock.close(linger=0)
    return {"started": started, "finished": finished, "replies": {"Ack": received}}


def build_log(
    endpoints: dict[str, str],
    *,
    worker: int,
    workers: int,
    count: int,
    namespaces: int,
    value_bytes: int,
    get_every: int,
    window: int,
    start_at: float,
) -> dict[str, Any]:
    """Send this worker's share of a log: Stores, and a Get after every `get_every`-1 Stores.

    Event `index` (counting over all workers) goes to namespace
    `agent-{index % namespaces}`; its key is unique, `k{index}`. A Get reads
    the key stored just before it in the same worker.
    """
    from bus.client import Client
    from events.types import Get, Store

    def events() -> Iterator[Store | Get]:
        previous: tuple[str, str] | None = None
        for index in range(worker, count, workers):
            namespace = f"agent-{index % namespaces}"
            if previous is not None and index % get_every == get_every - 1:
                yield Get(namespace=previous[0], key=previous[1])
                continue
            key = f"k{index}"
            yield Store(
                namespace=namespace,
                key=key,
                value=text_value(value_bytes, salt=index),
                tags=["bench"],
            )
            previous = (namespace, key)

    counts: Counter[str] = Counter()
    # Every event must reach the log, so a Busy is resent far more often than
    # the client's default 5 attempts, each time after the router's hint.
    with Client(endpoints, timeout=120, attempts=BUILD_ATTEMPTS) as client:
        _wait_until(start_at)
        started = time.monotonic()
        _consume(client.stream(events(), window=window), counts)
        finished = time.monotonic()
    return {"started": started, "finished": finished, "replies": dict(counts)}


def _warm_up(seconds: float) -> int:
    """Import what the drivers use and hold the worker, so every worker process starts."""
    import os

    import bus.client  # noqa: F401 - imported for its import time only
    import events.types  # noqa: F401

    _corpus()
    time.sleep(seconds)
    return os.getpid()


class Workers:
    """A fixed pool of spawned worker processes that run the drivers."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.pids: list[int] = []

    def start(self) -> Workers:
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.count, mp_context=multiprocessing.get_context("spawn")
        )
        # One task per worker, each holding its worker for a moment, so that
        # every process is spawned and has imported the client and loaded
        # the corpus before any measurement.
        self.pids = sorted(set(self._pool.map(_warm_up, [1.0] * self.count)))
        return self

    def submit(
        self, driver: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future:
        if self._pool is None:
            raise RuntimeError("the worker pool is not started; call start() first")
        return self._pool.submit(driver, *args, **kwargs)

    def run_together(
        self, calls: list[tuple[Callable[..., dict[str, Any]], dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """Run each (driver, keyword arguments) in its own worker; return their results in order."""
        if len(calls) > self.count:
            raise ValueError(
                f"{len(calls)} drivers cannot run together on {self.count} workers"
            )
        futures = [self.submit(driver, **kwargs) for driver, kwargs in calls]
        return [future.result() for future in futures]

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
