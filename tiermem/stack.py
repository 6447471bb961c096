"""The embedded stack: private Redis servers, a Ray head, the router, Celery.

`Stack.start()` brings up whatever the configuration does not point to
elsewhere, writes `DIR/stack.json` for the router process and waits until
the router has written `DIR/endpoints.json`. With `celery=True` it then
starts a Celery worker and beat, which read `DIR/stack.json` through
`TIERMEM_CONFIG`, and waits until the worker replies to a ping. `stop()`
stops every child it started, newest first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import msgspec
import structlog

from tiermem.config import StackConfig, write_stack_config
from tiermem.ray_head import RayHead
from tiermem.servers import RedisServer, ServerError, child_options, free_port, wait_until

__all__ = ["Stack", "stack_lock_held"]

log = structlog.get_logger("tiermem.stack")


class Stack:
    """Start and stop the embedded stack for one data directory.

    `celery=False` leaves out the broker Redis, the Celery worker and beat,
    for callers that only need the bus. `supervised=True` is for a process
    that runs the stack in its main thread until it stops it, as `tiermem
    up` does: every child then gets SIGTERM from the kernel when that
    process dies, even by SIGKILL.
    """

    def __init__(
        self,
        config: StackConfig,
        *,
        dashboard: bool = False,
        celery: bool = True,
        supervised: bool = False,
    ) -> None:
        self.config = config
        self.supervised = supervised
        self.data_dir = Path(config.data_dir).resolve()
        self.config.data_dir = str(self.data_dir)
        self.dashboard = dashboard
        self.celery = celery
        self.redis: dict[str, RedisServer] = {}
        self.ray: RayHead | None = None
        self.router: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_name: str | None = None
        self.beat: subprocess.Popen[bytes] | None = None
        self.worker_metrics_port: int | None = None
        self.endpoints: dict[str, str] = {}
        self._control_app: Any = None
        self._lock: IO[str] | None = None

    @property
    def endpoints_path(self) -> Path:
        return self.data_dir / "endpoints.json"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "stack.json"

    @property
    def lock_path(self) -> Path:
        return self.data_dir / "stack.lock"

    def _take_lock(self) -> None:
        """Hold an exclusive lock on `DIR/stack.lock` for as long as this stack runs.

        A second stack on the same directory would start Redis servers on
        the same files and overwrite stack.json, which breaks the first.
        The Redis servers, the router and the Celery processes inherit the
        lock's file descriptor, so the lock stays held until the last of
        them exits, even when this process is killed first.
        """
        handle = open(self.lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            if holder.isdigit() and not _pid_alive(int(holder)):
                raise ServerError(
                    f"the stack in {self.data_dir} was started by pid {holder}, which has "
                    "exited, but processes it started still hold stack.lock; they stop by "
                    f"themselves within seconds (see `fuser -v {self.lock_path}`), then "
                    "start this stack again"
                ) from None
            raise ServerError(
                f"a stack already runs in {self.data_dir} (pid {holder}): stop it first, "
                "or give this one another --data-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    @property
    def _ray_dir_record(self) -> Path:
        return self.data_dir / "ray-temp-dir"

    def _remove_stale_ray_dir(self) -> None:
        """Delete the Ray temp dir of an earlier stack here that was killed before it could.

        This runs under the lock, so no stack of this data directory uses
        that Ray head any more.
        """
        try:
            stale = Path(self._ray_dir_record.read_text().strip())
        except FileNotFoundError:
            return
        if stale.name.startswith("tmray-") and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            log.info("stack.ray_dir.removed", path=str(stale), reason="left by a stack that was killed")
        self._ray_dir_record.unlink(missing_ok=True)

    def _child_options(self, *, keep_lock: bool = True) -> dict[str, Any]:
        """Return the `Popen` options of a child: the lock's descriptor, and death with this process."""
        keep = (self._lock.fileno(),) if keep_lock and self._lock is not None else ()
        return child_options(keep_fds=keep, die_with_parent=self.supervised)

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # Closing the file releases the lock.
            self._lock = None

    def start(self, timeout: float = 180.0) -> dict[str, str]:
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise ServerError(f"--data-dir {self.data_dir} is not a directory")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._start_redis()
            if self.config.ray_address is None:
                self._remove_stale_ray_dir()
                # Ray's own processes do not get the lock: they use no file
                # of the data directory, and Ray may leave some for a while
                # after the head stops.
                self.ray = RayHead(
                    dashboard=self.dashboard,
                    log_path=self.data_dir / "logs" / "ray-start.log",
                    popen_options=self._child_options(keep_lock=False),
                ).start()
                self.config.ray_address = self.ray.address
                self._ray_dir_record.write_text(self.ray.temp_dir + "\n")
            self._fix_ports()
            write_stack_config(self.config, self.config_path)
            self.start_router(timeout)
            if self.celery:
                self.start_worker(timeout)
                self.start_beat(timeout)
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def _start_redis(self) -> None:
        roles = [("log", "log_url"), ("stm", "stm_url"), ("im", "im_url")]
        if self.celery:
            roles.append(("broker", "broker_url"))
        for role, attribute in roles:
            if getattr(self.config, attribute) is None:
                fsync = "everysec" if role == "log" and self.config.allow_everysec else None
                server = RedisServer(
                    self.data_dir, role=role, appendfsync=fsync, popen_options=self._child_options()
                ).start()
                self.redis[role] = server
                setattr(self.config, attribute, server.url)

    def _fix_ports(self) -> None:
        """Turn port 0 into a concrete free port, so a restarted router reuses it."""
        ports = dict(self.config.router.ports)
        for lane, port in ports.items():
            if port == 0:
                ports[lane] = free_port(self.config.router.host)
        # The embedded stack always serves metrics; unset means a free port,
        # announced in endpoints.json as "metrics".
        metrics_port = self.config.router.metrics_port
        if not metrics_port:
            metrics_port = free_port(self.config.router.metrics_host)
        self.config.router = msgspec.structs.replace(self.config.router, ports=ports, metrics_port=metrics_port)
        if self.worker_metrics_port is None:
            self.worker_metrics_port = free_port()

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
                **self._child_options(),
            )
        try:
            wait_until(self._router_ready, timeout=timeout, interval=0.05, what="the router")
        except TimeoutError:
            raise ServerError(f"the router did not start within {timeout:.0f}s; see {logs / 'router.log'}") from None
        self.endpoints = {lane: url for lane, url in json.loads(self.endpoints_path.read_text()).items() if lane not in ("router_pid", "metrics")}
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

    # ----------------------------------------------------------- celery

    def _celery_env(self) -> dict[str, str]:
        return dict(os.environ, TIERMEM_CONFIG=str(self.config_path), TIERMEM_LOG_JSON="1")

    def _worker_env(self) -> dict[str, str]:
        """The worker's environment: the beat's, plus its metrics endpoint.

        prometheus-client reads PROMETHEUS_MULTIPROC_DIR at import, so the
        prefork pool's processes can share their counters through files.
        """
        directory = self.data_dir / "metrics" / "worker"
        directory.mkdir(parents=True, exist_ok=True)
        return dict(
            self._celery_env(),
            PROMETHEUS_MULTIPROC_DIR=str(directory),
            TIERMEM_WORKER_METRICS_PORT=str(self.worker_metrics_port or 0),
        )

    @property
    def worker_metrics_url(self) -> str | None:
        if self.worker_metrics_port is None:
            return None
        return f"http://127.0.0.1:{self.worker_metrics_port}/metrics"

    def _spawn(self, command: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / log_name, "ab") as output:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env or self._celery_env(),
                start_new_session=True,
                **self._child_options(),
            )

    def start_worker(self, timeout: float = 120.0) -> None:
        """Start a Celery worker on every tiermem queue and wait until it replies to a ping.

        The worker reads `DIR/stack.json`, so `start()` (or the caller) must
        have written it with `broker_url` set.
        """
        from replay.celery_app import QUEUES

        if self.config.broker_url is None:
            raise ServerError(
                "broker_url is not set: start the stack with celery=True, or set config.broker_url"
            )
        if self.worker is not None and self.worker.poll() is None:
            raise ServerError(f"a Celery worker is already running (pid {self.worker.pid}); stop or kill it first")
        # A name of its own, so only this process can reply to the ping below.
        self.worker_name = f"tiermem-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        command = [
            sys.executable, "-m", "celery", "-A", "replay.celery_app", "worker",
            "--queues", ",".join(QUEUES),
            "--concurrency", str(self.config.celery_concurrency),
            "--hostname", self.worker_name,
            "--loglevel", "INFO",
            # At start, mingle requests the state of other workers and
            # waits for their replies, and gossip subscribes to their
            # events. This worker needs neither.
            "--without-mingle",
            "--without-gossip",
        ]  # fmt: skip
        self.worker = self._spawn(command, "celery-worker.log", self._worker_env())
        try:
            wait_until(self._worker_ready, timeout=timeout, interval=0.05, what="the Celery worker")
        except TimeoutError:
            self.kill_worker()
            raise ServerError(
                f"the Celery worker did not reply to a ping within {timeout:.0f}s; "
                f"see {self.data_dir / 'logs' / 'celery-worker.log'}"
            ) from None
        except ServerError:
            self.kill_worker()
            raise
        log.info("stack.worker.started", pid=self.worker.pid, hostname=self.worker_name)

    def _worker_ready(self) -> bool:
        if self.worker is not None and self.worker.poll() is not None:
            raise ServerError(
                f"the Celery worker exited with status {self.worker.returncode} at start; "
                f"see {self.data_dir / 'logs' / 'celery-worker.log'}"
            )
        from kombu.exceptions import OperationalError

        try:
            replies = self.control_app().control.ping(destination=[self.worker_name], timeout=0.5)
        except OperationalError as error:
            raise ServerError(
                f"the Celery broker at {self.config.broker_url} is unreachable ({error}); "
                "check broker_url, or leave it unset so that the stack starts a broker"
            ) from error
        return bool(replies)

    def control_app(self) -> Any:
        """Return a Celery app on this stack's broker, for remote control and inspection."""
        if self._control_app is None:
            from replay.celery_app import create_app

            self._control_app = create_app(self.config)
        return self._control_app

    @property
    def worker_pid(self) -> int | None:
        return self.worker.pid if self.worker else None

    def kill_worker(self) -> None:
        """SIGKILL the worker and its pool processes, as a crash would."""
        if self.worker is not None and self.worker.poll() is None:
            _kill_group(self.worker.pid)
            self.worker.wait()
            log.info("stack.worker.killed", pid=self.worker.pid)

    def stop_worker(self, timeout: float = 60.0) -> None:
        """Stop the worker with SIGTERM, which lets running tasks finish, and SIGKILL it at the deadline."""
        self._stop_child(self.worker, "worker", timeout)

    def start_beat(self, timeout: float = 60.0) -> None:
        """Start Celery beat and wait until it has written its schedule file."""
        if self.beat is not None and self.beat.poll() is None:
            raise ServerError(f"Celery beat is already running (pid {self.beat.pid}); stop it first")
        command = [
            sys.executable, "-m", "celery", "-A", "replay.celery_app", "beat",
            "--loglevel", "INFO",
        ]  # fmt: skip
        self.beat = self._spawn(command, "celery-beat.log")
        try:
            wait_until(self._beat_ready, timeout=timeout, interval=0.05, what="Celery beat")
        except TimeoutError:
            self._stop_child(self.beat, "beat", timeout=10.0)
            raise ServerError(
                f"Celery beat did not write its schedule file within {timeout:.0f}s; "
                f"see {self.data_dir / 'logs' / 'celery-beat.log'}"
            ) from None
        log.info("stack.beat.started", pid=self.beat.pid, interval_s=self.config.maintain_interval_s)

    def _beat_ready(self) -> bool:
        from replay.celery_app import read_schedule_state, schedule_path

        if self.beat is not None and self.beat.poll() is not None:
            raise ServerError(
                f"Celery beat exited with status {self.beat.returncode} at start; "
                f"see {self.data_dir / 'logs' / 'celery-beat.log'}"
            )
        state = read_schedule_state(schedule_path(self.config))
        return self.beat is not None and state is not None and state.beat_pid == self.beat.pid

    @property
    def beat_pid(self) -> int | None:
        return self.beat.pid if self.beat else None

    def stop_beat(self, timeout: float = 30.0) -> None:
        """Stop beat with SIGTERM, and SIGKILL it at the deadline."""
        self._stop_child(self.beat, "beat", timeout)

    def _stop_child(self, child: subprocess.Popen[bytes] | None, name: str, timeout: float) -> None:
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning(f"stack.{name}.stop_timed_out", pid=child.pid, next="SIGKILL")
            # The child leads its own process group, so this also ends its
            # pool processes. It is sent while the leader is alive, so the
            # group id cannot belong to anyone else yet.
            _kill_group(child.pid)
            child.wait()
        log.info(f"stack.{name}.stopped", pid=child.pid)

    # ----------------------------------------------------------- stopping

    def stop(self) -> None:
        """Stop beat, the worker, the router, Ray and the Redis servers this stack started."""
        self.stop_beat()
        self.stop_worker()
        if self._control_app is not None:
            self._control_app.close()
            self._control_app = None
        self.stop_router()
        if self.ray is not None:
            self.ray.stop()
            self.ray = None
            self._ray_dir_record.unlink(missing_ok=True)
        for role in reversed(list(self.redis)):
            self.redis[role].stop()
        self.redis = {}
        if self._lock is not None:
            self.endpoints_path.unlink(missing_ok=True)
        self._release_lock()

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def supervise(self, *, poll: float = 0.5, max_restarts: int = 5, window_s: float = 600.0) -> int:
        """Restart every child that exits, until a signal handler raises; return 1 when one keeps failing.

        A Redis server restarts on its own port and data directory, so the
        other processes reconnect to it. The router, the Celery worker and
        beat restart as `start` started them. A child that
        needs more than `max_restarts` restarts within `window_s` seconds
        makes this return, and so does an exited Ray head: the shard actors
        died with it, and the stack cannot be resumed in place.
        """
        restarts: dict[str, list[float]] = {}
        while True:
            if self.ray is not None and self.ray.process is not None and self.ray.process.poll() is not None:
                log.error(
                    "stack.ray.exited",
                    pid=self.ray.process.pid,
                    status=self.ray.process.returncode,
                    next="stopping the stack; start it again to recover from the log",
                )
                return 1
            for name, process, restart in self._watched():
                if process is None or process.poll() is None:
                    continue
                now = time.monotonic()
                recent = [moment for moment in restarts.get(name, []) if now - moment < window_s]
                if len(recent) >= max_restarts:
                    log.error(
                        "stack.child.gave_up",
                        child=name,
                        status=process.returncode,
                        restarts=len(recent),
                        window_s=window_s,
                        next="stopping the stack",
                    )
                    return 1
                recent.append(now)
                restarts[name] = recent
                log.error(
                    "stack.child.exited",
                    child=name,
                    pid=process.pid,
                    status=process.returncode,
                    restart=len(recent),
                    next=f"restarting the {name}",
                )
                try:
                    restart()
                except ServerError as error:
                    log.error(
                        "stack.child.restart_failed",
                        child=name,
                        error=str(error),
                        next=f"trying again in {poll} s",
                    )
                    continue
                log.info("stack.child.restarted", child=name, restart=len(recent))
            time.sleep(poll)

    def _watched(self) -> list[tuple[str, subprocess.Popen[bytes] | None, Callable[[], object]]]:
        """Return each child to keep running: its name, process and restart call, Redis first."""
        watched: list[tuple[str, subprocess.Popen[bytes] | None, Callable[[], object]]] = [
            (f"redis-{role}", server.process, server.start) for role, server in self.redis.items()
        ]
        watched.append(("router", self.router, self.start_router))
        if self.celery:
            watched.append(("worker", self.worker, self.start_worker))
            watched.append(("beat", self.beat, self.start_beat))
        return watched


def stack_lock_held(data_dir: str | os.PathLike[str]) -> bool:
    """Return True while a stack, or a process it started, has `DIR/stack.lock` locked."""
    path = Path(data_dir) / "stack.lock"
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        # Closing the file releases the probe's own lock.
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int) -> None:
    """SIGKILL the process group `pgid`, ignoring a group that has already exited."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
