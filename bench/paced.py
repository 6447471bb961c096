"""Open-loop senders: requests go out on a fixed schedule, whatever the replies do.

Latency is measured from each request's scheduled send time, not from the
moment it was really sent. A sender that falls behind, because the system
under test drains its socket slowly or the machine is busy, therefore adds
to the latency instead of silently lowering the offered rate. Closed-loop
load generators make that error, known as coordinated omission.
"""

from __future__ import annotations

import heapq
import math
import select
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

__all__ = ["PacedResult", "paced_redis", "paced_zmq"]

# How long to wait for replies after the last scheduled send.
DRAIN_S = 15.0
# The maximum single wait on the socket. It bounds how late a reply is
# noticed if ZeroMQ's edge-triggered descriptor ever missed an edge.
_MAX_WAIT_S = 0.005


class PacedResult:
    """Per-request latencies (seconds, NaN when no reply came) and replies."""

    def __init__(self, count: int) -> None:
        self.latency = [math.nan] * count
        self.replies: list[Any] = [None] * count
        self.send_failures = 0
        self.retries = 0
        self.max_lag_s = 0.0

    @property
    def answered(self) -> list[float]:
        return [value for value in self.latency if not math.isnan(value)]

    @property
    def missing(self) -> int:
        return sum(1 for value in self.latency if math.isnan(value))


def paced_zmq(
    sock: zmq.Socket,
    requests: Sequence[tuple[str, bytes]],
    rate: float,
    decode: Callable[[bytes], Any],
    *,
    retry_after: Callable[[Any], float | None] = lambda reply: None,
    drain_s: float = DRAIN_S,
) -> PacedResult:
    """Send each (request id, frame) on `sock` at `rate` per second; match replies by id.

    `sock` is a connected DEALER. A reply for which `retry_after` returns a
    number of seconds (a `Busy`) is not final: the same frame is sent again
    that much later, and the request's latency runs on until its final
    reply. The loop waits on the socket's file descriptor with `select`,
    whose timeout has microsecond resolution, so sends stay on schedule at
    5,000 requests/s without spinning a core (zmq.Poller's timeout is whole
    milliseconds).
    """
    result = PacedResult(len(requests))
    index_of = {request_id: index for index, (request_id, _) in enumerate(requests)}
    interval = 1.0 / rate
    descriptor = sock.getsockopt(zmq.FD)
    start = time.perf_counter() + 0.01
    deadline = start + len(requests) * interval + drain_s
    resends: list[tuple[float, int]] = []
    next_index = 0
    received = 0
    total = len(requests)

    def send(index: int) -> None:
        try:
            sock.send(requests[index][1], zmq.NOBLOCK)
        except zmq.Again:
            result.send_failures += 1

    while received < total:
        now = time.perf_counter()
        while next_index < total and start + next_index * interval <= now:
            result.max_lag_s = max(
                result.max_lag_s, now - (start + next_index * interval)
            )
            send(next_index)
            next_index += 1
        while resends and resends[0][0] <= now:
            send(heapq.heappop(resends)[1])
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            raw = sock.recv(zmq.NOBLOCK)
            arrived = time.perf_counter()
            reply = decode(raw)
            index = index_of.get(getattr(reply, "id", None) or "")
            if index is None or not math.isnan(result.latency[index]):
                continue
            delay = retry_after(reply)
            if delay is not None:
                result.retries += 1
                heapq.heappush(resends, (arrived + delay, index))
                continue
            result.latency[index] = arrived - (start + index * interval)
            result.replies[index] = reply
            received += 1
        now = time.perf_counter()
        if now >= deadline:
            break
        due = [deadline]
        if next_index < total:
            due.append(start + next_index * interval)
        if resends:
            due.append(resends[0][0])
        wait = min(due) - now
        if wait > 0:
            select.select([descriptor], [], [], min(wait, _MAX_WAIT_S))
    return result


def paced_redis(call: Callable[[int], Any], count: int, rate: float) -> PacedResult:
    """Run `call(i)` for i in range(count) at `rate` per second on a blocking client.

    A blocking client cannot send while it waits, so when a call takes
    longer than the interval, the next ones start late. Measuring from the
    schedule charges that wait to them, as an open-loop client would see it.
    """
    result = PacedResult(count)
    interval = 1.0 / rate
    start = time.perf_counter() + 0.01
    for index in range(count):
        scheduled = start + index * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            result.max_lag_s = max(result.max_lag_s, -delay)
        result.replies[index] = call(index)
        result.latency[index] = time.perf_counter() - scheduled
    return result
