"""The live stream to the open pages: server-sent events fed by the feed and the sampler.

The feed and sampler threads hand their batches to the event loop through
`Hub`, which fans them out to one bounded queue per open page. A page that
falls too far behind gets a `reset` message and reloads its backlog, so the
server never buffers without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from tiermem.console.feed import matches

__all__ = ["Hub", "Page", "group_messages", "sse", "stream_messages"]

_encoder = msgspec.json.Encoder()

# Messages queued for one page; past this, the page gets a `reset` message.
PAGE_QUEUE = 256
# The maximum number of events in one message to a page. Of a faster
# stream the page gets the latest ones, and the count of those left out.
MAX_EVENTS_PER_MESSAGE = 300
# A comment line on an idle stream, so proxies and the browser keep it open.
KEEPALIVE_S = 15.0


class Page:
    """One open page's stream: its filters and its bounded queue."""

    def __init__(self, types: set[str] | None, namespace: str | None) -> None:
        self.types = types
        self.namespace = namespace
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(PAGE_QUEUE)
        self.overflowed = False

    def put(self, item: tuple[str, Any]) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True


class Hub:
    """Fan the feed's batches and the sampler's samples out to the open pages."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pages: set[Page] = set()

    def publish_events(
        self, events: list[dict[str, Any]], redactions: list[dict[str, Any]]
    ) -> None:
        """Hand a batch of the feed's events to the pages; called from the feed thread."""
        if self.loop is not None:
            copies = [dict(item) for item in events]
            self.loop.call_soon_threadsafe(self._deliver_events, copies, redactions)

    def publish_sample(self, sample: dict[str, Any]) -> None:
        """Hand a sample to the pages; called from the sampler thread."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._deliver, ("sample", sample))

    def _deliver_events(
        self, events: list[dict[str, Any]], redactions: list[dict[str, Any]]
    ) -> None:
        for page in self.pages:
            chosen = [
                item for item in events if matches(item, page.types, page.namespace)
            ]
            if chosen:
                page.put(("events", chosen))
            if redactions:
                page.put(("redact", redactions))

    def _deliver(self, item: tuple[str, Any]) -> None:
        for page in self.pages:
            page.put(item)


def sse(kind: str, data: Any) -> bytes:
    """Return one server-sent event of type `kind` with `data` as JSON."""
    return b"event: " + kind.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n"


def group_messages(items: list[tuple[str, Any]]) -> list[bytes]:
    """Merge queued messages into at most one message of each kind, sample last."""
    events: list[dict[str, Any]] = []
    redactions: list[dict[str, Any]] = []
    sample = None
    for kind, data in items:
        if kind == "events":
            events.extend(data)
        elif kind == "redact":
            redactions.extend(data)
        elif kind == "sample":
            sample = data
    chunks = []
    if events:
        skipped = max(0, len(events) - MAX_EVENTS_PER_MESSAGE)
        chunks.append(sse("events", {"events": events[skipped:], "skipped": skipped}))
    if redactions:
        chunks.append(sse("redact", redactions))
    if sample is not None:
        chunks.append(sse("sample", sample))
    return chunks


async def stream_messages(
    hub: Hub, page: Page, hello: Callable[[Page], dict[str, Any]]
) -> AsyncIterator[bytes]:
    """Yield the server-sent events of one page: `hello(page)` first, then what the hub sends.

    The page joins the hub before `hello` reads the backlog, so no event
    falls between the two. The page drops an event that comes in both, by
    its seq.
    """
    hub.pages.add(page)
    try:
        yield sse("hello", hello(page))
        while True:
            try:
                first = await asyncio.wait_for(page.queue.get(), timeout=KEEPALIVE_S)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            items = [first]
            while not page.queue.empty():
                items.append(page.queue.get_nowait())
            if page.overflowed:
                page.overflowed = False
                yield sse(
                    "reset",
                    {
                        "reason": "this page fell behind the live stream, so its list is reloaded"
                    },
                )
                continue
            for chunk in group_messages(items):
                yield chunk
    finally:
        hub.pages.discard(page)
