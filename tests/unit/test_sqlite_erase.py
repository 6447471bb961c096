"""Secure deletion in SQLite files: the LTM tier's deletes, its WAL, `scrub_sqlite`."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tiers.base import Meta, Record, TierWrites
from tiers.codec import Compression
from tiers.sqlite_tier import SqliteTier, scrub_sqlite

MARKER = b"qzvmarker7731"
# Enough small records that the table spans many pages, interior pages included.
FILLER = 3000


def files_with(directory: Path, needle: bytes) -> list[str]:
    """Return the names of the files under `directory` whose bytes contain `needle`."""
    return sorted(
        path.name
        for path in directory.rglob("*")
        if path.is_file() and needle in path.read_bytes()
    )


def meta(**changes) -> Meta:
    fields = {
        "importance": 0.5,
        "tags": (),
        "created_ts": 1,
        "updated_ts": 1,
        "accessed_ts": 1,
        "access_count": 0,
        "version": 1,
        "tier_since_ts": 1,
    }
    fields.update(changes)
    return Meta(**fields)


def filler(start: int, count: int) -> TierWrites:
    return TierWrites(
        puts=[
            Record("ns", f"k{i:05d}", {"text": f"filler text {i}"}, meta())
            for i in range(start, start + count)
        ]
    )


MARKED_VALUES = {
    # A short value: stored raw, in the leaf page of its row.
    "short": MARKER.decode(),
    # About 60 KB: the row spills onto overflow pages, which a delete frees.
    "large": " ".join([MARKER.decode(), *(f"word{i}" for i in range(8000))]),
    "nested": {"note": {"body": [MARKER.decode(), 7]}},
}


def marked_record(value: object) -> Record:
    tag = "tag-" + MARKER.decode()
    return Record("ns", "key-" + MARKER.decode(), value, meta(tags=(tag,)))


@pytest.fixture
def tier_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ltm"
    directory.mkdir()
    return directory


@pytest.fixture
def raw_tier(tier_dir: Path) -> Iterator[SqliteTier]:
    """An LTM tier that stores values uncompressed, so the marker is plain bytes."""
    tier = SqliteTier(
        "ltm", tier_dir / "ltm-0.sqlite3", 0, compression=Compression(level=None)
    )
    yield tier
    tier.close()


@pytest.mark.parametrize("kind", sorted(MARKED_VALUES))
def test_ltm_delete_leaves_no_marker(raw_tier, tier_dir, kind):
    raw_tier.commit(filler(0, FILLER // 2), watermark=1)
    raw_tier.commit(TierWrites(puts=[marked_record(MARKED_VALUES[kind])]), watermark=2)
    raw_tier.commit(filler(FILLER // 2, FILLER // 2), watermark=3)
    assert files_with(tier_dir, MARKER) != []

    key = ("ns", "key-" + MARKER.decode())
    raw_tier.commit(TierWrites(deletes=[key]), watermark=4)

    assert files_with(tier_dir, MARKER) == []
    assert (tier_dir / "ltm-0.sqlite3-wal").stat().st_size == 0
    assert raw_tier.get(*key) is None
    assert len(list(raw_tier.records())) == FILLER


def test_ltm_delete_compressed_value(tier_dir):
    # The default LTM compression stores a short value raw, so its bytes are
    # on disk as written, and must go with the delete.
    tier = SqliteTier("ltm", tier_dir / "ltm-0.sqlite3", 0)
    try:
        tier.commit(
            TierWrites(puts=[marked_record(MARKED_VALUES["short"])]), watermark=1
        )
        assert files_with(tier_dir, MARKER) != []

        tier.commit(TierWrites(deletes=[("ns", "key-" + MARKER.decode())]), watermark=2)

        assert files_with(tier_dir, MARKER) == []
    finally:
        tier.close()


def test_ltm_delete_of_many_rows(raw_tier, tier_dir):
    # Every third record is deleted, so some deleted rows were dividers in
    # interior pages and some pages merge.
    writes = TierWrites(
        puts=[
            Record("ns", f"k{i:05d}", f"secret{i:05d}x", meta()) for i in range(FILLER)
        ]
    )
    raw_tier.commit(writes, watermark=1)
    deleted = [("ns", f"k{i:05d}") for i in range(0, FILLER, 3)]

    raw_tier.commit(TierWrites(deletes=deleted), watermark=2)

    for i in (0, 3, FILLER // 2 - FILLER // 2 % 3, FILLER - 3):
        assert files_with(tier_dir, f"secret{i:05d}x".encode()) == []
    assert files_with(tier_dir, b"secret00001x") != []
    assert len(list(raw_tier.records())) == FILLER - len(deleted)


def test_ltm_overwrite_then_delete(raw_tier, tier_dir):
    key = "key-" + MARKER.decode()
    raw_tier.commit(
        TierWrites(puts=[marked_record("first " + MARKER.decode())]), watermark=1
    )
    raw_tier.commit(
        TierWrites(puts=[Record("ns", key, "second version", meta())]), watermark=2
    )

    raw_tier.commit(TierWrites(deletes=[("ns", key)]), watermark=3)

    assert files_with(tier_dir, MARKER) == []


def test_ltm_commit_without_delete_keeps_wal(raw_tier, tier_dir):
    raw_tier.commit(filler(0, 100), watermark=1)

    assert (tier_dir / "ltm-0.sqlite3-wal").stat().st_size > 0


def test_ltm_checkpoint_retried_after_reader(raw_tier, tier_dir):
    path = tier_dir / "ltm-0.sqlite3"
    raw_tier.commit(
        TierWrites(puts=[marked_record(MARKED_VALUES["short"])]), watermark=1
    )
    with closing(sqlite3.connect(path, isolation_level=None)) as reader:
        # An open read transaction pins the WAL frames of its snapshot.
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM records").fetchone()
        raw_tier.commit(
            TierWrites(deletes=[("ns", "key-" + MARKER.decode())]), watermark=2
        )
        assert files_with(tier_dir, MARKER) == ["ltm-0.sqlite3-wal"]
        reader.execute("COMMIT")

        raw_tier.commit(filler(0, 1), watermark=3)

        assert files_with(tier_dir, MARKER) == []


def test_ltm_open_truncates_leftover_wal(tier_dir):
    path = tier_dir / "ltm-0.sqlite3"
    SqliteTier("ltm", path, 0, compression=Compression(level=None)).close()
    # Another connection deletes a row with secure_delete but never
    # checkpoints, like a process killed between a commit and its checkpoint.
    # It stays open, so closing it does not checkpoint and remove the WAL.
    with closing(sqlite3.connect(path, isolation_level=None)) as writer:
        writer.execute("PRAGMA secure_delete = ON")
        writer.execute(
            "INSERT INTO records VALUES ('ns', 'k', ?, x'00')", (b"\x00" + MARKER,)
        )
        writer.execute("DELETE FROM records")
        assert files_with(tier_dir, MARKER) == ["ltm-0.sqlite3-wal"]

        tier = SqliteTier("ltm", path, 0)
        try:
            assert files_with(tier_dir, MARKER) == []
        finally:
            tier.close()


def test_ltm_clear_leaves_no_marker(raw_tier, tier_dir):
    raw_tier.commit(
        TierWrites(puts=[marked_record(MARKED_VALUES["large"])]), watermark=1
    )

    raw_tier.clear()

    assert files_with(tier_dir, MARKER) == []


def test_ltm_uses_secure_delete(raw_tier):
    # secure_delete is a setting of each connection, so ask the tier's own.
    assert raw_tier._connection.execute("PRAGMA secure_delete").fetchone()[0] == 1


def test_ltm_scrub_with_vacuum(raw_tier, tier_dir):
    raw_tier.commit(filler(0, FILLER), watermark=1)
    raw_tier.commit(
        TierWrites(deletes=[("ns", f"k{i:05d}") for i in range(FILLER)]), watermark=2
    )
    assert raw_tier.scrub() == (True, 0, False)
    size_before = (tier_dir / "ltm-0.sqlite3").stat().st_size

    result = raw_tier.scrub(vacuum=True)

    assert result.complete
    assert result.vacuumed
    assert (tier_dir / "ltm-0.sqlite3").stat().st_size < size_before
    assert (tier_dir / "ltm-0.sqlite3-wal").stat().st_size == 0
    assert raw_tier.watermark() == 2


def insecure_file(path: Path) -> None:
    """Write a file whose deleted marker row stays in free space: no secure_delete."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA secure_delete = OFF")
        conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB)")
        conn.executemany(
            "INSERT INTO t VALUES (?, ?)",
            [(f"k{i}", b"filler" * 10) for i in range(500)],
        )
        conn.execute("INSERT INTO t VALUES ('m', ?)", (MARKER * 500,))
        conn.execute("DELETE FROM t WHERE k = 'm'")


