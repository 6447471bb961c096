"""`tiermem publish`: JSON lines in, one reply per line out, in input order, as they arrive.

Lines are read by a thread into a bounded queue, so a slow producer (a
pipe, a terminal) gets each reply as soon as the router sends it, not after
the input ends. A line that is not a valid request is never sent: this
command replies to it with an `Error` whose message starts with `line N:`.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO

import msgspec

from bus.client import PENDING, PENDING_POLL_S, Client
from events.codec import decode_request
from events.errors import ErrorCode, ProtocolError
from events.limits import Limits
from events.types import Error, Message

__all__ = ["print_reply", "publish_lines"]

# Lines read ahead of what was sent; past this the reader thread waits.
READ_AHEAD_LINES = 10_000

_END = object()
_SENT = object()


class _Ordered:
    """Prints replies and local errors in the order of the input lines."""

    def __init__(self, emit: Callable[[Message], None]) -> None:
        self.emit = emit
        self.waiting: deque[object] = deque()
        self.in_flight = 0

    def sent(self) -> None:
        self.in_flight += 1
        self.waiting.append(_SENT)

    def local(self, reply: Error) -> None:
        if self.in_flight:
            self.waiting.append(reply)
        else:
            self.emit(reply)

    def replied(self, reply: Message) -> None:
        marker = self.waiting.popleft()
        if marker is not _SENT:
            raise RuntimeError("a local error was left before an unanswered request")
        self.in_flight -= 1
        self.emit(reply)
        while self.waiting and self.waiting[0] is not _SENT:
            self.emit(self.waiting.popleft())  # type: ignore[arg-type]


def _read_lines(source: IO[bytes], lines: queue.Queue) -> None:
    try:
        for number, line in enumerate(source, start=1):
            lines.put((number, line))
    except (OSError, ValueError):
        # The command closed the source after a failure of its own (a
        # router that never replied, say), which it reports itself.
        pass
    finally:
        lines.put(_END)


def _decode(number: int, line: bytes) -> Message | Error:
    """Decode one input line; return the request, or the `Error` reply to it."""
    if not line.lstrip().startswith(b"{"):
        start = line.strip()[:40].decode("utf-8", errors="replace")
        return Error(
            code=ErrorCode.MALFORMED,
            message=f"line {number}: expected a JSON object, got {start!r}",
        )
    try:
        message, _ = decode_request(line, Limits())
    except ProtocolError as error:
        return Error(
            id=error.event_id,
            code=error.code,
            message=f"line {number}: {error.message}",
            field=error.field,
        )
    return message


def publish_lines(
    client: Client, source: IO[bytes], *, lane: str, emit: Callable[[Message], None]
) -> tuple[int, int]:
    """Send every request line of `source` on `lane`; pass each reply to `emit` in input order.

    Returns the number of lines rejected here and of `Error` replies from
    the router. Blank lines are skipped and get no reply.
    """
    lines: queue.Queue = queue.Queue(maxsize=READ_AHEAD_LINES)
    reader = threading.Thread(
        target=_read_lines, args=(source, lines), name="publish-reader", daemon=True
    )
    reader.start()
    ordered = _Ordered(emit)
    counts = {"rejected": 0, "failed": 0}

    def requests() -> Iterator[Message]:
        while True:
            try:
                item = lines.get(timeout=PENDING_POLL_S) if ordered.in_flight else lines.get()
            except queue.Empty:
                yield PENDING
                continue
            if item is _END:
                return
            number, line = item
            if not line.strip():
                continue
            decoded = _decode(number, line)
            if isinstance(decoded, Error):
                counts["rejected"] += 1
                ordered.local(decoded)
                continue
            ordered.sent()
            yield decoded

    for reply in client.stream(requests(), lane=lane):
        if isinstance(reply, Error):
            counts["failed"] += 1
        ordered.replied(reply)
    return counts["rejected"], counts["failed"]


def print_reply(reply: Message) -> None:
    """Print one reply as a JSON line and flush it, so a reader sees it at once."""
    print(msgspec.json.encode(reply).decode(), flush=True)
