"""The Python client: DEALER sockets, pipelined requests, safe resends.

Every request gets an id before it is first sent and keeps it on every
resend, so a resend after a lost reply is recognised by the router and
answered with the original result instead of being applied twice.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import structlog
import zmq

from events.codec import MSGPACK, decode_reply, encode_request
from events.errors import ErrorCode, TiermemError
from events.types import (
    Ack,
    Busy,
    Conflict,
    Digest,
    DigestReply,
    Error,
    Forget,
    Get,
    Maintain,
    Message,
    NotFound,
    Status,
    StatusReply,
    Store,
    Value,
)

__all__ = ["PENDING", "Client", "ClientError", "RequestTimeout", "load_endpoints"]

log = structlog.get_logger("tiermem.client")


class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


# Yielded by a source of `Client.stream` that has no request ready yet, so
# the stream hands out the replies that arrived instead of blocking on it.
PENDING: Any = _Pending()

# Seconds `Client.stream` waits for replies before it reads again from a
# source that yielded PENDING.
PENDING_POLL_S = 0.05

_RETRYABLE = (ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL)


class ClientError(TiermemError):
    """The router rejected a request; `reply` is its `Error`."""

    def __init__(self, reply: Error) -> None:
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply


class RequestTimeout(TiermemError):
    """No reply arrived after every resend."""

    def __init__(self, request_ids: list[str], timeout: float, attempts: int) -> None:
        super().__init__(
            f"{len(request_ids)} request(s) got no reply within {timeout:.1f}s after "
            f"{attempts} attempts (first id {request_ids[0]!r}); the router may be "
            "down. Resending with the same ids is safe."
        )
        self.request_ids = request_ids


def load_endpoints(data_dir: str | Path) -> dict[str, str]:
    """Read the endpoints that `tiermem up` wrote to `DIR/endpoints.json`."""
    path = Path(data_dir) / "endpoints.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TiermemError(
            f"{path} does not exist: start the stack with `tiermem up --data-dir {data_dir}` first"
        ) from None


class Client:
    """A connection to the router's lanes.

    `timeout` is seconds per attempt, `attempts` the number of sends of one
    request before `RequestTimeout`. `curve` is (server public key, client
    public key, client secret key), Z85, for a router that requires CURVE. The client is not thread-safe: use one
    per thread, as with any ZeroMQ socket.
    """

    def __init__(
        self,
        endpoints: dict[str, str],
        *,
        codec: str = MSGPACK,
        timeout: float = 10.0,
        attempts: int = 5,
        curve: tuple[bytes, bytes, bytes] | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.codec = codec
        self.timeout = timeout
        self.attempts = attempts
        self.curve = curve
        self.context = context or zmq.Context.instance()
        self._sockets: dict[str, zmq.Socket] = {}

    @classmethod
    def from_data_dir(cls, data_dir: str | Path, **kwargs: Any) -> Client:
        return cls(load_endpoints(data_dir), **kwargs)

    def _socket(self, lane: str) -> zmq.Socket:
        sock = self._sockets.get(lane)
        if sock is None:
            if lane not in self.endpoints:
                raise ValueError(f"lane {lane!r} is not one of {sorted(self.endpoints)}")
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                server_public, public, secret = self.curve
                sock.curve_serverkey = server_public
                sock.curve_publickey = public
                sock.curve_secretkey = secret
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
            sock.connect(self.endpoints[lane])
            self._sockets[lane] = sock
        return sock

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------- requests

    def request(self, message: Message, *, lane: str = "normal") -> Message:
        """Send one request and return its reply (raising on `Error`)."""
        (reply,) = self.pipeline([message], lane=lane)
        if isinstance(reply, Error):
            raise ClientError(reply)
        return reply

    def pipeline(
        self, messages: Iterable[Message], *, lane: str = "normal", window: int = 1000
    ) -> list[Message]:
        """Send many requests with up to `window` in flight; return the replies in order."""
        return list(self.stream(messages, lane=lane, window=window))

    def stream(
        self, messages: Iterable[Message], *, lane: str = "normal", window: int = 1000
    ) -> Iterator[Message]:
        """Yield replies in request order, keeping up to `window` requests in flight.

        `Busy` and retryable `Error` replies are resent after the router's
        hint; other `Error`s are yielded for the caller to inspect. A source
        that reads from a slow producer (a pipe, a terminal) yields
        `PENDING` when it has no request ready: the stream then yields the
        replies that have arrived and reads from it again after at most
        `PENDING_POLL_S` seconds.
        """
        sock = self._socket(lane)
        source = iter(messages)
        order: list[str] = []
        frames: dict[str, bytes] = {}
        sent_at: dict[str, float] = {}
        attempts: dict[str, int] = {}
        retry_at: dict[str, float] = {}
        done: dict[str, Message] = {}
        next_out = 0
        exhausted = False
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)

        while True:
            pending = False
            while not exhausted and len(frames) < window:
                try:
                    message = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if message is PENDING:
                    pending = True
                    break
                if message.id is None:
                    message = msgspec.structs.replace(message, id=uuid.uuid4().hex)
                request_id = message.id or ""
                if request_id in frames:
                    raise ValueError(f"request id {request_id!r} is already in flight")
                order.append(request_id)
                frames[request_id] = encode_request(message, self.codec)
                attempts[request_id] = 1
                sent_at[request_id] = time.monotonic()
                sock.send(frames[request_id])

            while next_out < len(order) and order[next_out] in done:
                request_id = order[next_out]
                next_out += 1
                yield done.pop(request_id)
            if exhausted and not frames:
                return

            now = time.monotonic()
            deadlines = [sent_at[r] + self.timeout for r in frames if r not in retry_at]
            deadlines += list(retry_at.values())
            wait = max(0.0, min(deadlines) - now) if deadlines else self.timeout
            if pending:
                wait = min(wait, PENDING_POLL_S)
            if poller.poll(int(wait * 1000) + 1):
                while True:
                    try:
                        raw = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._accept(decode_reply(raw), frames, done, retry_at, attempts)
            self._resend_due(sock, frames, sent_at, attempts, retry_at)

    def _accept(self, reply: Message, frames: dict, done: dict, retry_at: dict, attempts: dict) -> None:
        request_id = reply.id or ""
        if request_id not in frames:
            return  # A late reply to a request already answered.
        retryable = isinstance(reply, Busy) or (isinstance(reply, Error) and reply.code in _RETRYABLE)
        if retryable and attempts[request_id] >= self.attempts:
            del frames[request_id]
            retry_at.pop(request_id, None)
            done[request_id] = reply
            return
        if isinstance(reply, Busy):
            retry_at[request_id] = time.monotonic() + reply.retry_after_ms / 1000
            return
        if isinstance(reply, Error) and reply.code in _RETRYABLE:
            log.warning("client.retrying", event_id=request_id, code=reply.code, next="resend with the same id")
            retry_at[request_id] = time.monotonic() + 0.2
            return
        del frames[request_id]
        retry_at.pop(request_id, None)
        done[request_id] = reply

    def _resend_due(self, sock, frames, sent_at, attempts, retry_at) -> None:
        now = time.monotonic()
        expired: list[str] = []
        for request_id in list(frames):
            due = retry_at.get(request_id)
            timed_out = due is None and now - sent_at[request_id] >= self.timeout
            if not timed_out and (due is None or now < due):
                continue
            if attempts[request_id] >= self.attempts:
                expired.append(request_id)
                continue
            attempts[request_id] += 1
            sent_at[request_id] = now
            retry_at.pop(request_id, None)
            if timed_out:
                log.warning("client.resend", event_id=request_id, attempt=attempts[request_id], reason="timeout")
            sock.send(frames[request_id])
        if expired:
            raise RequestTimeout(expired, self.timeout, self.attempts)

    # ----------------------------------------------------------- helpers

    def store(self, key: str, value: Any, *, namespace: str = "default", lane: str = "normal", **fields: Any) -> Ack | Conflict:
        """Store a value; a conditional Store (`expected_version=`) may return `Conflict`."""
        return self._expect(self.request(Store(key=key, value=value, namespace=namespace, **fields), lane=lane), Ack, Conflict)

    def get(self, key: str, *, namespace: str = "default", lane: str = "normal") -> Value | NotFound:
        return self._expect(self.request(Get(key=key, namespace=namespace), lane=lane), Value, NotFound)

    def forget(
        self, key: str, *, namespace: str = "default", lane: str = "normal", expected_version: int | None = None
    ) -> Ack | Conflict:
        """Forget one key; with `expected_version`, only at that version (else `Conflict`)."""
        if key is None:
            raise ValueError("forget() needs a key: use forget_namespace() to forget a whole namespace")
        forget = Forget(key=key, namespace=namespace, expected_version=expected_version)
        return self._expect(self.request(forget, lane=lane), Ack, Conflict)

    def forget_namespace(self, namespace: str, *, lane: str = "normal") -> Ack:
        """Forget every key of `namespace`, in every tier and in the log."""
        return self._expect(self.request(Forget(namespace=namespace), lane=lane), Ack)

    def maintain(self, *, namespace: str | None = None, lane: str = "low") -> Ack:
        return self._expect(self.request(Maintain(namespace=namespace), lane=lane), Ack)

    @staticmethod
    def _expect(reply: Message, *types: type) -> Any:
        if not isinstance(reply, types):
            names = " or ".join(cls.__name__ for cls in types)
            raise TiermemError(f"the router replied {type(reply).__name__} where {names} was expected: {reply!r}")
        return reply

    def status(self) -> StatusReply:
        reply = self.request(Status(), lane="high")
        assert isinstance(reply, StatusReply)
        return reply

    def digest(self) -> DigestReply:
        reply = self.request(Digest(), lane="normal")
        assert isinstance(reply, DigestReply)
        return reply