def test_scrub_sqlite_vacuum_removes_free_space(tmp_path):
    path = tmp_path / "insecure.db"
    insecure_file(path)
    assert files_with(tmp_path, MARKER) == ["insecure.db"]

    result = scrub_sqlite(path, vacuum=True)

    assert result.complete
    assert result.vacuumed
    assert files_with(tmp_path, MARKER) == []
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 500


def test_scrub_sqlite_without_vacuum_keeps_free_space(tmp_path):
    # Without secure_delete at delete time, only VACUUM clears the free space.
    path = tmp_path / "insecure.db"
    insecure_file(path)

    result = scrub_sqlite(path)

    assert result.complete
    assert not result.vacuumed
    assert files_with(tmp_path, MARKER) == ["insecure.db"]


def test_scrub_sqlite_truncates_open_tier_wal(raw_tier, tier_dir):
    raw_tier.commit(filler(0, 100), watermark=1)
    assert (tier_dir / "ltm-0.sqlite3-wal").stat().st_size > 0

    result = scrub_sqlite(tier_dir / "ltm-0.sqlite3")

    assert result.complete
    assert (tier_dir / "ltm-0.sqlite3-wal").stat().st_size == 0
    assert raw_tier.watermark() == 1


def test_scrub_sqlite_reports_reader(raw_tier, tier_dir):
    path = tier_dir / "ltm-0.sqlite3"
    raw_tier.commit(filler(0, 10), watermark=1)
    with closing(sqlite3.connect(path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM records").fetchone()
        raw_tier.commit(filler(10, 10), watermark=2)

        result = scrub_sqlite(path, vacuum=True, timeout=0.0)

        assert not result.complete
        assert not result.vacuumed
        reader.execute("COMMIT")


def test_scrub_sqlite_missing_file(tmp_path):
    path = tmp_path / "missing.db"

    with pytest.raises(FileNotFoundError, match="missing.db"):
        scrub_sqlite(path)

    assert not os.path.exists(path)
