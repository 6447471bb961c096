"""The namespace and key views: paged keys, and a key's history with its values.

The key lists come from the stats projection's `stats_keys` table, one page
per query. In key order the pages are keyset pages on the primary key, so
each costs the same in a namespace of any size. By reads they are
LIMIT/OFFSET pages on the access-count index, which cost more the deeper
they are. The stats projection does not keep importance or tags, so they
are taken from each listed key's latest `Store` in the log, found through
the history projection.

Forgotten values are never returned. A `Store` value is hidden when an
effective `Forget` of the key comes after it: one the history projection
recorded, or any `Forget` of the key in the log after the history
projection's checkpoint, which the projection has not read yet.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import redis

from events.log import RedisEventLog
from events.types import Event, Forget, Store
from replay.projections import history as history_entries
from replay.projections.db import read_checkpoint, read_transaction
from replay.projections.history import HISTORY
from replay.projections.stats import STATS
from tiermem.console.sources import InvalidRequestError, StackDownError, StackSources

__all__ = [
    "KEY_ORDERS",
    "MAX_PAGE",
    "key_history",
    "key_page",
    "namespaces",
    "read_events",
    "render_value",
    "require_key",
]

KEY_ORDERS = ("key", "reads")
"""`key`: keyset paging in key order; `reads`: most read first, LIMIT/OFFSET."""

MAX_PAGE = 500
"""The largest page of keys or history entries one request returns."""

# Events read from the log past the history checkpoint to find Forgets the
# projection has not recorded yet. Further behind than this, values are
# hidden until the projection catches up, because a Forget may be among the
# unread events.
MAX_UNPROJECTED_EVENTS = 20_000

# Seqs closer than this are read from the log in one range read.
_READ_SPAN = 2_000

# Time the key page spends reading importance from the log before it
# returns the rest of the page without it.
_IMPORTANCE_BUDGET_S = 0.4

_json = msgspec.json.Encoder()


def render_value(value: Any, limit: int) -> tuple[str, bool]:
    """Return the value as JSON text cut to `limit` characters, and whether it was cut."""
    text = _json.encode(value).decode()
    if len(text) <= limit:
        return text, False
    return text[: limit - 1] + "…", True


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequestError(f"limit {limit} is invalid: use 1 to {MAX_PAGE}")
    return limit


def read_events(sources: StackSources, seqs: Iterable[int]) -> dict[int, Event]:
    """Return the logged events at `seqs`, reading nearby seqs in one range read."""
    wanted = sorted(set(seqs))
    found: dict[int, Event] = {}
    event_log: RedisEventLog = sources.event_log()
    index = 0
    try:
        while index < len(wanted):
            first = wanted[index]
            end = index
            while end + 1 < len(wanted) and wanted[end + 1] - first < _READ_SPAN:
                end += 1
            last = wanted[end]
            for event in event_log.read(first - 1, last - first + 1):
                if event.seq is not None:
                    found[event.seq] = event
            index = end + 1
    except redis.RedisError as error:
        raise sources.log_down(error) from error
    return {seq: found[seq] for seq in wanted if seq in found}


# ----------------------------------------------------------- namespaces


def namespaces(conn: sqlite3.Connection) -> dict[str, Any]:
    """Return every namespace with current records, with its record count per tier."""
    with read_transaction(conn):
        seq = read_checkpoint(conn, STATS)
        rows = conn.execute(
            "SELECT namespace, tier, records, bytes FROM stats_tiers ORDER BY namespace, tier"
        ).fetchall()
    found: dict[str, dict[str, Any]] = {}
    for namespace, tier, records, size in rows:
        item = found.setdefault(
            namespace, {"namespace": namespace, "records": 0, "bytes": 0, "tiers": {}}
        )
        item["tiers"][tier] = records
        item["records"] += records
        item["bytes"] += size
    return {"stats_seq": seq, "namespaces": list(found.values())}


def _latest_seqs(
    conn: sqlite3.Connection, namespace: str, keys: list[str], kind: str
) -> dict[str, int]:
    """Return the seq of each key's latest history entry of `kind`."""
    found: dict[str, int] = {}
    # SQLite 3.32 and later allow 32,766 parameters per statement, far more than 500.
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT key, max(seq) FROM history WHERE namespace = ? AND key IN ({marks}) "
            "AND kind = ? GROUP BY key",
            (namespace, *chunk, kind),
        ).fetchall()
        found.update({key: seq for key, seq in rows})
    return found


