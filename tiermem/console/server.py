"""The console's web server: a Starlette app with a JSON API, a live stream and the page.

The API handlers are plain functions, which Starlette runs in its thread
pool, because they wait on ZeroMQ, Redis and SQLite. The live stream is
server-sent events (`/api/stream`, see `tiermem.console.live`). Every
request passes `tiermem.console.access.AccessGuard` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from events.types import Digest, DigestReply, Get, NotFound, Results, Search, Value
from replay.engine import parse_time
from tiermem.console import queries
from tiermem.console.access import AccessGuard
from tiermem.console.feed import EVENT_TYPES, EventFeed
from tiermem.console.live import Hub, Page, stream_messages
from tiermem.console.sampler import Sampler
from tiermem.console.settings import ConsoleSettings, is_loopback
from tiermem.console.sources import ConsoleError, InvalidRequestError, StackSources
from tiermem.console.timetravel import TimeTravel

__all__ = ["bind_socket", "create_app", "serve"]

log = structlog.get_logger("tiermem.console")

STATIC_DIR = Path(__file__).parent / "static"

_encoder = msgspec.json.Encoder()


class JSON(Response):
    """A JSON response, encoded with msgspec."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


def _error(status: int, message: str) -> JSON:
    return JSON({"error": message}, status_code=status)


# ----------------------------------------------------------- the app


