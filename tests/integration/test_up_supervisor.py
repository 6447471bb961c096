"""`tiermem up` as a real process: it restarts a child that dies, and leaves none behind.

Each test starts `tiermem up` on the session's Ray cluster, with its own
Redis servers, router, Celery worker and beat, and free ports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bus.client import Client
from events.types import Ack, Get, Store, Value
from tiermem.servers import wait_until
from tiermem.stack import stack_lock_held

pytestmark = [pytest.mark.integration, pytest.mark.slow]

START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60


def running(pid: int) -> bool:
    """Return True while `pid` runs; a zombie, which a container's init may never reap, counts as stopped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


class Up:
    """One `tiermem up` process, its data directory and its output files."""

    def __init__(self, root: Path, ray_address: str) -> None:
        self.data_dir = root / "data"
        self.config = root / "tiermem.toml"
        self.config.write_text(
            f'data_dir = "{self.data_dir}"\n'
            "shards = 1\n"
            f'ray_address = "{ray_address}"\n'
            "[router.ports]\nhigh = 0\nnormal = 0\nlow = 0\npub = 0\n"
        )
        self.stdout = root / "up.out"
        self.stderr = root / "up.err"
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-c",
                    "import sys; from tiermem.cli import main; sys.exit(main())",
                    "up", "--config", str(self.config),
                ],
                stdout=out,
                stderr=err,
                env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"),
            )  # fmt: skip
        self.endpoints: dict[str, str] = wait_until(
            self._printed_endpoints,
            timeout=START_TIMEOUT_S,
            what="tiermem up to print its endpoints",
        )
        self.stack = json.loads((self.data_dir / "stack.json").read_text())

    def _printed_endpoints(self) -> dict[str, str] | None:
        if self.process.poll() is not None:
            raise AssertionError(
                f"tiermem up exited with {self.process.returncode}:\n{self.stderr.read_text()}"
            )
        text = self.stdout.read_text()
        return json.loads(text.splitlines()[0]) if text.endswith("\n") else None

    def events(self, name: str) -> list[dict]:
        """Return the JSON log lines of `tiermem up` whose event is `name`."""
        found = []
        for line in self.stderr.read_text().splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                found.append(json.loads(line))
        return found

    def redis_pids(self) -> dict[str, int]:
        pids = {}
        for role in ("log", "stm", "im", "broker"):
            with redis.Redis.from_url(self.stack[f"{role}_url"]) as client:
                pids[role] = int(client.info("server")["process_id"])
        return pids

    def child_pids(self) -> list[int]:
        record = json.loads((self.data_dir / "endpoints.json").read_text())
        return [*self.redis_pids().values(), int(record["router_pid"])]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def up(ray_cluster, tmp_path) -> Iterator[Up]:
    running_up = Up(tmp_path, ray_cluster)
    yield running_up
    running_up.kill()


def store_and_get(up: Up, value: str) -> object:
    with Client(up.endpoints, timeout=10) as client:
        ack = client.request(Store(namespace="up", key="k", value=value))
        assert isinstance(ack, Ack), ack
        return client.request(Get(namespace="up", key="k"))


def test_up_restarts_killed_redis(up):
    before = up.redis_pids()["stm"]
    os.kill(before, signal.SIGKILL)

    after = wait_until(
        lambda: _stm_pid_if_restarted(up, before),
        timeout=60,
        what="tiermem up to restart the STM Redis",
    )
    wait_until(
        lambda: up.events("stack.child.restarted"),
        timeout=10,
        what="stack.child.restarted in the output of tiermem up",
    )
    reply = store_and_get(up, "after the restart")

    assert after != before
    exited = up.events("stack.child.exited")
    assert [event["child"] for event in exited] == ["redis-stm"]
    assert exited[0]["pid"] == before
    assert isinstance(reply, Value), reply
    assert reply.value == "after the restart"
    assert up.process.poll() is None


def _stm_pid_if_restarted(up: Up, old_pid: int) -> int | None:
    try:
        pid = up.redis_pids()["stm"]
    except redis.ConnectionError:
        return None
    return pid if pid != old_pid else None


@pytest.mark.parametrize("stop_signal", [signal.SIGHUP, signal.SIGKILL], ids=["SIGHUP", "SIGKILL"])
def test_up_leaves_no_children(up, stop_signal):
    """Whichever way `tiermem up` ends, its children stop and the data directory's lock is free."""
    assert isinstance(store_and_get(up, "kept"), Value)
    children = up.child_pids()
    assert all(running(pid) for pid in children)
    assert stack_lock_held(up.data_dir)

    up.process.send_signal(stop_signal)
    status = up.process.wait(STOP_TIMEOUT_S)
    wait_until(
        lambda: not any(running(pid) for pid in children),
        timeout=STOP_TIMEOUT_S,
        what=f"the children {children} to stop",
    )
    wait_until(
        lambda: not stack_lock_held(up.data_dir),
        timeout=STOP_TIMEOUT_S,
        what="the stack's lock to be free",
    )

    assert status == (0 if stop_signal == signal.SIGHUP else -signal.SIGKILL)
