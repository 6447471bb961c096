"""CurveZMQ authentication and per-client namespace grants.

With a server secret key configured, every socket of the router speaks
CURVE, and a ZAP handler admits only the client public keys listed in the
grants: CURVE without ZAP would admit anyone who knows the server's public
key. Each admitted key carries a grant of the namespaces it may read and
write (shell-style patterns); a request outside them gets an `Error` with
code `forbidden` and an audit log line.
"""

from __future__ import annotations

import fnmatch
import threading
from pathlib import Path

import msgspec
import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from events.types import Forget, Get, Maintain, Message, ReadLog, Search, Store

__all__ = ["AuthSettings", "ClientGrant", "CurveKeys", "Gatekeeper", "generate_keypair", "load_keys"]

log = structlog.get_logger("tiermem.auth")

PUB_DOMAIN = "pub"
LANE_DOMAIN = "lanes"


class ClientGrant(msgspec.Struct, frozen=True, kw_only=True):
    """The grant of one client key: namespace patterns for reads and writes."""

    name: str
    read: list[str] = msgspec.field(default_factory=lambda: ["*"])
    write: list[str] = msgspec.field(default_factory=lambda: ["*"])

    def may_read(self, namespace: str | None) -> bool:
        return _matches(self.read, namespace)

    def may_write(self, namespace: str | None) -> bool:
        return _matches(self.write, namespace)


def _matches(patterns: list[str], namespace: str | None) -> bool:
    if namespace is None:
        # Every namespace at once: only a grant of "*" covers it.
        return "*" in patterns
    return any(fnmatch.fnmatchcase(namespace, pattern) for pattern in patterns)


class AuthSettings(msgspec.Struct, frozen=True, kw_only=True):
    """CURVE on all sockets when `server_secret_file` is set; `clients` maps
    each admitted client's Z85 public key to its grant."""

    server_secret_file: str | None = None
    clients: dict[str, ClientGrant] = msgspec.field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.server_secret_file is not None


class CurveKeys(msgspec.Struct, frozen=True):
    public: bytes
    secret: bytes | None


def generate_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret under `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def load_keys(path: str | Path) -> CurveKeys:
    """Load a certificate file written by `generate_keypair` (public or secret)."""
    public, secret = zmq.auth.load_certificate(str(path))
    return CurveKeys(public=public, secret=secret)


class _GrantChecker:
    """The ZAP credentials callback: admit listed keys, log and count the rest."""

    def __init__(self, gatekeeper: Gatekeeper) -> None:
        self.gatekeeper = gatekeeper

    def callback(self, domain: str, key: bytes) -> bool:
        # pyzmq passes the client's public key Z85-encoded.
        public = key.decode("ascii")
        grant = self.gatekeeper.settings.clients.get(public)
        admitted = grant is not None
        if admitted and domain == PUB_DOMAIN:
            # PUB broadcasts every namespace, so only full readers may subscribe.
            admitted = grant.may_read(None)
        if not admitted:
            self.gatekeeper.count_rejected()
            log.warning("auth.rejected", domain=domain, client_key=public[:8] + "...", reason="key not listed" if grant is None else "no read grant for every namespace")
        return admitted


class Gatekeeper:
    """Runs the ZAP handler and decides whether a client may send a request."""

    def __init__(self, settings: AuthSettings, context: zmq.Context) -> None:
        self.settings = settings
        self.context = context
        self.rejected = 0
        self._lock = threading.Lock()
        self.server = load_keys(settings.server_secret_file) if settings.server_secret_file else None
        if self.server is not None and self.server.secret is None:
            raise ValueError(f"{settings.server_secret_file} contains no secret key; pass the .key_secret file")
        self.authenticator: ThreadAuthenticator | None = None

    def count_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def start(self) -> None:
        if self.server is None:
            return
        self.authenticator = ThreadAuthenticator(self.context)
        self.authenticator.start()
        checker = _GrantChecker(self)
        for domain in (LANE_DOMAIN, PUB_DOMAIN):
            self.authenticator.configure_curve_callback(domain=domain, credentials_provider=checker)
        log.info("auth.started", clients=len(self.settings.clients))

    def stop(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    def secure(self, sock: zmq.Socket, domain: str) -> None:
        """Make `sock` a CURVE server in a ZAP domain (no-op without keys)."""
        if self.server is None:
            return
        sock.zap_domain = domain.encode()
        sock.curve_secretkey = self.server.secret
        sock.curve_publickey = self.server.public
        sock.curve_server = True

    def grant(self, user_id: str | None) -> ClientGrant | None:
        if user_id is None:
            return None
        return self.settings.clients.get(user_id)

    def denial(self, user_id: str | None, message: Message) -> str | None:
        """Return why `message` is forbidden for this client, or None if allowed."""
        if self.server is None:
            return None
        grant = self.grant(user_id)
        if grant is None:
            return "the client key is not listed"
        namespace = getattr(message, "namespace", None)
        if isinstance(message, (Store, Forget, Maintain)):
            allowed, action = grant.may_write(namespace), "write"
        elif isinstance(message, (Get, Search)):
            allowed, action = grant.may_read(namespace), "read"
        elif isinstance(message, ReadLog):
            allowed, action, namespace = grant.may_read(None), "read", None
        else:
            return None
        if allowed:
            return None
        target = "every namespace" if namespace is None else f"namespace {namespace!r}"
        return f"client {grant.name!r} may not {action} {target}"
