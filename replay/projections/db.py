"""The projection database: one SQLite file in WAL mode, its checkpoints and skips.

Every projection keeps its tables in the same file, next to one checkpoint
row per projection: the last log sequence number its tables cover. A batch
writes its rows and its checkpoint in one transaction, so after a crash the
tables and the checkpoint agree.

Forgotten values leave no copy in the file: writers delete with
`secure_delete` on, and a batch that applied a `Forget` records a scrub
request, which `scrub` serves by truncating the WAL after the commit.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from replay.projections.errors import DatabaseNotFoundError
from tiers.sqlite_tier import truncate_wal

__all__ = [
    "BUSY_TIMEOUT_S",
    "connect",
    "connect_readonly",
    "create_core_tables",
    "read_checkpoint",
    "read_checkpoints",
    "read_transaction",
    "request_scrub",
    "scrub",
    "write_checkpoint",
    "write_transaction",
]

log = structlog.get_logger("tiermem.projections")

# How long a connection waits for another writer (a second runner) to
# commit before it fails with "database is locked". A batch of 5,000 events
# commits in well under a second, so this only trips on a stuck writer.
BUSY_TIMEOUT_S = 30.0

_CORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS projection_checkpoints (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS projection_skips (
    projection TEXT NOT NULL,
    stage TEXT NOT NULL,
    seq INTEGER NOT NULL,
    error TEXT NOT NULL,
    PRIMARY KEY (projection, stage, seq)
);
CREATE TABLE IF NOT EXISTS projection_scrub (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
"""


def connect(db_path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open (creating if needed) the database for writing, in WAL mode.

    The connection is in autocommit mode, so every transaction is an
    explicit `write_transaction` or `read_transaction`. `synchronous=NORMAL`
    is enough for a projection: in WAL mode a power loss can lose the last
    commits, but each one contains its own checkpoint, so the runner simply
    consumes those events again. `secure_delete=ON` makes SQLite overwrite
    deleted rows and freed pages with zeros, so a forgotten memory's text
    does not stay in free space.
    """
    conn = sqlite3.connect(os.fspath(db_path), isolation_level=None, timeout=BUSY_TIMEOUT_S)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA secure_delete=ON")
    return conn


def connect_readonly(db_path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open an existing database for reading; raise `DatabaseNotFoundError` if missing."""
    path = Path(db_path)
    if not path.is_file():
        raise DatabaseNotFoundError(os.fspath(db_path))
    uri = f"{path.resolve().as_uri()}?mode=ro"
    return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run the block in a `BEGIN IMMEDIATE` transaction; roll back if it raises.

    IMMEDIATE takes the write lock at the start, so two runners never both
    read a checkpoint and then both write past it.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def read_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run the block in one read transaction, so all its queries read one snapshot."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


def create_core_tables(conn: sqlite3.Connection) -> None:
    """Create the checkpoint and skip tables if they are missing."""
    for statement in _CORE_SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def read_checkpoint(conn: sqlite3.Connection, name: str) -> int:
    """Return the checkpoint of projection `name`, 0 when it has none."""
    row = conn.execute(
        "SELECT seq FROM projection_checkpoints WHERE name = ?", (name,)
    ).fetchone()
    return int(row[0]) if row else 0


def read_checkpoints(conn: sqlite3.Connection, names: Iterable[str]) -> dict[str, int]:
    """Return the checkpoint of every named projection, 0 for those without one."""
    stored = dict(conn.execute("SELECT name, seq FROM projection_checkpoints").fetchall())
    return {name: int(stored.get(name, 0)) for name in names}


def write_checkpoint(conn: sqlite3.Connection, name: str, seq: int, ts: int) -> None:
    """Set the checkpoint of `name` to `seq`, the log ingest time `ts` of that event."""
    conn.execute(
        "INSERT INTO projection_checkpoints (name, seq, ts) VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, ts = excluded.ts",
        (name, seq, ts),
    )


def request_scrub(conn: sqlite3.Connection, seq: int) -> None:
    """Record, inside a batch's transaction, that a batch up to `seq` had a `Forget`."""
    conn.execute(
        "INSERT INTO projection_scrub (id, seq) VALUES (1, ?) "
        "ON CONFLICT (id) DO UPDATE SET seq = max(seq, excluded.seq)",
        (seq,),
    )


def scrub(conn: sqlite3.Connection, timeout: float) -> bool:
    """Serve a scrub request: truncate the WAL, then drop the request.

    The WAL keeps the page images of earlier commits, forgotten rows
    included, until a checkpoint copies them into the file and truncates
    it. The checkpoint waits up to `timeout` seconds for readers of older
    snapshots. Returns True when no request is left, and False when a
    reader kept the WAL from being truncated, so the request stays for the
    next call. Must run outside a transaction.
    """
    row = conn.execute("SELECT seq FROM projection_scrub WHERE id = 1").fetchone()
    if row is None:
        return True
    result = truncate_wal(conn, timeout=timeout)
    if not result.complete:
        log.warning(
            "projection.scrub.incomplete",
            db=conn.execute("PRAGMA database_list").fetchone()[2],
            seq=row[0],
            remaining_frames=result.remaining_frames,
            next="a reader holds old WAL frames; the next batch or run retries",
        )
        return False
    # A request that another runner recorded meanwhile has a higher seq and stays.
    conn.execute("DELETE FROM projection_scrub WHERE id = 1 AND seq <= ?", (row[0],))
    # The delete's own WAL frames are copies of pages already scrubbed, so
    # this second truncation only empties the WAL, and a reader may block it.
    truncate_wal(conn, timeout=timeout)
    return True
