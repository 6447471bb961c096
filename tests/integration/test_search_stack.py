"""Search end to end: the router, the Celery-run projections, and history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from bus.client import Client
from events.types import Ack, Error, Forget, Get, Maintain, Results, Search, Store
from handlers.policy import Policy
from tiermem.config import StackConfig
from tiermem.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = Policy(cache_capacity=4, stm_capacity=2, im_capacity=2, ltm_capacity=100)


@pytest.fixture(scope="module")
def stack(ray_cluster, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("search") / "data"
    config = StackConfig(
        data_dir=str(data_dir), shards=2, ray_address=ray_cluster, policy=TINY, projection_interval_s=0.2, maintain_interval_s=3600
    )
    config.router = msgspec.structs.replace(config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0})
    running = Stack(config, celery=True)
    running.start()
    yield running
    running.stop()


def test_search_sees_own_write(stack):
    with Client(stack.endpoints, timeout=30) as client:
        stored = client.request(Store(namespace="agent", key="fav", value={"text": "I love multi-agent ramen"}))
        reply = client.request(Search(namespace="agent", query="multi-agent RAMEN", min_seq=stored.seq, wait_ms=30_000))
    assert isinstance(stored, Ack)
    assert isinstance(reply, Results)
    assert reply.index_seq >= stored.seq
    assert [hit.key for hit in reply.hits] == ["fav"]


@pytest.mark.parametrize("query", ['"unbalanced', "NEAR", "col:value", "*", "don't", "a.md", "🍜", "ラーメン"])
def test_hostile_query_is_not_an_error(stack, query):
    with Client(stack.endpoints, timeout=30) as client:
        reply = client.request(Search(namespace="agent", query=query))
    assert isinstance(reply, Results)
    assert not isinstance(reply, Error)


def test_forgotten_and_moved_memories_in_search_and_history(stack):
    with Client(stack.endpoints, timeout=30) as client:
        writes = [Store(namespace="mover", key=f"k{i}", value=f"pasta number {i}") for i in range(6)]
        client.pipeline(writes)
        client.request(Maintain(namespace="mover"), lane="low")
        read = client.request(Get(id="reader-7", namespace="mover", key="k0"))
        forgot = client.request(Forget(namespace="mover", key="k5"))
        reply = client.request(Search(namespace="mover", query="pasta", limit=10, min_seq=forgot.seq, wait_ms=30_000))
    tiers = {hit.key: hit.tier for hit in reply.hits}
    assert "k5" not in tiers
    assert sorted(tiers) == ["k0", "k1", "k2", "k3", "k4"]
    assert {"stm", "im", "ltm"} <= set(tiers.values())

    result = subprocess.run(
        [sys.executable, "-m", "tiermem.cli", "history", "k0", "--namespace", "mover", "--data-dir", stack.config.data_dir],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, TIERMEM_LOG_LEVEL="WARNING"),
    )
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [entry["kind"] for entry in entries]
    assert result.returncode == 0, result.stderr
    assert kinds[0] == "store"
    assert "move" in kinds
    assert any(entry.get("reason") in ("capacity", "idle") for entry in entries if entry["kind"] == "move")
    reads = [entry for entry in entries if entry["kind"] == "read"]
    assert [(entry["seq"], entry["tier"], entry["request_id"]) for entry in reads] == [(read.seq, read.tier, "reader-7")]
    assert Path(stack.config.projections_db).exists()
