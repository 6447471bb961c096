"""A Forget reaches every file: tiers, search, snapshots, views, the log and the AOF files.

The acceptance test of crypto-shredding. A unique marker is stored in keys
that end up in each tier, and a snapshot and a view are taken while they
exist. Then the keys are forgotten: one unconditionally, one conditionally,
one with its namespace. After `tiermem erase` the marker is in no file under
the data directory and in no reply of Get, Search, a point-in-time view or
a replay. A control marker that is never forgotten shows that the scans
find a value that is there.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import redis

from bus.client import Client
from events.log import RedisEventLog
from events.types import Ack, Forget, Maintain, NotFound, Results, Search, Store, Value
from handlers.policy import Policy
from replay.engine import view_get
from replay.rebuild import rebuild
from tiermem.config import StackConfig
from tiermem.servers import wait_until
from tiermem.stack import Stack
from tiers.snapshot import read_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Small tiers, so one Maintain moves the oldest keys down to IM and LTM.
POLICY = Policy(cache_capacity=2, stm_capacity=3, im_capacity=3, ltm_capacity=1000)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiermem.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, TIERMEM_LOG_LEVEL="WARNING"),
    )


def files_containing(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            try:
                if needle in path.read_bytes():
                    found.append(str(path.relative_to(root)))
            except OSError:
                continue  # a file deleted while the scan ran
    return found


def snapshot_values(root: Path) -> str:
    """Every value and tag of every snapshot and view file, as one string."""
    parts = []
    for path in sorted(root.rglob("*.snap")):
        snapshot = read_snapshot(path)
        for records in snapshot.tiers.values():
            parts.extend(json.dumps([record.value, list(record.meta.tags)]) for record in records)
    return "\n".join(parts)


@pytest.fixture
def stack(ray_cluster, tmp_path: Path):
    config = StackConfig(data_dir=str(tmp_path / "data"), shards=2, ray_address=ray_cluster, policy=POLICY)
    config.router = msgspec.structs.replace(config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0})
    # Beat's own erasure passes stay out of the way; the test runs `tiermem erase`.
    config.erase_interval_s = 3600.0
    running = Stack(config, celery=True)
    running.start()
    yield running
    running.stop()


def search(client: Client, namespace: str, query: str, min_seq: int) -> Results:
    # Queries are logged in clear (they are not memories), so the tests
    # search for a word beside the marker, never for the marker itself.
    reply = client.request(Search(namespace=namespace, query=query, min_seq=min_seq, wait_ms=30_000))
    assert isinstance(reply, Results), reply
    return reply


def test_forget_erases_marker_everywhere(stack):
    marker = f"erasemark{secrets.token_hex(8)}"
    control = f"keepmark{secrets.token_hex(8)}"
    data_dir = Path(stack.config.data_dir)
    with Client(stack.endpoints, timeout=30) as client:
        # By importance: Maintain moves the five least important of the eight
        # keys of "secret" to IM, and the two least of those on to LTM.
        client.pipeline([
            Store(namespace="secret", key="deep", value={"text": f"the {marker} deep plumage"}, tags=[marker], importance=0.0),
            Store(namespace="secret", key="middle", value=f"{marker} middle plumage", importance=0.2),
            Store(namespace="secret", key="filler-low", value="filler low", importance=0.1),
            *[Store(namespace="secret", key=f"filler-{n}", value=f"filler {n}", importance=0.9) for n in range(5)],
            Store(namespace="kept", key="control", value=f"{control} stays lantern"),
        ])
        client.request(Maintain(id="move-down"), lane="low")
        shallow = client.request(Store(namespace="whole", key="shallow", value=f"{marker} shallow plumage"))
        client.request(Store(namespace="whole", key="sibling", value="another key of the namespace"))
        assert {client.get(key, namespace="secret").tier for key in ("deep", "middle")} == {"ltm", "im"}
        assert client.get("shallow", namespace="whole").tier in ("cache", "stm")
        before = search(client, "secret", "plumage", shallow.seq)
        assert {hit.key for hit in before.hits} == {"deep", "middle"}
        before_forget = client.status().last_seq

    # A snapshot and a view that hold the marker, taken before the Forgets.
    assert run_cli("snapshot", "--local", "--data-dir", str(data_dir)).returncode == 0
    view = run_cli("replay", "--to-seq", str(before_forget), "--local", "--view", "early", "--data-dir", str(data_dir))
    assert view.returncode == 0, view.stderr
    assert marker in snapshot_values(data_dir)
    assert files_containing(data_dir, marker.encode()), "the scan must see the marker while it is stored"
    assert view_get(data_dir, "early", "secret", "deep").value == {"text": f"the {marker} deep plumage"}

    with Client(stack.endpoints, timeout=30) as client:
        assert isinstance(client.request(Forget(namespace="secret", key="deep")), Ack)
        conditional = client.request(Forget(namespace="secret", key="middle", expected_version=1))
        assert isinstance(conditional, Ack), conditional
        last = client.request(Forget(namespace="whole"))
        assert isinstance(last, Ack)
        for namespace, key in (("secret", "deep"), ("secret", "middle"), ("whole", "shallow"), ("whole", "sibling")):
            assert isinstance(client.get(key, namespace=namespace), NotFound)
        assert client.get("control", namespace="kept").value == f"{control} stays lantern"
        assert search(client, "secret", "plumage", last.seq).hits == []
        assert search(client, "whole", "plumage", last.seq).hits == []
        assert [hit.key for hit in search(client, "kept", "lantern", last.seq).hits] == ["control"]

    assert run_cli("snapshot", "--local", "--data-dir", str(data_dir)).returncode == 0
    erased = run_cli("erase", "--json", "--data-dir", str(data_dir))
    assert erased.returncode == 0, erased.stderr
    report = json.loads(erased.stdout.strip().splitlines()[-1])
    assert report["records_erased"] >= 2
    assert len(report["aof_rewritten"]) == 4

    # The view built before the Forgets now reads the values as erased.
    erased_view = view_get(data_dir, "early", "secret", "deep")
    assert isinstance(erased_view, Value)
    assert erased_view.value is None
    assert erased_view.tags == []
    # A view built now, at the same point, and a replay of the log agree.
    again = run_cli("replay", "--to-seq", str(before_forget), "--local", "--view", "late", "--data-dir", str(data_dir))
    assert again.returncode == 0, again.stderr
    assert view_get(data_dir, "late", "secret", "middle").value is None
    event_log = RedisEventLog(redis.Redis.from_url(stack.config.log_url))
    replayed = [event for batch in event_log.iter_from(0) for event in batch if isinstance(event, Store)]
    assert marker not in json.dumps([msgspec.to_builtins(event) for event in replayed])
    assert control in json.dumps([msgspec.to_builtins(event) for event in replayed])
    rebuilt = rebuild(event_log, shards=2, policy=POLICY, until_seq=event_log.last_seq())
    verify = run_cli("replay", "--verify", "--local", "--json", "--data-dir", str(data_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout.strip().splitlines()[-1])["verified"] is True
    assert rebuilt.digests

    assert marker not in snapshot_values(data_dir)
    assert control in snapshot_values(data_dir)
    # Redis deletes the AOF files a rewrite replaced in the background.
    holding: list[str] = []

    def no_file_holds_the_marker() -> bool:
        holding[:] = files_containing(data_dir, marker.encode())
        return not holding

    try:
        wait_until(no_file_holds_the_marker, timeout=30, what="no file to hold the marker")
    except TimeoutError:
        pytest.fail(f"the forgotten marker is still in {holding}")
    assert files_containing(data_dir, control.encode()), "the scan must see a value that was never forgotten"