class Console:
    """The console's state: where the stack is, and the threads that watch it."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.sources = StackSources(
            settings.data_dir, bus_timeout_s=settings.bus_timeout_s
        )
        self.hub = Hub()
        self.feed = EventFeed(
            self.sources,
            backlog=settings.backlog_events,
            on_batch=self.hub.publish_events,
        )
        self.sampler = Sampler(
            self.sources,
            self.feed,
            interval_s=settings.sample_interval_s,
            samples=settings.samples,
            on_sample=self.hub.publish_sample,
        )
        self.travel = TimeTravel(self.sources)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.hub.loop = asyncio.get_running_loop()
        self.feed.start()
        self.sampler.start()
        try:
            yield
        finally:
            self.hub.loop = None
            self.sampler.stop()
            self.feed.stop()

    # ----------------------------------------------------------- handlers

    def index(self, request: Request) -> Response:
        return FileResponse(
            STATIC_DIR / "index.html", headers={"cache-control": "no-store"}
        )

    def info(self, request: Request) -> Response:
        return JSON(
            {
                "data_dir": str(self.sources.data_dir),
                "allow_get": self.settings.allow_get,
                "sample_interval_s": self.settings.sample_interval_s,
                "samples": self.settings.samples,
                "event_types": list(EVENT_TYPES),
                "page_limit": queries.MAX_PAGE,
            }
        )

    def overview(self, request: Request) -> Response:
        return JSON({"samples": self.sampler.samples()})

    def events(self, request: Request) -> Response:
        types, namespace = _filters(request)
        limit = _int(request, "limit", 200, 1, 2_000)
        return JSON(
            {
                "events": self.feed.recent(
                    types=types, namespace=namespace, limit=limit
                ),
                "problem": self.feed.problem,
            }
        )

    async def stream(self, request: Request) -> Response:
        types, namespace = _filters(request)
        return StreamingResponse(
            stream_messages(self.hub, Page(types, namespace), self._hello),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    def _hello(self, page: Page) -> dict[str, Any]:
        return {
            "events": self.feed.recent(
                types=page.types, namespace=page.namespace, limit=200
            ),
            "sample": self.sampler.latest(),
            "problem": self.feed.problem,
        }

    def namespaces(self, request: Request) -> Response:
        conn = self.sources.open_projections()
        try:
            return JSON(queries.namespaces(conn))
        finally:
            conn.close()

    def keys(self, request: Request) -> Response:
        namespace = queries.require_key(
            request.query_params.get("namespace"), "namespace"
        )
        options = {
            "order": request.query_params.get("order", "key"),
            "after": request.query_params.get("after") or None,
            "offset": _int(request, "offset", 0, 0, 10**9),
            "limit": _int(request, "limit", 100, 1, queries.MAX_PAGE),
        }
        conn = self.sources.open_projections()
        try:
            return JSON(queries.key_page(self.sources, conn, namespace, **options))
        finally:
            conn.close()

    def history(self, request: Request) -> Response:
        namespace = queries.require_key(
            request.query_params.get("namespace"), "namespace"
        )
        key = queries.require_key(request.query_params.get("key"))
        after = (
            _int(request, "after_seq", 0, 0, 2**63 - 1),
            _int(request, "after_position", 0, 0, 2**31),
        )
        limit = _int(request, "limit", 200, 1, queries.MAX_PAGE)
        conn = self.sources.open_projections()
        try:
            return JSON(
                queries.key_history(
                    self.sources, conn, namespace, key, after=after, limit=limit
                )
            )
        finally:
            conn.close()

    async def search(self, request: Request) -> Response:
        body = await _json_body(request)
        return await asyncio.to_thread(self._search, body)

    def _search(self, body: dict[str, Any]) -> Response:
        namespace = queries.require_key(body.get("namespace"), "namespace")
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequestError("query is missing: type the words to search for")
        if len(query) > 1024:
            raise InvalidRequestError(
                f"query is {len(query)} characters long: use at most 1,024"
            )
        limit = body.get("limit", 50)
        if not isinstance(limit, int) or not 1 <= limit <= 100:
            raise InvalidRequestError(f"limit {limit!r} is invalid: use 1 to 100")
        reply = self.sources.request(
            Search(namespace=namespace, query=query, limit=limit),
            lane="normal",
            timeout=10.0,
        )
        if not isinstance(reply, Results):
            raise ConsoleError(
                f"the router replied to Search with {type(reply).__name__}, not the expected reply"
            )
        return JSON(
            {
                "namespace": namespace,
                "query": query,
                "seq": reply.seq,
                "index_seq": reply.index_seq,
                "hits": msgspec.to_builtins(reply.hits),
            }
        )

    async def get(self, request: Request) -> Response:
        if not self.settings.allow_get:
            return _error(
                403,
                "this console is read-only: a Get is logged and counts as an access, so it is sent "
                "only when the console was started with --allow-get",
            )
        body = await _json_body(request)
        return await asyncio.to_thread(self._get, body)

    def _get(self, body: dict[str, Any]) -> Response:
        namespace = queries.require_key(body.get("namespace"), "namespace")
        key = queries.require_key(body.get("key"))
        reply = self.sources.request(
            Get(namespace=namespace, key=key), lane="normal", timeout=10.0
        )
        if isinstance(reply, Value):
            value, cut = queries.render_value(reply.value, 20_000)
            return JSON(
                {
                    "found": True,
                    "seq": reply.seq,
                    "tier": reply.tier,
                    "value": value,
                    "value_cut": cut,
                    "importance": reply.importance,
                    "tags": reply.tags,
                    "degraded": reply.degraded,
                }
            )
        if isinstance(reply, NotFound):
            return JSON({"found": False, "seq": reply.seq, "degraded": reply.degraded})
        raise ConsoleError(
            f"the router replied to Get with {type(reply).__name__}, not the expected reply"
        )

    def digest(self, request: Request) -> Response:
        reply = self.sources.request(Digest(), lane="normal", timeout=30.0)
        if not isinstance(reply, DigestReply):
            raise ConsoleError(
                f"the router replied to Digest with {type(reply).__name__}, not the expected reply"
            )
        return JSON({"seq": reply.seq, "tiers": msgspec.to_builtins(reply.tiers)})

    def past(self, request: Request) -> Response:
        namespace = queries.require_key(
            request.query_params.get("namespace"), "namespace"
        )
        seq = request.query_params.get("seq")
        moment = request.query_params.get("time")
        time_ms = None
        if moment:
            try:
                time_ms = parse_time(moment)
            except ValueError as error:
                raise InvalidRequestError(str(error)) from None
        elif seq is None or not seq.isdigit():
            raise InvalidRequestError(
                f"seq {seq!r} is invalid: use a whole number of 0 or more, or pass time"
            )
        chosen, last = self.travel.resolve_seq(
            seq=None if moment else int(seq), time_ms=time_ms
        )
        state = self.travel.state(namespace, chosen, last)
        page = self.travel.page(
            state,
            changes_only=request.query_params.get("changes") == "1",
            offset=_int(request, "offset", 0, 0, 10**9),
            limit=_int(request, "limit", 100, 1, queries.MAX_PAGE),
        )
        page["requested_time"] = time_ms
        return JSON(page)

    def discard_past(self, request: Request) -> Response:
        namespace = request.query_params.get("namespace") or None
        return JSON({"discarded": self.travel.discard(namespace)})


def _filters(request: Request) -> tuple[set[str] | None, str | None]:
    types = request.query_params.getlist("type")
    unknown = [item for item in types if item not in EVENT_TYPES]
    if unknown:
        raise InvalidRequestError(
            f"event type {unknown[0]!r} is invalid: use one of {', '.join(EVENT_TYPES)}"
        )
    return (set(types) if types else None), (
        request.query_params.get("namespace") or None
    )


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidRequestError(
            f"{name} {text!r} is invalid: use a whole number from {low} to {high}"
        ) from None
    if not low <= value <= high:
        raise InvalidRequestError(
            f"{name} {value} is invalid: use a whole number from {low} to {high}"
        )
    return value


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as error:
        raise InvalidRequestError(
            f"the request body is not valid JSON ({error})"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


async def _console_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ConsoleError)
    return _error(error.status, str(error))


async def _database_error(request: Request, error: Exception) -> Response:
    log.warning(
        "console.projections.unreadable", error=str(error), path=request.url.path
    )
    return _error(
        503,
        f"the projection database cannot be read ({error}): the Celery worker may not have "
        "created its tables yet, or it is being rebuilt. Try again in a moment",
    )


async def _unexpected_error(request: Request, error: Exception) -> Response:
    log.error(
        "console.request.failed",
        path=request.url.path,
        error=repr(error),
        exc_info=error,
    )
    return _error(
        500,
        f"the console failed on this request ({type(error).__name__}: {error}); its log has the details",
    )


def create_app(settings: ConsoleSettings) -> Starlette:
    """Return the console's ASGI app for the stack in `settings.data_dir`."""
    console = Console(settings)
    routes = [
        Route("/", console.index),
        Route("/api/info", console.info),
        Route("/api/overview", console.overview),
        Route("/api/events", console.events),
        Route("/api/stream", console.stream),
        Route("/api/namespaces", console.namespaces),
        Route("/api/keys", console.keys),
        Route("/api/history", console.history),
        Route("/api/search", console.search, methods=["POST"]),
        Route("/api/get", console.get, methods=["POST"]),
        Route("/api/digest", console.digest, methods=["POST"]),
        Route("/api/past", console.past),
        Route("/api/past", console.discard_past, methods=["DELETE"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=console.lifespan,
        exception_handlers={
            ConsoleError: _console_error,
            sqlite3.OperationalError: _database_error,
            Exception: _unexpected_error,
        },
    )
    app.state.console = console
    allowed_hosts = None
    if settings.token is None:
        allowed_hosts = {"localhost", "127.0.0.1", "::1", settings.host}
    return AccessGuard(app, token=settings.token, allowed_hosts=allowed_hosts)  # type: ignore[return-value]


def bind_socket(host: str, port: int) -> socket.socket:
    """Return a listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConsoleError(
            f"cannot listen on {host}:{port} ({error.strerror}): choose another --port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    settings: ConsoleSettings, *, ready: Callable[[str], None] | None = None
) -> None:
    """Serve the console until SIGINT or SIGTERM; call `ready(url)` once it listens."""
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{shown_host}:{port}/"

    config = uvicorn.Config(
        create_app(settings),
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)

    log.info(
        "console.started",
        url=url,
        data_dir=str(settings.data_dir),
        token_required=settings.token is not None,
        loopback=is_loopback(settings.host),
        allow_get=settings.allow_get,
    )
    if ready is not None:
        ready(url)
    # uvicorn (0.55, `Server.capture_signals`) catches SIGINT and SIGTERM,
    # shuts down, then raises the signal again under the handler it found.
    # With Python's default handlers that would end the process right there,
    # before the lines below, so these handlers only log it.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {
            number: signal.signal(number, _note_signal)
            for number in (signal.SIGINT, signal.SIGTERM)
        }
    try:
        server.run(sockets=[sock])
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        sock.close()
        log.info("console.stopped", url=url)


def _note_signal(number: int, frame: object) -> None:
    log.info("console.stopping", signal=signal.Signals(number).name)
