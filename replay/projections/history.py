"""The history projection: every event and effect that touched a key, in log order.

Entries come from the events themselves (`store`, `forget`, and `search`,
which names no key) and from the shards' effects (`read` with the tier
that served it, `move` with its target and reason, `delete` with its
reason). `history` lists one key's entries and `audit` a namespace's since
a time.

Entries contain key names and event metadata, never values. A search
query is the client's text, though, and may repeat a value, so every
`Forget` clears the query text of its namespace's earlier `search`
entries. A `Forget` of a key keeps the key's earlier entries and adds a
`forget` entry. A `Forget` of a whole namespace deletes every entry of the
namespace and leaves one `forget` entry without a key.
"""

from __future__ import annotations

import os
import sqlite3

import msgspec

from events.types import Forget, Search, Store
from handlers.effects import Effect
from replay.projections.base import EventWithEffects, Pipeline, Stage
from replay.projections.db import connect_readonly

__all__ = ["HISTORY", "HistoryEntry", "audit", "history", "history_projection"]

HISTORY = "history"
"""The history projection's name, which is also its checkpoint key."""

# NOTE: entries are never pruned, so the table grows with every Get. An
# operator who needs a bound deletes old rows by ts.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER NOT NULL,
    position INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    namespace TEXT NOT NULL,
    key TEXT,
    kind TEXT NOT NULL,
    tier TEXT,
    target TEXT,
    reason TEXT,
    request_id TEXT,
    query TEXT,
    PRIMARY KEY (seq, position)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_key ON history (namespace, key, seq, position);
