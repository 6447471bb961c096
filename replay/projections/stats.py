"""The stats projection: records and bytes per tier per namespace, and key access.

Counts follow the records' tiers (STM, IM, LTM) through `Store`, `Forget`
and maintenance moves and deletes. Bytes are the MessagePack size of the
stored value (`events.limits.value_size`). Reads come from the shards'
`read` effects: per key (access count, last read) and per namespace by the
tier that served them. Cache membership is not tracked, because cache
evictions are not recorded as effects. A `Forget` of a key drops its row;
a `Forget` of a whole namespace drops every row of the namespace, its read
counts included.
"""

from __future__ import annotations

import os
import sqlite3

import msgspec

from events.limits import value_size
from events.types import Forget, Store
from replay.projections.base import EventWithEffects, Pipeline, Stage
from replay.projections.db import connect_readonly, read_checkpoint, read_transaction

__all__ = [
    "KeyStats",
    "NamespaceStats",
    "STATS",
    "StatsReport",
    "TierUsage",
    "cold_keys",
    "hot_keys",
    "stats",
    "stats_projection",
]

STATS = "stats"
"""The stats projection's name, which is also its checkpoint key."""

RECORD_TIERS = ("stm", "im", "ltm")
MISS = "miss"
"""The `served` value of reads that found nothing."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stats_keys (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    tier TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    access_count INTEGER NOT NULL,
    last_access_ts INTEGER,
    updated_ts INTEGER NOT NULL,
    expires_ts INTEGER,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS stats_keys_access
    ON stats_keys (namespace, access_count, last_access_ts);
CREATE TABLE IF NOT EXISTS stats_tiers (
    namespace TEXT NOT NULL,
    tier TEXT NOT NULL,
    records INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (namespace, tier)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stats_reads (
    namespace TEXT NOT NULL,
    served TEXT NOT NULL,
    reads INTEGER NOT NULL,
    PRIMARY KEY (namespace, served)
) WITHOUT ROWID;
"""


class TierUsage(msgspec.Struct, frozen=True, kw_only=True):
    """The records of one namespace in one tier, and their value bytes."""

    records: int = 0
    bytes: int = 0


class NamespaceStats(msgspec.Struct, frozen=True, kw_only=True):
    """Usage per tier (`stm`, `im`, `ltm`) and reads per serving tier of one namespace.

    `reads` maps `cache`, `stm`, `im`, `ltm` and `miss` (found nothing) to
    the number of `Get`s; a source that served none is absent.
    """

    namespace: str
    tiers: dict[str, TierUsage]
    reads: dict[str, int]


class StatsReport(msgspec.Struct, frozen=True, kw_only=True):
    """Stats of the namespaces, sorted by name, as of log position `seq`."""

    seq: int
    namespaces: list[NamespaceStats]


class KeyStats(msgspec.Struct, frozen=True, kw_only=True):
    """One current record: its tier, value bytes, reads and times (Unix ms)."""

    key: str
    tier: str
    bytes: int
    access_count: int
    last_access_ts: int | None
    updated_ts: int


