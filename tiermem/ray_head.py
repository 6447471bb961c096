"""A private local Ray head node, run as `ray start --head --block` in a child process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

from tiermem.servers import ServerError, free_ports, wait_until

__all__ = ["RayHead"]

log = structlog.get_logger("tiermem.ray_head")


class RayHead:
    """One Ray head on 127.0.0.1 with every port chosen free, so it never
    collides with another Ray on the machine.

    Ray keeps Unix sockets under its temp dir and their paths must stay under
    about 107 bytes, so the temp dir is a short one under /tmp rather than
    inside the data directory.
    """

    def __init__(
        self,
        *,
        num_cpus: int | None = None,
        dashboard: bool = False,
        object_store_bytes: int = 256 * 1024 * 1024,
        log_path: Path | None = None,
        resources: str | None = None,
        popen_options: dict[str, Any] | None = None,
    ) -> None:
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.dashboard = dashboard
        self.object_store_bytes = object_store_bytes
        # Ray needs eight distinct ports; they are chosen together so that no
        # two can coincide (Ray refuses to start when two of them do).
        self._ports = free_ports(8)
        self.port, self.dashboard_port = self._ports[0], self._ports[1]
        self.temp_dir = tempfile.mkdtemp(prefix="tmray-", dir="/tmp")
        self.log_path = log_path or Path(self.temp_dir) / "ray-start.log"
        self.resources = resources
        self.popen_options = popen_options or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        ray = str(Path(sys.executable).with_name("ray"))
        if not Path(ray).exists():
            ray = shutil.which("ray") or "ray"
        names = (
            "--node-manager-port",
            "--object-manager-port",
            "--metrics-export-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
        )
        ports = dict(zip(names, self._ports[2:], strict=True))
        command = [
            ray, "start", "--head", "--block",
            "--port", str(self.port),
            "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(self.num_cpus),
            "--object-store-memory", str(self.object_store_bytes),
            "--temp-dir", self.temp_dir,
            "--disable-usage-stats",
            "--include-dashboard", "true" if self.dashboard else "false",
        ]  # fmt: skip
        if self.dashboard:
            command += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port)]
        if self.resources:
            command += ["--resources", self.resources]
        for flag, port in ports.items():
            command += [flag, str(port)]
        return command

    def start(self, timeout: float = 60.0) -> RayHead:
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as output:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                **self.popen_options,
            )
        try:
            wait_until(self._ready, timeout=timeout, interval=0.1, what="the Ray head")
        except TimeoutError:
            self.stop()
            raise ServerError(f"Ray head did not start within {timeout:.0f}s; see {self.log_path}") from None
        log.info("ray.started", address=self.address, pid=self.process.pid, dashboard=self.dashboard)
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise ServerError(
                f"`ray start` exited with status {self.process.returncode}; see {self.log_path}"
            )
        try:
            return b"Ray runtime started" in self.log_path.read_bytes()
        except FileNotFoundError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the head: `ray start --block` stops its Ray processes on SIGTERM."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("ray.stop_timed_out", pid=self.process.pid, next="SIGKILL of its process group")
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            log.info("ray.stopped", address=self.address)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
