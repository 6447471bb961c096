"""The console's access to one stack: its bus, its event log and its projection database.

Everything is found through the data directory: `endpoints.json` for the
router's lanes, `stack.json` for the log's Redis, the shard count and the
policy, and `projections.sqlite3` for the read models. Every failure is
raised as a `ConsoleError` whose message states in plain words what is down
and what to do, because the page shows that message as it is.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import redis

from bus.client import Client, ClientError, RequestTimeout, load_endpoints
from events.errors import TiermemError
from events.log import RedisEventLog
from events.types import Busy, Message
from replay.engine import ReplayError, ReplayTarget, load_target
from replay.projections.db import connect_readonly
from replay.projections.errors import DatabaseNotFoundError

__all__ = [
    "ConsoleError",
    "InvalidRequestError",
    "NotFoundError",
    "ProjectionsMissingError",
    "StackDownError",
    "StackSources",
]

LANE_NAMES = ("high", "normal", "low", "pub")


class ConsoleError(TiermemError):
    """A console request failed; `status` is the HTTP status of the response."""

    status = 500


class InvalidRequestError(ConsoleError):
    """A request parameter is invalid; the message names it."""

    status = 400


class NotFoundError(ConsoleError):
    """The requested namespace, key or cached state does not exist."""

    status = 404


class StackDownError(ConsoleError):
    """The router, the log's Redis or the stack's files cannot be reached."""

    status = 503


class ProjectionsMissingError(ConsoleError):
    """The projection database does not exist yet."""

    status = 503


class StackSources:
    """Open the bus, the log and the projection database of the stack in `data_dir`.

    Bus requests time out after `bus_timeout_s` and are sent once: a
    person is waiting for the page, so the console reports a slow router
    rather than resending for a minute. Safe to use from several threads,
    because every bus request opens its own socket.
    """

    def __init__(self, data_dir: str | Path, *, bus_timeout_s: float = 2.0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.bus_timeout_s = bus_timeout_s
        self._lock = threading.Lock()
        self._target: ReplayTarget | None = None
        self._target_mtime_ns = 0
        self._event_log: RedisEventLog | None = None

    @property
    def projections_db(self) -> Path:
        return self.data_dir / "projections.sqlite3"

    def _start_hint(self) -> str:
        return f"start it with `tiermem up --data-dir {self.data_dir}`"

    # ----------------------------------------------------------- the bus

    def endpoints(self) -> dict[str, str]:
        """Return the router's lanes and PUB endpoint from `DIR/endpoints.json`."""
        try:
            found = load_endpoints(self.data_dir)
        except TiermemError:
            raise StackDownError(
                f"the stack is not running: {self.data_dir / 'endpoints.json'} does not exist, "
                f"so there is no router to ask; {self._start_hint()}"
            ) from None
        except ValueError as error:
            raise StackDownError(
                f"{self.data_dir / 'endpoints.json'} is not valid JSON ({error}); "
                "the router may be writing it right now, so reload the page"
            ) from None
        return {lane: url for lane, url in found.items() if lane in LANE_NAMES}

    def client(self, *, timeout: float | None = None, attempts: int = 1) -> Client:
        """Return a new client on the router's lanes; the caller closes it."""
        # NOTE: no CURVE keys are passed, so a router with CurveZMQ turned on
        # never replies to the console, which reports the router as down.
        return Client(
            self.endpoints(), timeout=timeout or self.bus_timeout_s, attempts=attempts
        )

    def request(
        self, message: Message, *, lane: str = "high", timeout: float | None = None
    ) -> Message:
        """Send one request to the router and return its reply.

        Raises StackDownError when no reply comes in time or the router is
        busy, and ConsoleError when the router rejects the request.
        """
        name = type(message).__name__
        wait = timeout or self.bus_timeout_s
        with self.client(timeout=wait) as client:
            try:
                reply = client.request(message, lane=lane)
            except RequestTimeout:
                raise StackDownError(
                    f"the router at {client.endpoints.get(lane)} did not reply to a {name} request "
                    f"within {wait:g} s: it is down or overloaded. Is `tiermem up --data-dir "
                    f"{self.data_dir}` still running?"
                ) from None
            except ClientError as error:
                raise ConsoleError(
                    f"the router rejected the {name} request: {error}"
                ) from None
        if isinstance(reply, Busy):
            raise StackDownError(
                f"the router is busy and requested a retry of the {name} request after "
                f"{reply.retry_after_ms} ms: try again in a moment"
            )
        return reply

    # ----------------------------------------------------------- the log

    def target(self) -> ReplayTarget:
        """Return where the stack's log and tiers are, from `DIR/stack.json`.

        Read again whenever the file changes, because `tiermem up` rewrites
        it with new Redis ports when it starts again.
        """
        path = self.data_dir / "stack.json"
        try:
            mtime_ns = path.stat().st_mtime_ns
        except FileNotFoundError:
            raise StackDownError(
                f"{path} does not exist, so the console cannot find the event log: {self._start_hint()}"
            ) from None
        with self._lock:
            if self._target is None or mtime_ns != self._target_mtime_ns:
                try:
                    self._target = load_target(self.data_dir)
                except ReplayError as error:
                    raise StackDownError(str(error)) from None
                self._target_mtime_ns = mtime_ns
                self._event_log = None
            return self._target

    def event_log(self) -> RedisEventLog:
        target = self.target()
        with self._lock:
            if self._event_log is None:
                client = redis.Redis.from_url(
                    target.log_url, socket_timeout=self.bus_timeout_s * 5
                )
                self._event_log = RedisEventLog(client, stream=target.log_stream)
            return self._event_log

    def log_down(self, error: redis.RedisError) -> StackDownError:
        """Return the error to raise when a read of the log's Redis failed."""
        url = self._target.log_url if self._target is not None else "(unknown)"
        return StackDownError(
            f"cannot read the event log from the Redis at {url} ({error}): is the stack "
            f"running? {self._start_hint()}"
        )

    # ----------------------------------------------------------- projections

    def open_projections(self) -> sqlite3.Connection:
        """Open the projection database read-only; the caller closes the connection."""
        try:
            return connect_readonly(self.projections_db)
        except DatabaseNotFoundError:
            raise ProjectionsMissingError(
                f"there is no projection database at {self.projections_db} yet: the stack's "
                "Celery worker creates it on its first projection run, about a second after "
                "it starts. Until then, the key lists, search and history are empty"
            ) from None
