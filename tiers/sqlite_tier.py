"""The SQLite tier backend, used for LTM: one database file per shard.

Deleted records leave no copy in the file or its WAL: see `SqliteTier` for
how, and `scrub_sqlite` for cleaning any SQLite file on demand.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import structlog

from tiers.base import Meta, Record, TierWrites
from tiers.checks import (
    WATERMARK_NAME,
    check_control,
    check_control_name,
    check_identity,
    check_watermark,
    check_writes,
)
from tiers.codec import (
    Compression,
    ValueCodec,
    compression_for,
    decode_meta,
    encode_meta,
)
from tiers.digest import digest_sorted_records
from tiers.errors import CorruptDataError, StorageError, storage_errors

__all__ = [
    "SCHEMA_VERSION",
    "ScrubResult",
    "SqliteTier",
    "scrub_sqlite",
    "truncate_wal",
]

log = structlog.get_logger("tiermem.tiers")

# The schema version, stored in `PRAGMA user_version`. Opening a file with
# another version raises CorruptDataError.
SCHEMA_VERSION = 1

# TEXT columns compare with SQLite's default BINARY collation, which compares
# UTF-8 bytes, so ORDER BY namespace, key is code point order, as in Python.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    meta BLOB NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS control (
    name TEXT NOT NULL PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identity (
    tier TEXT NOT NULL,
    shard INTEGER NOT NULL
);
"""

# Well below SQLite's limit of 999 bound parameters per statement in releases
# before 3.32, with two parameters per key.
_KEYS_PER_QUERY = 400

_SQLITE_ERRORS = (sqlite3.Error,)

# The maximum wait, in seconds, of the checkpoint after a deleting commit
# for readers in other connections to leave older snapshots. The shard's
# apply waits for it, so it is short, and a checkpoint that times out is
# retried after the next commit.
_SCRUB_TIMEOUT_S = 0.1


class ScrubResult(NamedTuple):
    """The outcome of a WAL checkpoint meant to remove deleted data from the files.

    `complete` means every WAL frame was copied into the database file and
    the WAL was truncated to 0 bytes, so no old page image is left in it.
    Otherwise a reader in another connection still used older frames, and
    `remaining_frames` of them were not copied (0 when all were copied but
    the WAL could not be truncated). `vacuumed` is true when VACUUM rebuilt
    the database file.
    """

    complete: bool
    remaining_frames: int
    vacuumed: bool = False


def truncate_wal(
    connection: sqlite3.Connection, *, timeout: float | None = None
) -> ScrubResult:
    """Checkpoint the whole WAL into the database file and truncate it to 0 bytes.

    This is `PRAGMA wal_checkpoint(TRUNCATE)`. The WAL keeps the page images
    of past commits, deleted rows included, until a checkpoint copies them
    back and the WAL is truncated. Frames that a reader in another
    connection still needs stay, so the checkpoint waits up to `timeout`
    seconds for such readers (the connection's own busy timeout when None)
    and then returns an incomplete result. A database not in WAL mode has
    no WAL, and the result is complete. Must run outside a transaction.
    Raises `sqlite3.Error` when SQLite fails.
    """
    previous_ms: int | None = None
    if timeout is not None:
        previous_ms = connection.execute("PRAGMA busy_timeout").fetchone()[0]
        connection.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    try:
        busy, frames, copied = connection.execute(
            "PRAGMA wal_checkpoint(TRUNCATE)"
        ).fetchone()
    finally:
        if previous_ms is not None:
            connection.execute(f"PRAGMA busy_timeout = {previous_ms}")
    if not busy:
        return ScrubResult(complete=True, remaining_frames=0)
    return ScrubResult(complete=False, remaining_frames=max(frames - copied, 0))