def _create_tables(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def _adjust(
    conn: sqlite3.Connection, namespace: str, tier: str, records: int, size: int
) -> None:
    conn.execute(
        "INSERT INTO stats_tiers (namespace, tier, records, bytes) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (namespace, tier) DO UPDATE SET "
        "records = records + excluded.records, bytes = bytes + excluded.bytes",
        (namespace, tier, records, size),
    )
    if records < 0:
        conn.execute(
            "DELETE FROM stats_tiers WHERE namespace = ? AND tier = ? AND records <= 0",
            (namespace, tier),
        )


def _current(conn: sqlite3.Connection, namespace: str, key: str) -> tuple[str, int] | None:
    row = conn.execute(
        "SELECT tier, bytes FROM stats_keys WHERE namespace = ? AND key = ?",
        (namespace, key),
    ).fetchone()
    return (row[0], row[1]) if row else None


def _remove(conn: sqlite3.Connection, namespace: str, key: str) -> None:
    current = _current(conn, namespace, key)
    if current is None:
        return
    tier, size = current
    conn.execute("DELETE FROM stats_keys WHERE namespace = ? AND key = ?", (namespace, key))
    _adjust(conn, namespace, tier, -1, -size)


def _remove_namespace(conn: sqlite3.Connection, namespace: str) -> None:
    for table in ("stats_keys", "stats_tiers", "stats_reads"):
        conn.execute(f"DELETE FROM {table} WHERE namespace = ?", (namespace,))


def _store(conn: sqlite3.Connection, event: Store) -> None:
    ts = event.ts or 0
    size = value_size(event.value)
    expires = ts + event.ttl_s * 1000 if event.ttl_s is not None else None
    row = conn.execute(
        "SELECT expires_ts FROM stats_keys WHERE namespace = ? AND key = ?",
        (event.namespace, event.key),
    ).fetchone()
    if row is not None and row[0] is not None and row[0] <= ts:
        # The old record had expired (maintenance had not deleted it yet),
        # so this Store starts the key afresh, as the shard does.
        _remove(conn, event.namespace, event.key)
    current = _current(conn, event.namespace, event.key)
    if current is not None:
        _adjust(conn, event.namespace, current[0], -1, -current[1])
    # The access count and last read survive an overwrite, as in the
    # record's metadata. Forget and deletes drop them with the key.
    conn.execute(
        "INSERT INTO stats_keys (namespace, key, tier, bytes, access_count, "
        "last_access_ts, updated_ts, expires_ts) "
        "VALUES (?, ?, 'stm', ?, 0, NULL, ?, ?) "
        "ON CONFLICT (namespace, key) DO UPDATE SET tier = 'stm', "
        "bytes = excluded.bytes, updated_ts = excluded.updated_ts, "
        "expires_ts = excluded.expires_ts",
        (event.namespace, event.key, size, ts, expires),
    )
    _adjust(conn, event.namespace, "stm", 1, size)


def _apply_event(conn: sqlite3.Connection, item: EventWithEffects) -> None:
    event = item.event
    if item.conflicted:
        return
    if isinstance(event, Store):
        _store(conn, event)
    elif isinstance(event, Forget):
        if event.key is None:
            _remove_namespace(conn, event.namespace)
        else:
            _remove(conn, event.namespace, event.key)


def _count_read(conn: sqlite3.Connection, namespace: str, served: str) -> None:
    conn.execute(
        "INSERT INTO stats_reads (namespace, served, reads) VALUES (?, ?, 1) "
        "ON CONFLICT (namespace, served) DO UPDATE SET reads = reads + 1",
        (namespace, served),
    )


def _apply_effects(conn: sqlite3.Connection, item: EventWithEffects) -> None:
    for effect in item.effects:
        if effect.kind == "read":
            _count_read(conn, effect.namespace, effect.tier or MISS)
            if effect.tier is not None:
                conn.execute(
                    "UPDATE stats_keys SET access_count = access_count + 1, "
                    "last_access_ts = ? WHERE namespace = ? AND key = ?",
                    (item.ts, effect.namespace, effect.key),
                )
        elif effect.kind == "move" and effect.target is not None:
            current = _current(conn, effect.namespace, effect.key)
            if current is None:
                continue
            tier, size = current
            conn.execute(
                "UPDATE stats_keys SET tier = ? WHERE namespace = ? AND key = ?",
                (effect.target, effect.namespace, effect.key),
            )
            _adjust(conn, effect.namespace, tier, -1, -size)
            _adjust(conn, effect.namespace, effect.target, 1, size)
        elif effect.kind == "delete":
            _remove(conn, effect.namespace, effect.key)


def stats_projection() -> Pipeline:
    """Return a new stats projection: stages `records` (Store, Forget), `effects`."""
    return Pipeline(
        STATS,
        [
            Stage("records", _apply_event, setup=_create_tables),
            Stage("effects", _apply_effects),
        ],
    )


def _namespace_stats(conn: sqlite3.Connection, namespace: str) -> NamespaceStats:
    tiers = {tier: TierUsage() for tier in RECORD_TIERS}
    for tier, records, size in conn.execute(
        "SELECT tier, records, bytes FROM stats_tiers WHERE namespace = ? ORDER BY tier",
        (namespace,),
    ):
        tiers[tier] = TierUsage(records=records, bytes=size)
    reads = dict(
        conn.execute(
            "SELECT served, reads FROM stats_reads WHERE namespace = ? ORDER BY served",
            (namespace,),
        ).fetchall()
    )
    return NamespaceStats(namespace=namespace, tiers=tiers, reads=reads)


def stats(db_path: str | os.PathLike[str], namespace: str | None = None) -> StatsReport:
    """Return the stats of `namespace`, or of every namespace when it is None.

    A namespace the projection has not seen gets zero counts. Raises
    `DatabaseNotFoundError` when the database does not exist.
    """
    conn = connect_readonly(db_path)
    try:
        with read_transaction(conn):
            seq = read_checkpoint(conn, STATS)
            if namespace is not None:
                names = [namespace]
            else:
                names = [
                    row[0]
                    for row in conn.execute(
                        "SELECT namespace FROM stats_tiers UNION "
                        "SELECT namespace FROM stats_reads ORDER BY namespace"
                    )
                ]
            return StatsReport(
                seq=seq, namespaces=[_namespace_stats(conn, name) for name in names]
            )
    finally:
        conn.close()


def _keys(db_path: str | os.PathLike[str], namespace: str, n: int, order: str) -> list[KeyStats]:
    if n < 1:
        raise ValueError(f"n {n} is invalid: use 1 or more")
    conn = connect_readonly(db_path)
    try:
        rows = conn.execute(
            "SELECT key, tier, bytes, access_count, last_access_ts, updated_ts "
            f"FROM stats_keys WHERE namespace = ? ORDER BY {order} LIMIT ?",
            (namespace, n),
        ).fetchall()
    finally:
        conn.close()
    return [
        KeyStats(
            key=key,
            tier=tier,
            bytes=size,
            access_count=count,
            last_access_ts=last,
            updated_ts=updated,
        )
        for key, tier, size, count, last, updated in rows
    ]


def hot_keys(db_path: str | os.PathLike[str], namespace: str, n: int = 10) -> list[KeyStats]:
    """Return the `n` current keys read most often, most recently read first on ties."""
    return _keys(db_path, namespace, n, "access_count DESC, last_access_ts DESC, key")


def cold_keys(db_path: str | os.PathLike[str], namespace: str, n: int = 10) -> list[KeyStats]:
    """Return the `n` current keys read least often; on ties, least recently touched.

    A key is touched by a read or a `Store`, like the record's `accessed_ts`.
    """
    return _keys(
        db_path,
        namespace,
        n,
        "access_count, max(coalesce(last_access_ts, 0), updated_ts), key",
    )
