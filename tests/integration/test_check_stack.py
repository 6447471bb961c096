"""The check against the embedded stack, with kill -9 of each of its processes.

The stack runs the router as its own process, with Ray shard actors,
private Redis servers and a Celery worker. The check owns it, so it may
kill and restart every part between steps.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from tiermem.check.remote import STACK_POLICY, RemoteTarget, StackFaults
from tiermem.check.runner import run_check
from tiermem.config import StackConfig
from tiermem.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def stack(ray_cluster, tmp_path: Path):
    config = StackConfig(
        data_dir=str(tmp_path / "data"),
        shards=2,
        ray_address=ray_cluster,
        policy=STACK_POLICY,
        maintain_interval_s=3600.0,
    )
    config.router = msgspec.structs.replace(
        config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0}
    )
    running = Stack(config, celery=True)
    running.start()
    yield running
    running.stop()


def test_stack_survives_each_fault(stack):
    """Every fault once, each followed by a short check that must pass."""
    faults = StackFaults(stack)
    target = RemoteTarget(
        stack.endpoints, shards=2, policy=STACK_POLICY, faults=faults, search=True
    )
    names = faults.names()
    results = {}
    try:
        for number, name in enumerate(names):
            target.inject(name, number)
            results[name] = run_check(
                target,
                examples=2,
                steps=12,
                seed=number,
                shrink=False,
                prefix=lambda n, name=name: f"after-{name}/x{n}/",
            )
    finally:
        target.close()
    failed = [
        f"after {name}: {result.failure}\n" + "\n".join(result.steps)
        for name, result in results.items()
        if not result.passed
    ]
    assert set(names) >= {
        "kill_router",
        "kill_shard",
        "kill_redis_stm",
        "kill_redis_im",
        "kill_redis_log",
        "kill_worker",
    }
    assert not failed, "\n\n".join(failed)


def test_stack_check_with_random_faults(stack):
    target = RemoteTarget(
        stack.endpoints,
        shards=2,
        policy=STACK_POLICY,
        faults=StackFaults(stack),
        search=True,
    )
    try:
        result = run_check(
            target,
            examples=3,
            steps=15,
            seed=11,
            shrink=False,
            prefix=lambda n: f"random/x{n}/",
        )
    finally:
        target.close()
    assert result.passed, (
        f"{result.failure}\n" + "\n".join(result.steps) + f"\n{result.traceback}"
    )