def scrub_sqlite(
    path: str | os.PathLike[str], *, vacuum: bool = False, timeout: float = 5.0
) -> ScrubResult:
    """Remove the traces of deleted rows from an SQLite file and its WAL.

    Checkpoints the WAL and truncates it to 0 bytes (`truncate_wal`). With
    `vacuum`, VACUUM then rebuilds the database file, so free pages and the
    free space inside pages of rows deleted without `secure_delete` are
    gone too, and the WAL is truncated again. VACUUM rewrites the whole
    file: it takes time and disk space in proportion to the file, and keeps
    the write lock meanwhile. The checkpoint waits up to `timeout` seconds
    for readers in other connections, so an incomplete result means a
    reader held on to old frames: call again once it is done.

    Works on any SQLite file: an LTM shard (also while its `SqliteTier` is
    open, even in another process) or the projection database. Raises
    FileNotFoundError when `path` is not a file and `sqlite3.Error` when
    SQLite fails.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"SQLite file {os.fspath(path)!r} not found")
    # mode=rw opens an existing file only, so a wrong path is never created.
    connection = sqlite3.connect(
        f"{file.resolve().as_uri()}?mode=rw",
        uri=True,
        isolation_level=None,
        timeout=timeout,
    )
    try:
        connection.execute("PRAGMA secure_delete = ON")
        result = truncate_wal(connection)
        if vacuum and result.complete:
            connection.execute("VACUUM")
            result = truncate_wal(connection)._replace(vacuumed=True)
    finally:
        connection.close()
    level = log.info if result.complete else log.warning
    level(
        "sqlite.scrub.completed",
        path=os.fspath(path),
        complete=result.complete,
        remaining_frames=result.remaining_frames,
        vacuumed=result.vacuumed,
    )
    return result


class SqliteTier:
    """A `Tier` stored in one SQLite database file.

    The file runs in WAL mode with `synchronous=FULL`. WAL lets readers in
    other connections (a replay verifying the file, a backup) run while this
    one writes. In WAL mode, `synchronous=NORMAL` syncs only at checkpoints,
    so a power loss can drop commits that were already acknowledged. FULL
    syncs the WAL at every COMMIT, so each commit that returns survives a
    crash of the process or of the host, on a disk that honours fsync.

    The connection is opened with `check_same_thread=False`, because the
    host of a shard may create the tier in one thread and call it from
    another (a worker thread, a thread pool). A lock serializes every use of
    the connection, so calls from two threads never interleave inside one
    transaction, and a page of `records` or `scan_meta` is read whole.

    Deleted records leave no copy on disk. The connection runs with
    `secure_delete=ON`, so SQLite overwrites a deleted row's bytes in its
    page, and freed pages (overflow pages of large values among them), with
    zeros. The WAL still contains the page images of earlier commits, so after
    every commit that deleted records (and when the tier opens) the tier
    checkpoints the WAL and truncates it to 0 bytes (`truncate_wal`). With
    its fsyncs that added about 1 ms to a commit of 1,000 small records on
    the 2-core development machine, so commits without deletes skip it.
    The checkpoint waits at most 0.1 s for readers in other connections,
    and if it cannot finish, the next commit retries it. `scrub` runs one
    on demand.

    The file remembers the tier name and shard it was created for, and
    opening it as another tier or shard raises CorruptDataError. Reads and
    scans fetch at most `chunk_size` rows per query. `timeout` is the maximum
    time in seconds to wait for another connection's write lock. Every method
    raises StorageError when SQLite fails.
    """

    def __init__(
        self,
        name: str,
        path: str | Path,
        shard: int,
        *,
        compression: Compression | None = None,
        chunk_size: int = 1000,
        timeout: float = 5.0,
    ) -> None:
        check_identity(name, shard)
        if chunk_size < 1:
            raise ValueError(f"chunk_size {chunk_size} is invalid: use 1 or more")

        self.name = name
        self.shard = shard
        self.path = Path(path)
        self.chunk_size = chunk_size
        self._codec = ValueCodec(compression or compression_for(name))
        self._lock = threading.RLock()
        # True while a deleting commit's WAL checkpoint has not completed.
        self._scrub_pending = False
        with self._errors("open"):
            # isolation_level=None turns off the module's implicit BEGIN, so
            # the transactions below are exactly the BEGIN ... COMMIT written.
            self._connection = sqlite3.connect(
                self.path,
                timeout=timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        try:
            with self._errors("open"):
                self._configure()
        except BaseException:
            self._connection.close()
            raise
        # A process that stopped between a deleting commit and its
        # checkpoint left the deleted rows in the WAL.
        self._scrub_wal()

    def __repr__(self) -> str:
        path = str(self.path)
        return f"SqliteTier(name={self.name!r}, shard={self.shard}, path={path!r})"

    def watermark(self) -> int:
        with self._errors("watermark"):
            row = self._connection.execute(
                "SELECT value FROM control WHERE name = ?", (WATERMARK_NAME,)
            ).fetchone()
        if row is None:
            return 0
        raw = row[0]
        if not isinstance(raw, bytes) or not raw.isdigit():
            raise CorruptDataError(
                f"watermark {raw!r} in {self.path} is not decimal digits",
                tier=self.name,
                shard=self.shard,
            )
        return int(raw)

    def get(self, namespace: str, key: str) -> Record | None:
        return self.get_many([(namespace, key)]).get((namespace, key))

    def get_many(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], Record]:
        # Repack each key as a tuple, so keys given as lists work, and drop repeats.
        identities = list(dict.fromkeys((namespace, key) for namespace, key in keys))
        found: dict[tuple[str, str], Record] = {}
        with self._errors("get_many"):
            for start in range(0, len(identities), _KEYS_PER_QUERY):
                chunk = identities[start : start + _KEYS_PER_QUERY]
                for row in self._connection.execute(
                    _lookup_query(len(chunk)), _flatten(chunk)
                ):
                    record = self._record(row)
                    found[(record.namespace, record.key)] = record
        return found

    def scan_meta(self) -> Iterator[tuple[str, str, Meta]]:
        for namespace, key, meta_blob in self._pages(
            "namespace, key, meta", "scan_meta"
        ):
            yield namespace, key, decode_meta(meta_blob)

    def records(self) -> Iterator[Record]:
        for row in self._pages("namespace, key, value, meta", "records"):
            yield self._record(row)

    def commit(
        self,
        writes: TierWrites,
        watermark: int,
        control: dict[str, bytes | None] | None = None,
    ) -> None:
        """Apply `writes`, the watermark and control values in one transaction.

        A touch of a record the tier does not contain is ignored. If any
        statement fails, the transaction is rolled back and nothing changes.
        The WAL checkpoint after a commit with deletes raises no SQLite
        error: it logs the failure and retries after the next commit.
        """
        check_writes(writes)
        check_watermark(watermark)
        check_control(control)
        puts = [
            (
                record.namespace,
                record.key,
                self._codec.encode(record.value),
                encode_meta(record.meta),
            )
            for record in writes.puts
        ]
        touches = [
            (encode_meta(meta), namespace, key)
            for namespace, key, meta in writes.touches
        ]
        control_sets = [(WATERMARK_NAME, str(watermark).encode())]
        control_deletes: list[tuple[str]] = []
        for name, value in (control or {}).items():
            if value is None:
                control_deletes.append((name,))
            else:
                control_sets.append((name, value))

        with self._errors("commit"), self._transaction():
            execute_many = self._connection.executemany
            execute_many(
                "DELETE FROM records WHERE namespace = ? AND key = ?", writes.deletes
            )
            execute_many("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)", puts)
            execute_many(
                "UPDATE records SET meta = ? WHERE namespace = ? AND key = ?", touches
            )
            execute_many("INSERT OR REPLACE INTO control VALUES (?, ?)", control_sets)
            execute_many("DELETE FROM control WHERE name = ?", control_deletes)
        if writes.deletes or self._scrub_pending:
            self._scrub_wal()

    def control(self, name: str) -> bytes | None:
        check_control_name(name)
        with self._errors("control"):
            row = self._connection.execute(
                "SELECT value FROM control WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else row[0]

    def put_control(self, name: str, value: bytes | None) -> None:
        """Write one control value in its own transaction."""
        check_control({name: value})
        with self._errors("put_control"):
            if value is None:
                self._connection.execute("DELETE FROM control WHERE name = ?", (name,))
            else:
                self._connection.execute(
                    "INSERT OR REPLACE INTO control VALUES (?, ?)", (name, value)
                )

    def digest(self) -> tuple[str, int]:
        return digest_sorted_records(self.records())

    def clear(self) -> None:
        """Delete every record and control value. The file keeps its tier and shard."""
        with self._errors("clear"), self._transaction():
            self._connection.execute("DELETE FROM records")
            self._connection.execute("DELETE FROM control")
        self._scrub_wal()

    def scrub(self, *, vacuum: bool = False) -> ScrubResult:
        """Checkpoint and truncate the WAL now, and with `vacuum` VACUUM the file too.

        Waits for readers in other connections up to the tier's `timeout`.
        See `scrub_sqlite` for what each step removes and costs.
        """
        with self._errors("scrub"):
            result = truncate_wal(self._connection)
            if vacuum and result.complete:
                self._connection.execute("VACUUM")
                result = truncate_wal(self._connection)._replace(vacuumed=True)
            self._scrub_pending = not result.complete
        return result

    def close(self) -> None:
        """Close the connection. Calling it again does nothing."""
        with self._errors("close"):
            self._connection.close()

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Hold the connection lock and raise SQLite errors as StorageError."""
        with self._lock, storage_errors(self.name, self.shard, action, _SQLITE_ERRORS):
            yield

    def _configure(self) -> None:
        connection = self._connection
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StorageError(
                f"{self.path} could not switch to WAL mode and is in {mode!r} "
                "mode: put the file on a local file system that supports "
                "shared memory",
                tier=self.name,
                shard=self.shard,
                action="open",
            )
        connection.execute("PRAGMA synchronous=FULL")
        secure = connection.execute("PRAGMA secure_delete=ON").fetchone()[0]
        if secure != 1:
            raise StorageError(
                f"{self.path}: SQLite {sqlite3.sqlite_version} did not turn on "
                f"secure_delete (it reports {secure!r}), so deleted records would "
                "stay readable in the file: use an SQLite build that supports it",
                tier=self.name,
                shard=self.shard,
                action="open",
            )

        with self._transaction():
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise CorruptDataError(
                    f"{self.path} has schema version {version}, but this release "
                    f"reads only version {SCHEMA_VERSION}",
                    tier=self.name,
                    shard=self.shard,
                )
            # executescript would COMMIT first, so run the statements one by one.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            row = connection.execute("SELECT tier, shard FROM identity").fetchone()
            if row is None:
                connection.execute(
                    "INSERT INTO identity VALUES (?, ?)", (self.name, self.shard)
                )
            elif tuple(row) != (self.name, self.shard):
                raise CorruptDataError(
                    f"{self.path} belongs to {row[0]} shard {row[1]}, not "
                    f"{self.name} shard {self.shard}: open it with its own tier "
                    "name and shard",
                    tier=self.name,
                    shard=self.shard,
                )

    def _transaction(self):
        return _Transaction(self._connection)

    def _scrub_wal(self) -> None:
        """Checkpoint and truncate the WAL after a delete, without failing the caller.

        The commit before it has already succeeded, so a failure here is
        logged and retried after the next commit instead of raised.
        """
        with self._lock:
            try:
                result = truncate_wal(self._connection, timeout=_SCRUB_TIMEOUT_S)
            except sqlite3.Error as error:
                self._scrub_pending = True
                log.error(
                    "sqlite.scrub.failed",
                    tier=self.name,
                    shard=self.shard,
                    path=str(self.path),
                    error=repr(error),
                    next="retrying after the next commit",
                )
                return
            if not result.complete and not self._scrub_pending:
                log.warning(
                    "sqlite.scrub.incomplete",
                    tier=self.name,
                    shard=self.shard,
                    path=str(self.path),
                    remaining_frames=result.remaining_frames,
                    next="a reader holds old WAL frames; retrying after each commit",
                )
            self._scrub_pending = not result.complete

    def _pages(self, columns: str, action: str) -> Iterator[tuple]:
        """Yield rows in (namespace, key) order, `chunk_size` rows per query.

        Each page is a short query resumed after the last key seen, so no read
        stays open between pages. An open read would keep WAL checkpoints from
        finishing, and a commit made between two pages shows in the later
        pages only.
        """
        first = f"SELECT {columns} FROM records ORDER BY namespace, key LIMIT ?"
        after = (
            f"SELECT {columns} FROM records WHERE (namespace, key) > (?, ?) "
            "ORDER BY namespace, key LIMIT ?"
        )
        with self._errors(action):
            rows = self._connection.execute(first, (self.chunk_size,)).fetchall()
        while rows:
            yield from rows
            if len(rows) < self.chunk_size:
                return
            last_namespace, last_key = rows[-1][0], rows[-1][1]
            with self._errors(action):
                rows = self._connection.execute(
                    after, (last_namespace, last_key, self.chunk_size)
                ).fetchall()

    def _record(self, row: tuple) -> Record:
        namespace, key, value_blob, meta_blob = row
        return Record(
            namespace, key, self._codec.decode(value_blob), decode_meta(meta_blob)
        )


class _Transaction:
    """A transaction: BEGIN IMMEDIATE on entry, then COMMIT, or ROLLBACK on error.

    IMMEDIATE takes the write lock at BEGIN. When another connection is
    writing, BEGIN waits up to the connection's timeout and fails there,
    before any statement of the transaction has run.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> None:
        self._connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            try:
                self._connection.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        if self._connection.in_transaction:
            self._connection.execute("ROLLBACK")


def _lookup_query(count: int) -> str:
    # A join on a VALUES list searches the primary key once per wanted key.
    # `(namespace, key) IN (VALUES ...)` would scan the whole table instead
    # (SQLite 3.40 query plan).
    pairs = ", ".join(["(?, ?)"] * count)
    return (
        f"WITH wanted(namespace, key) AS (VALUES {pairs}) "
        "SELECT records.namespace, records.key, records.value, records.meta "
        "FROM wanted JOIN records "
        "ON records.namespace = wanted.namespace AND records.key = wanted.key"
    )


def _flatten(identities: list[tuple[str, str]]) -> list[str]:
    return [part for identity in identities for part in identity]
