"""The embedded stack: private Redis servers, a Ray head and the router process.

`Stack.start()` brings up whatever the configuration does not point to
elsewhere, writes `DIR/stack.json` for the router process and waits until
the router has written `DIR/endpoints.json`. `stop()` stops every child it
started, newest first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import structlog

from tiermem.config import StackConfig, write_stack_config
from tiermem.ray_head import RayHead
from tiermem.servers import RedisServer, ServerError, free_port, wait_until

__all__ = ["Stack"]

log = structlog.get_logger("tiermem.stack")


class Stack:
    """Start and stop the embedded stack for one data directory."""

    def __init__(self, config: StackConfig, *, dashboard: bool = False) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir).resolve()
        self.config.data_dir = str(self.data_dir)
        self.dashboard = dashboard
        self.redis: dict[str, RedisServer] = {}
        self.ray: RayHead | None = None
        self.router: subprocess.Popen[bytes] | None = None
        self.endpoints: dict[str, str] = {}

    @property
    def endpoints_path(self) -> Path:
        return self.data_dir / "endpoints.json"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "stack.json"

    def start(self, timeout: float = 180.0) -> dict[str, str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_redis()
            if self.config.ray_address is None:
                self.ray = RayHead(dashboard=self.dashboard, log_path=self.data_dir / "logs" / "ray-start.log").start()
                self.config.ray_address = self.ray.address
            self._fix_ports()
            write_stack_config(self.config, self.config_path)
            self.start_router(timeout)
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def _start_redis(self) -> None:
        for role, attribute in (("log", "log_url"), ("stm", "stm_url"), ("im", "im_url")):
            if getattr(self.config, attribute) is None:
                fsync = "everysec" if role == "log" and self.config.allow_everysec else None
                server = RedisServer(self.data_dir, role=role, appendfsync=fsync).start()
                self.redis[role] = server
                setattr(self.config, attribute, server.url)

    def _fix_ports(self) -> None:
        """Turn port 0 into a concrete free port, so a restarted router reuses it."""
        ports = dict(self.config.router.ports)
        for lane, port in ports.items():
            if port == 0:
                ports[lane] = free_port(self.config.router.host)
        self.config.router = msgspec.structs.replace(self.config.router, ports=ports)

    # ----------------------------------------------------------- router

    def start_router(self, timeout: float = 180.0) -> dict[str, str]:
        """Start the router process and wait until it serves."""
        self.endpoints_path.unlink(missing_ok=True)
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", TIERMEM_LOG_JSON="1")
        with open(logs / "router.log", "ab") as output:
            self.router = subprocess.Popen(
                [sys.executable, "-m", "tiermem.router_process", str(self.config_path), str(self.endpoints_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            wait_until(self._router_ready, timeout=timeout, interval=0.05, what="the router")
        except TimeoutError:
            raise ServerError(f"the router did not start within {timeout:.0f}s; see {logs / 'router.log'}") from None
        self.endpoints = {lane: url for lane, url in json.loads(self.endpoints_path.read_text()).items() if lane != "router_pid"}
        log.info("stack.router.started", pid=self.router.pid, **self.endpoints)
        return self.endpoints

    def _router_ready(self) -> bool:
        if self.router is not None and self.router.poll() is not None:
            raise ServerError(
                f"the router exited with status {self.router.returncode} at start: "
                f"{self._router_failure()}; see {self.data_dir / 'logs' / 'router.log'}"
            )
        try:
            record = json.loads(self.endpoints_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return self.router is not None and record.get("router_pid") == self.router.pid

    def _router_failure(self) -> str:
        """Return the last `tiermem router:` line of the router's log, if any."""
        try:
            lines = (self.data_dir / "logs" / "router.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "no log written"
        for line in reversed(lines):
            if line.startswith("tiermem router: "):
                return line.removeprefix("tiermem router: ")
        return lines[-1] if lines else "no log written"

    @property
    def router_pid(self) -> int | None:
        return self.router.pid if self.router else None

    def kill_router(self) -> None:
        """SIGKILL the router, as a crash would."""
        if self.router is not None and self.router.poll() is None:
            os.kill(self.router.pid, signal.SIGKILL)
            self.router.wait()
            log.info("stack.router.killed", pid=self.router.pid)

    def stop_router(self, timeout: float = 30.0) -> None:
        if self.router is None or self.router.poll() is not None:
            return
        self.router.send_signal(signal.SIGTERM)
        try:
            self.router.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("stack.router.stop_timed_out", pid=self.router.pid, next="SIGKILL")
            self.router.kill()
            self.router.wait()
        log.info("stack.router.stopped", pid=self.router.pid)

    # ----------------------------------------------------------- stopping

    def stop(self) -> None:
        """Stop the router, Ray and the Redis servers this stack started."""
        self.stop_router()
        if self.ray is not None:
            self.ray.stop()
            self.ray = None
        for role in reversed(list(self.redis)):
            self.redis[role].stop()
        self.redis = {}
        self.endpoints_path.unlink(missing_ok=True)

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait(self, poll: float = 0.5) -> int | None:
        """Block while the router runs; return its exit status when it exits."""
        while self.router is not None and self.router.poll() is None:
            time.sleep(poll)
        return self.router.returncode if self.router else None
