"""Access to the console: the token, Host and Origin checks, and security headers.

`AccessGuard` wraps the whole app, so every request passes it first. It
checks the token when one is set, rejects a foreign `Host` header on a
loopback bind (DNS rebinding) and a foreign `Origin` on POST and DELETE
requests, and adds the security headers to every response.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["TOKEN_COOKIE", "AccessGuard"]

TOKEN_COOKIE = "tiermem_console_token"

_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class AccessGuard:
    """ASGI middleware: token check, Host and Origin checks, security headers.

    With a token, a request is let through when it carries the token as an
    `Authorization: Bearer` header, as the cookie this guard sets, or as
    the `token` query parameter. A page load with the query parameter is
    redirected to the same path without it, and the redirect sets the cookie.
    `allowed_hosts`, when given, is the set of `Host` header names accepted.
    """

    def __init__(
        self, app: ASGIApp, *, token: str | None, allowed_hosts: set[str] | None
    ) -> None:
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        rejection = self._reject(request)
        if rejection is not None:
            await rejection(scope, receive, send)
            return
        if (
            self.token is not None
            and request.query_params.get("token")
            and request.method == "GET"
            and not request.url.path.startswith("/api/")
        ):
            response = RedirectResponse(request.url.path, status_code=303)
            response.set_cookie(
                TOKEN_COOKIE, self.token, httponly=True, samesite="strict"
            )
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = (
                    list(message.get("headers", [])) + _SECURITY_HEADERS
                )
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _reject(self, request: Request) -> Response | None:
        host = request.headers.get("host", "")
        if (
            self.allowed_hosts is not None
            and _host_name(host) not in self.allowed_hosts
        ):
            return PlainTextResponse(
                f"Host header {host!r} is invalid: this console accepts only "
                f"{', '.join(sorted(self.allowed_hosts))}",
                status_code=400,
            )
        origin = request.headers.get("origin")
        if (
            request.method not in ("GET", "HEAD")
            and origin is not None
            and urlsplit(origin).netloc != host
        ):
            return _error(
                403,
                f"Origin {origin!r} is not this console's, so the request was rejected",
            )
        if self.token is None:
            return None
        supplied = [
            request.headers.get("authorization", "").removeprefix("Bearer ").strip(),
            request.cookies.get(TOKEN_COOKIE, ""),
            request.query_params.get("token", ""),
        ]
        if any(
            item and hmac.compare_digest(item.encode(), self.token.encode())
            for item in supplied
        ):
            return None
        message = (
            "this console requires its token: open the address that `tiermem console` printed "
            "at start, which ends with ?token=..., or send an Authorization: Bearer header"
        )
        if request.url.path.startswith("/api/"):
            return _error(401, message)
        return PlainTextResponse(message, status_code=401)


def _host_name(host: str) -> str:
    """Return the name part of a Host header: `127.0.0.1:7460` is `127.0.0.1`, `[::1]:80` is `::1`."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)
