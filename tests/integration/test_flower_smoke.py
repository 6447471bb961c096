"""Celery Flower against the embedded stack's broker: its HTTP API lists the worker.

Flower is an optional dependency (the `ops` extra). Flower 2.x serves its
API only with authentication configured, or with the environment variable
FLOWER_UNAUTHENTICATED_API set, so this test runs it with basic auth.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import pytest

from tiermem.config import StackConfig
from tiermem.servers import free_port, wait_until
from tiermem.stack import Stack

pytest.importorskip("flower", reason="flower is not installed: pip install 'tiermem[ops]'")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER, PASSWORD = "ops", "smoke-test-password"


@pytest.fixture
def stack(ray_cluster, tmp_path: Path):
    config = StackConfig(data_dir=str(tmp_path / "data"), shards=1, ray_address=ray_cluster)
    config.router = msgspec.structs.replace(config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0})
    running = Stack(config, celery=True)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def flower(stack: Stack):
    """Start Flower on a free port of 127.0.0.1; yield its base URL, its process and its log file."""
    port = free_port()
    log_path = stack.data_dir / "logs" / "flower.log"
    command = [
        sys.executable, "-m", "celery", "-A", "replay.celery_app", "flower",
        "--address=127.0.0.1", f"--port={port}",
        f"--basic-auth={USER}:{PASSWORD}",
    ]  # fmt: skip
    env = dict(os.environ, TIERMEM_CONFIG=str(stack.config_path), TIERMEM_LOG_JSON="1")
    with open(log_path, "wb") as output:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    yield f"http://127.0.0.1:{port}", process, log_path
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def get(url: str, *, auth: bool = True) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        body = error.read()
        error.close()
        return error.code, body


def test_flower_lists_stack_worker(stack, flower):
    base, process, log_path = flower
    workers: dict = {}

    def worker_listed() -> bool:
        assert process.poll() is None, f"flower exited with status {process.returncode}; see {log_path}"
        try:
            status, body = get(f"{base}/api/workers?refresh=1")
        except (ConnectionError, urllib.error.URLError):
            return False  # Flower is not listening yet.
        if status == 200:
            workers.update(json.loads(body))
        return stack.worker_name in workers

    wait_until(worker_listed, timeout=60, interval=0.2, what=f"flower to list {stack.worker_name}; see {log_path}")

    unauthenticated, _ = get(f"{base}/api/workers", auth=False)
    worker = workers[stack.worker_name]
    queues = sorted(queue["name"] for queue in worker["active_queues"])
    assert unauthenticated == 401
    assert queues == ["maintenance", "memory_ops", "processing", "replay"]
    assert "tiermem.replay.verify_shard" in worker["registered"]
    assert worker["stats"]["pid"] == stack.worker_pid