CREATE INDEX IF NOT EXISTS history_ts ON history (namespace, ts);
CREATE INDEX IF NOT EXISTS history_queries ON history (namespace) WHERE query IS NOT NULL;
CREATE TABLE IF NOT EXISTS history_tiers (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    tier TEXT NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
"""

_COLUMNS = "seq, position, ts, namespace, key, kind, tier, target, reason, request_id, query"


class HistoryEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One thing that happened to a key, at log position (`seq`, `position`).

    `kind` is one of:

    - `store`: `tier` is `stm`.
    - `read`: `tier` served it (`cache`, `stm`, `im` or `ltm`), or is None
      when nothing was found.
    - `move`: from `tier` to `target` for `reason` `idle` or `capacity`.
    - `forget`: `tier` contained the key, None if it did not exist. With
      `key` None, the whole namespace was forgotten, and every earlier
      entry of the namespace is gone.
    - `delete`: from `tier` for `reason` `expired` or `evicted`.
    - `search`: no key, and `query` is the text, None once a later
      `Forget` in the namespace cleared it.
    - `conflict`: a conditional `Store` or `Forget` that was rejected and
      changed nothing. `reason` is "expected:actual" version.

    `request_id` is the id of the event, and `ts` its ingest time in Unix
    milliseconds.
    """

    seq: int
    position: int
    ts: int
    namespace: str
    key: str | None
    kind: str
    tier: str | None = None
    target: str | None = None
    reason: str | None = None
    request_id: str | None = None
    query: str | None = None


def _create_tables(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def _tier_of(conn: sqlite3.Connection, namespace: str, key: str) -> str | None:
    row = conn.execute(
        "SELECT tier FROM history_tiers WHERE namespace = ? AND key = ?", (namespace, key)
    ).fetchone()
    return row[0] if row else None


def _set_tier(conn: sqlite3.Connection, namespace: str, key: str, tier: str | None) -> None:
    if tier is None:
        conn.execute(
            "DELETE FROM history_tiers WHERE namespace = ? AND key = ?", (namespace, key)
        )
    else:
        conn.execute(
            "INSERT INTO history_tiers (namespace, key, tier) VALUES (?, ?, ?) "
            "ON CONFLICT (namespace, key) DO UPDATE SET tier = excluded.tier",
            (namespace, key, tier),
        )


def _clear_queries(conn: sqlite3.Connection, namespace: str) -> None:
    # Nothing links a query to the keys it matched, so a Forget of one key
    # clears every query of the namespace that may have repeated its value.
    # The partial index `history_queries` finds only the queries not yet
    # cleared, so a Forget costs the searches since the previous one.
    conn.execute(
        "UPDATE history SET query = NULL WHERE namespace = ? AND query IS NOT NULL",
        (namespace,),
    )


def _forget_namespace(conn: sqlite3.Connection, namespace: str) -> None:
    conn.execute("DELETE FROM history WHERE namespace = ?", (namespace,))
    conn.execute("DELETE FROM history_tiers WHERE namespace = ?", (namespace,))


def _event_entry(conn: sqlite3.Connection, item: EventWithEffects) -> HistoryEntry | None:
    event = item.event
    if item.conflicted:
        return None  # the `conflict` effect gets the entry, because nothing changed
    common = {"seq": item.seq, "position": 0, "ts": item.ts, "request_id": event.id}
    if isinstance(event, Store):
        _set_tier(conn, event.namespace, event.key, "stm")
        return HistoryEntry(
            namespace=event.namespace, key=event.key, kind="store", tier="stm", **common
        )
    if isinstance(event, Forget):
        if event.key is None:
            _forget_namespace(conn, event.namespace)
            return HistoryEntry(
                namespace=event.namespace, key=None, kind="forget", **common
            )
        _clear_queries(conn, event.namespace)
        tier = _tier_of(conn, event.namespace, event.key)
        _set_tier(conn, event.namespace, event.key, None)
        return HistoryEntry(
            namespace=event.namespace, key=event.key, kind="forget", tier=tier, **common
        )
    if isinstance(event, Search):
        return HistoryEntry(
            namespace=event.namespace, key=None, kind="search", query=event.query, **common
        )
    return None


def _effect_entry(
    conn: sqlite3.Connection, item: EventWithEffects, effect: Effect, position: int
) -> HistoryEntry | None:
    if effect.kind == "move":
        _set_tier(conn, effect.namespace, effect.key, effect.target)
    elif effect.kind == "delete":
        _set_tier(conn, effect.namespace, effect.key, None)
    elif effect.kind not in ("read", "conflict"):
        return None
    return HistoryEntry(
        seq=item.seq,
        position=position,
        ts=item.ts,
        namespace=effect.namespace,
        key=effect.key,
        kind=effect.kind,
        tier=effect.tier,
        target=effect.target,
        reason=effect.reason,
        request_id=item.event.id,
    )


def _entries(conn: sqlite3.Connection, item: EventWithEffects) -> list[HistoryEntry]:
    found: list[HistoryEntry] = []
    entry = _event_entry(conn, item)
    if entry is not None:
        found.append(entry)
    for effect in item.effects:
        entry = _effect_entry(conn, item, effect, len(found))
        if entry is not None:
            found.append(entry)
    return found


def _apply(conn: sqlite3.Connection, item: EventWithEffects) -> None:
    entries = _entries(conn, item)
    if entries:
        conn.executemany(
            f"INSERT INTO history ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [msgspec.structs.astuple(entry) for entry in entries],
        )


def history_projection() -> Pipeline:
    """Return a new history projection, one stage `entries`."""
    return Pipeline(HISTORY, [Stage("entries", _apply, setup=_create_tables)])


def _select(db_path: str | os.PathLike[str], where: str, parameters: tuple) -> list[HistoryEntry]:
    conn = connect_readonly(db_path)
    try:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM history WHERE {where}", parameters
        ).fetchall()
    finally:
        conn.close()
    fields = HistoryEntry.__struct_fields__
    return [HistoryEntry(**dict(zip(fields, row, strict=True))) for row in rows]


def history(
    db_path: str | os.PathLike[str],
    namespace: str,
    key: str,
    *,
    after: tuple[int, int] = (0, 0),
    limit: int = -1,
) -> list[HistoryEntry]:
    """Return the entries of one key after log position `after`, oldest first.

    `after` is a (seq, position) pair and `limit` bounds the count (-1: no
    bound), so a long history reads in pages: pass the last entry's
    (seq, position) as the next `after`. Raises `DatabaseNotFoundError`
    when the database does not exist.
    """
    after_seq, after_position = after
    return _select(
        db_path,
        "namespace = ? AND key = ? AND (seq > ? OR (seq = ? AND position > ?)) "
        "ORDER BY seq, position LIMIT ?",
        (namespace, key, after_seq, after_seq, after_position, limit),
    )


def audit(
    db_path: str | os.PathLike[str],
    namespace: str | None,
    since_ts: int,
    *,
    limit: int = -1,
) -> list[HistoryEntry]:
    """Return every entry of `namespace` (every namespace if None) with `ts >= since_ts`.

    Entries are in log order; `limit` bounds the count (-1: no bound).
    Raises `DatabaseNotFoundError` when the database does not exist.
    """
    if namespace is None:
        return _select(
            db_path, "ts >= ? ORDER BY seq, position LIMIT ?", (since_ts, limit)
        )
    return _select(
        db_path,
        "namespace = ? AND ts >= ? ORDER BY seq, position LIMIT ?",
        (namespace, since_ts, limit),
    )
