"""Tests of the snapshot file: round trip, checksum, corrupt files, choosing, pruning, loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import tiers.snapshot as snapshot_module
from handlers.policy import Policy
from handlers.shard import Shard
from tiers.base import TIER_NAMES, Meta, Record
from tiers.memory import MemoryTier
from tiers.snapshot import (
    CorruptSnapshotError,
    Snapshot,
    SnapshotVersionError,
    encode_snapshot,
    list_snapshots,
    load_into_tiers,
    newest_valid,
    prune_snapshots,
    read_header,
    read_snapshot,
    snapshot_path,
    write_snapshot,
)

FINGERPRINT = "0123456789abcdef:2"


def meta(touch: int = 0, **fields) -> Meta:
    base = dict(
        importance=0.5,
        tags=("a", "b"),
        created_ts=1_000,
        updated_ts=1_000,
        accessed_ts=1_000,
        access_count=0,
        version=1,
        tier_since_ts=1_000,
        expires_ts=None,
        cache_touch=touch,
        size=10,
    )
    base.update(fields)
    return Meta(**base)


def make_snapshot(watermark: int = 7, shard: int = 1, fingerprint: str = FINGERPRINT) -> Snapshot:
    values = [
        {"text": "héllo wörld", "nested": {"list": [1, 2.5, None, True]}},
        "plain",
        [1, [2, [3]]],
        b"\x00\xffbytes",
        12345678901234,
    ]
    records = {
        "stm": [Record("agent-1", f"k{i}", value, meta(touch=i)) for i, value in enumerate(values)],
        "im": [Record("agent-1", "old", {"x": 1}, meta(expires_ts=9_000, importance=0.9))],
        "ltm": [Record("agent-2", "deep", "z" * 5000, meta(access_count=7, tags=()))],
    }
    return Snapshot(shard=shard, shards=2, fingerprint=fingerprint, watermark=watermark, ts=123_456, tiers=records)


def test_snapshot_round_trip(tmp_path: Path):
    original = make_snapshot()

    path = write_snapshot(tmp_path, original)
    loaded = read_snapshot(path)

    assert path == tmp_path / "shard-1" / "00000000000000000007.snap"
    assert loaded == original
    assert loaded.digests() == original.digests()
    header = read_header(path)
    assert header.watermark == 7
    assert header.ts == 123_456
    assert header.fingerprint == FINGERPRINT
    assert header.records == {"stm": 5, "im": 1, "ltm": 1}


def test_snapshot_bytes_deterministic(tmp_path: Path):
    path = write_snapshot(tmp_path, make_snapshot())
    first = path.read_bytes()

    write_snapshot(tmp_path, make_snapshot())

    assert path.read_bytes() == first
    assert encode_snapshot(make_snapshot()) == first


def test_snapshot_write_leaves_no_temporary(tmp_path: Path):
    write_snapshot(tmp_path, make_snapshot())

    assert os.listdir(tmp_path / "shard-1") == ["00000000000000000007.snap"]


def test_snapshot_payload_is_compressed(tmp_path: Path):
    path = write_snapshot(tmp_path, make_snapshot())

    # The LTM value alone is 5,000 bytes of one letter.
    assert path.stat().st_size < 1500


@pytest.mark.parametrize(
    "cut", ["empty", "inside-magic", "inside-header", "half", "last-byte", "whole-checksum", "most-of-checksum"]
)
def test_truncated_snapshot_raises(tmp_path: Path, cut):
    path = write_snapshot(tmp_path, make_snapshot())
    data = path.read_bytes()
    sizes = {
        "empty": 0,
        "inside-magic": 5,
        "inside-header": 20,
        "half": len(data) // 2,
        "last-byte": len(data) - 1,
        "whole-checksum": len(data) - 32,
        "most-of-checksum": len(data) - 31,
    }
    path.write_bytes(data[: sizes[cut]])

    with pytest.raises(CorruptSnapshotError) as raised:
        read_snapshot(path)

    assert raised.value.path == path
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("where", ["header", "payload", "checksum"])
def test_damaged_snapshot_fails_checksum(tmp_path: Path, where):
    path = write_snapshot(tmp_path, make_snapshot())
    data = bytearray(path.read_bytes())
    offset = {"header": 20, "payload": len(data) // 2, "checksum": len(data) - 1}[where]
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(CorruptSnapshotError, match="SHA-256"):
        read_snapshot(path)


def test_foreign_file_is_not_snapshot(tmp_path: Path):
    path = snapshot_path(tmp_path, 0, 5)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * 200)

    with pytest.raises(CorruptSnapshotError, match="not a tiermem snapshot"):
        read_snapshot(path)


def test_renamed_snapshot_rejected(tmp_path: Path):
    """A file moved to another watermark's name would load the wrong position."""
    path = write_snapshot(tmp_path, make_snapshot(watermark=7))
    moved = snapshot_path(tmp_path, 1, 9)
    path.rename(moved)

    with pytest.raises(CorruptSnapshotError, match="belongs at"):
        read_snapshot(moved)