def key_page(
    sources: StackSources,
    conn: sqlite3.Connection,
    namespace: str,
    *,
    order: str = "key",
    after: str | None = None,
    offset: int = 0,
    limit: int = 100,
) -> dict[str, Any]:
    """Return one page of a namespace's current keys from the stats projection.

    In `key` order the page starts after the key `after` (keyset paging);
    in `reads` order it starts at `offset`. `next_after` and `next_offset`
    continue the listing, and are None on the last page.
    """
    _check_limit(limit)
    if order not in KEY_ORDERS:
        raise InvalidRequestError(
            f"order {order!r} is invalid: use one of {', '.join(KEY_ORDERS)}"
        )
    if offset < 0:
        raise InvalidRequestError(f"offset {offset} is invalid: use 0 or more")
    columns = "key, tier, bytes, access_count, last_access_ts, updated_ts, expires_ts"
    with read_transaction(conn):
        stats_seq = read_checkpoint(conn, STATS)
        history_seq = read_checkpoint(conn, HISTORY)
        total = conn.execute(
            "SELECT coalesce(sum(records), 0) FROM stats_tiers WHERE namespace = ?",
            (namespace,),
        ).fetchone()[0]
        if order == "key":
            rows = conn.execute(
                f"SELECT {columns} FROM stats_keys WHERE namespace = ? AND key > ? ORDER BY key LIMIT ?",
                (namespace, after or "", limit + 1),
            ).fetchall()
        else:
            # Backward over the (namespace, access_count, last_access_ts, key)
            # index, so SQLite reads only the rows of the page and the offset.
            rows = conn.execute(
                f"SELECT {columns} FROM stats_keys WHERE namespace = ? "
                "ORDER BY access_count DESC, last_access_ts DESC, key DESC LIMIT ? OFFSET ?",
                (namespace, limit + 1, offset),
            ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        store_seqs = _latest_seqs(conn, namespace, [row[0] for row in rows], "store")
    keys = [
        {
            "key": key,
            "tier": tier,
            "bytes": size,
            "access_count": count,
            "last_access_ts": last_access,
            "updated_ts": updated,
            "expires_ts": expires,
            "importance": None,
            "tags": None,
        }
        for key, tier, size, count, last_access, updated, expires in rows
    ]
    try:
        complete = _add_importance(sources, keys, store_seqs)
        importance_error = None
    except StackDownError as error:
        complete, importance_error = False, str(error)
    next_after = keys[-1]["key"] if more and order == "key" else None
    next_offset = offset + len(keys) if more and order == "reads" else None
    return {
        "namespace": namespace,
        "order": order,
        "total": total,
        "stats_seq": stats_seq,
        "history_seq": history_seq,
        "keys": keys,
        "importance_complete": complete,
        "importance_error": importance_error,
        "next_after": next_after,
        "next_offset": next_offset,
    }


def _add_importance(
    sources: StackSources, keys: list[dict[str, Any]], store_seqs: dict[str, int]
) -> bool:
    """Fill in importance and tags from each key's latest Store; return whether all were read.

    Reads stop after a time budget, so a page whose Stores are spread over
    a long log still loads quickly; the rest show no importance.
    """
    wanted = [
        (item, store_seqs[item["key"]]) for item in keys if item["key"] in store_seqs
    ]
    deadline = time.monotonic() + _IMPORTANCE_BUDGET_S
    complete = len(wanted) == len(keys)
    for start in range(0, len(wanted), 50):
        if time.monotonic() > deadline:
            return False
        chunk = wanted[start : start + 50]
        events = read_events(sources, [seq for _, seq in chunk])
        for item, seq in chunk:
            event = events.get(seq)
            if isinstance(event, Store) and event.key == item["key"]:
                item["importance"] = event.importance
                item["tags"] = list(event.tags)
            else:
                complete = False
    return complete


# ----------------------------------------------------------- one key


def _unprojected_forget(
    sources: StackSources, namespace: str, key: str, history_seq: int
) -> tuple[int | None, bool]:
    """Return the seq of the key's latest Forget after `history_seq` in the log, and whether the scan was complete.

    The scan reads at most MAX_UNPROJECTED_EVENTS events.
    """
    event_log = sources.event_log()
    latest: int | None = None
    try:
        last_seq = event_log.last_seq()
        if last_seq - history_seq > MAX_UNPROJECTED_EVENTS:
            return None, False
        for batch in event_log.iter_from(history_seq, last_seq):
            for event in batch:
                if (
                    isinstance(event, Forget)
                    and event.namespace == namespace
                    and event.key == key
                ):
                    latest = event.seq
    except redis.RedisError as error:
        raise sources.log_down(error) from error
    return latest, True


def key_history(
    sources: StackSources,
    conn: sqlite3.Connection,
    namespace: str,
    key: str,
    *,
    after: tuple[int, int] = (0, 0),
    limit: int = 200,
    value_limit: int = 4_000,
) -> dict[str, Any]:
    """Return a page of the key's history, oldest first, with the value of each Store.

    A Store's value is replaced by None, with `value_state` `forgotten`,
    when a Forget of the key comes after it. `current` describes the key
    now, from the stats projection, or is None when it has no record.
    """
    _check_limit(limit)
    with read_transaction(conn):
        history_seq = read_checkpoint(conn, HISTORY)
        stats_seq = read_checkpoint(conn, STATS)
        projected = _latest_seqs(conn, namespace, [key], "forget").get(key)
        row = conn.execute(
            "SELECT tier, bytes, access_count, last_access_ts, updated_ts, expires_ts "
            "FROM stats_keys WHERE namespace = ? AND key = ?",
            (namespace, key),
        ).fetchone()
        latest_store = _latest_seqs(conn, namespace, [key], "store").get(key)
    entries = history_entries(
        sources.projections_db, namespace, key, after=after, limit=limit + 1
    )
    more = len(entries) > limit
    entries = entries[:limit]

    values_note = None
    try:
        unprojected, scanned = _unprojected_forget(sources, namespace, key, history_seq)
    except StackDownError as error:
        unprojected, scanned = None, False
        values_note = f"Values are hidden because {error}"
    else:
        if not scanned:
            values_note = (
                f"Values are hidden: the history projection is more than {MAX_UNPROJECTED_EVENTS:,} "
                "events behind the log, and one of the events it has not read may be a Forget of this key"
            )
    forgets = [seq for seq in (projected, unprojected) if seq is not None]
    last_forget = max(forgets) if forgets else None

    def hidden(seq: int) -> bool:
        return not scanned or (last_forget is not None and seq < last_forget)

    shown_stores = [
        entry.seq
        for entry in entries
        if entry.kind == "store" and not hidden(entry.seq)
    ]
    if latest_store is not None and row is not None and not hidden(latest_store):
        shown_stores.append(latest_store)
    try:
        events = read_events(sources, shown_stores)
    except StackDownError as error:
        events = {}
        values_note = f"Values are not shown because {error}"

    items = []
    for entry in entries:
        item = msgspec.to_builtins(entry)
        item["value"] = None
        item["value_cut"] = False
        if entry.kind != "store":
            item["value_state"] = "none"
        elif hidden(entry.seq):
            item["value_state"] = "forgotten" if scanned else "withheld"
        elif isinstance(events.get(entry.seq), Store):
            item["value"], item["value_cut"] = render_value(
                events[entry.seq].value, value_limit
            )
            item["value_state"] = "shown"
        else:
            item["value_state"] = "missing"
        items.append(item)

    current = None
    if row is not None:
        tier, size, count, last_access, updated, expires = row
        current = {
            "tier": tier,
            "bytes": size,
            "access_count": count,
            "last_access_ts": last_access,
            "updated_ts": updated,
            "expires_ts": expires,
            "store_seq": latest_store,
            "importance": None,
            "tags": None,
            "value": None,
            "value_cut": False,
        }
        store = events.get(latest_store) if latest_store is not None else None
        if isinstance(store, Store):
            current["importance"] = store.importance
            current["tags"] = list(store.tags)
            current["value"], current["value_cut"] = render_value(
                store.value, value_limit
            )
        if unprojected is not None:
            # Forgotten after the projections' last read: the stats row is stale.
            current = None

    next_after = [entries[-1].seq, entries[-1].position] if more else None
    return {
        "namespace": namespace,
        "key": key,
        "history_seq": history_seq,
        "stats_seq": stats_seq,
        "forgotten_seq": last_forget,
        "values_withheld": not scanned,
        "values_note": values_note,
        "current": current,
        "entries": items,
        "next_after": next_after,
    }


def require_key(key: str | None, name: str = "key") -> str:
    """Return a non-empty key or namespace parameter, or raise InvalidRequestError."""
    if not key:
        raise InvalidRequestError(f"{name} is missing: name the {name} to show")
    if len(key.encode()) > 512 or "\x00" in key:
        raise InvalidRequestError(
            f"{name} {key[:40]!r} is invalid: use at most 512 bytes without NUL"
        )
    return key
