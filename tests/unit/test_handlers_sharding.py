"""Tests of shard placement: stable across processes, spread, and checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import xxhash

from handlers.sharding import shard_of

NAMESPACES = [f"agent-{i}" for i in range(300)] + ["", "é", "日本語", "a" * 300]
SHARDS = 7

# Prints, for NAMESPACES, shard_of and Python's salted hash() modulo SHARDS.
_PLACEMENT_SCRIPT = """
import json, sys
from handlers.sharding import shard_of
namespaces, shards = json.load(sys.stdin)
print(json.dumps({
    "shard_of": [shard_of(ns, shards) for ns in namespaces],
    "hash": [hash(ns) % shards for ns in namespaces],
}))
"""


def _placement(hash_seed: str) -> dict[str, list[int]]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    completed = subprocess.run(
        [sys.executable, "-c", _PLACEMENT_SCRIPT],
        input=json.dumps([NAMESPACES, SHARDS]),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return json.loads(completed.stdout)


def test_shard_of_stable_across_hash_seeds():
    first = _placement("1")
    second = _placement("2")

    # hash() differs between the two processes, so the seeds took effect.
    assert first["hash"] != second["hash"]
    assert first["shard_of"] == second["shard_of"]
    assert first["shard_of"] == [shard_of(ns, SHARDS) for ns in NAMESPACES]


def test_shard_of_is_xxh64_modulo_shards():
    """Placement is xxh64 of the UTF-8 namespace, modulo the shard count."""
    for namespace in NAMESPACES:
        expected = xxhash.xxh64_intdigest(namespace.encode("utf-8")) % SHARDS
        assert shard_of(namespace, SHARDS) == expected, namespace


@pytest.mark.parametrize("shards", [1, 2, 3, 8, 16])
def test_shard_of_covers_every_shard(shards):
    placed = [shard_of(namespace, shards) for namespace in NAMESPACES]

    assert set(placed) == set(range(shards))


def test_shard_of_spreads_evenly():
    """300 namespaces over 3 shards: each gets at least half of its fair share."""
    placed = [shard_of(f"agent-{i}", 3) for i in range(300)]

    for shard in range(3):
        assert placed.count(shard) >= 50, shard


@pytest.mark.parametrize("shards", [0, -1])
def test_shard_of_rejects_shards_below_one(shards):
    with pytest.raises(ValueError, match=f"shards must be at least 1, got {shards}"):
        shard_of("agent-1", shards)