def test_other_schema_version_raises(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(snapshot_module, "SNAPSHOT_SCHEMA", 99)
    path = write_snapshot(tmp_path, make_snapshot())
    monkeypatch.undo()

    with pytest.raises(SnapshotVersionError) as raised:
        read_snapshot(path)

    assert raised.value.schema == 99
    assert "schema version 99" in str(raised.value)


def test_list_snapshots_oldest_first(tmp_path: Path):
    for watermark in (30, 4, 12):
        write_snapshot(tmp_path, make_snapshot(watermark=watermark))
    (tmp_path / "shard-1" / ".00000000000000000040.snap.1.tmp").write_bytes(b"partial")
    (tmp_path / "shard-1" / "notes.txt").write_text("not a snapshot")

    listed = list_snapshots(tmp_path, 1)

    assert [watermark for watermark, _ in listed] == [4, 12, 30]
    assert list_snapshots(tmp_path, 0) == []


def test_newest_valid_returns_newest(tmp_path: Path):
    for watermark in (3, 9, 6):
        write_snapshot(tmp_path, make_snapshot(watermark=watermark))

    found = newest_valid(tmp_path, 1, FINGERPRINT)

    assert found is not None
    assert found.watermark == 9


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_newest_valid_skips_corrupt(tmp_path: Path, damage):
    write_snapshot(tmp_path, make_snapshot(watermark=5))
    newest = write_snapshot(tmp_path, make_snapshot(watermark=8))
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))

    with capture_logs() as logs:
        found = newest_valid(tmp_path, 1, FINGERPRINT)

    assert found is not None
    assert found.watermark == 5
    skipped = [entry for entry in logs if entry["event"] == "snapshot.skipped"]
    assert len(skipped) == 1
    assert skipped[0]["log_level"] == "warning"
    assert skipped[0]["path"] == str(newest)
    assert "truncated" in skipped[0]["reason"]


def test_newest_valid_skips_other_fingerprint(tmp_path: Path):
    write_snapshot(tmp_path, make_snapshot(watermark=5))
    other = write_snapshot(tmp_path, make_snapshot(watermark=8, fingerprint="ffff:2"))

    with capture_logs() as logs:
        found = newest_valid(tmp_path, 1, FINGERPRINT)

    assert found is not None
    assert found.watermark == 5
    skipped = [entry for entry in logs if entry["event"] == "snapshot.skipped"]
    assert [entry["path"] for entry in skipped] == [str(other)]
    assert "fingerprint ffff:2" in skipped[0]["reason"]


def test_newest_valid_skips_other_schema(tmp_path: Path, monkeypatch):
    write_snapshot(tmp_path, make_snapshot(watermark=5))
    monkeypatch.setattr(snapshot_module, "SNAPSHOT_SCHEMA", 2)
    newer = write_snapshot(tmp_path, make_snapshot(watermark=8))
    monkeypatch.undo()

    with capture_logs() as logs:
        found = newest_valid(tmp_path, 1, FINGERPRINT)

    assert found is not None
    assert found.watermark == 5
    assert [entry["path"] for entry in logs if entry["event"] == "snapshot.skipped"] == [str(newer)]


def test_newest_valid_respects_max_seq(tmp_path: Path):
    for watermark in (3, 9):
        write_snapshot(tmp_path, make_snapshot(watermark=watermark))

    assert newest_valid(tmp_path, 1, FINGERPRINT, max_seq=8).watermark == 3
    assert newest_valid(tmp_path, 1, FINGERPRINT, max_seq=9).watermark == 9
    assert newest_valid(tmp_path, 1, FINGERPRINT, max_seq=2) is None


def test_newest_valid_none_when_all_corrupt(tmp_path: Path):
    path = write_snapshot(tmp_path, make_snapshot(watermark=5))
    path.write_bytes(path.read_bytes()[:-1])

    with capture_logs():
        assert newest_valid(tmp_path, 1, FINGERPRINT) is None
    assert newest_valid(tmp_path / "missing", 1, FINGERPRINT) is None


def test_prune_keeps_newest(tmp_path: Path):
    for watermark in (1, 2, 3, 4, 5):
        write_snapshot(tmp_path, make_snapshot(watermark=watermark))

    removed = prune_snapshots(tmp_path, 1, keep=3)

    assert [path.name for path in removed] == ["00000000000000000001.snap", "00000000000000000002.snap"]
    assert [watermark for watermark, _ in list_snapshots(tmp_path, 1)] == [3, 4, 5]
    assert prune_snapshots(tmp_path, 1, keep=3) == []
    with pytest.raises(ValueError, match="keep at least 1"):
        prune_snapshots(tmp_path, 1, keep=0)


def test_load_into_tiers_commits_records(monkeypatch):
    monkeypatch.setattr(snapshot_module, "_LOAD_CHUNK", 2)  # several commits for STM's 5 records
    snapshot = make_snapshot(watermark=7)
    tiers = {name: MemoryTier(name, 1) for name in TIER_NAMES}

    load_into_tiers(snapshot, tiers, {"marker": b"done"})

    for name in TIER_NAMES:
        assert tiers[name].digest() == snapshot.digests()[name]
        assert tiers[name].watermark() == 7
    assert tiers["stm"].control("marker") == b"done"
    assert tiers["im"].control("marker") is None


def test_shard_load_snapshot_rejects_other_fingerprint():
    shard = Shard(1, 2, {name: MemoryTier(name, 1) for name in TIER_NAMES}, Policy())

    with pytest.raises(ValueError, match="does not fit shard 1"):
        shard.load_snapshot(make_snapshot())


def test_shard_load_snapshot_restores_cache():
    shard = Shard(1, 2, {name: MemoryTier(name, 1) for name in TIER_NAMES}, Policy())
    snapshot = make_snapshot(fingerprint=shard.fingerprint)

    shard.load_snapshot(snapshot)

    assert shard.watermark == 7
    # cache_touch orders the cache; records with 0 are not cached.
    assert shard.state.cache_keys() == [("agent-1", f"k{i}") for i in range(1, 5)]
    digests = {item.tier: (item.digest, item.records) for item in shard.digests() if item.tier != "cache"}
    assert digests == snapshot.digests()
