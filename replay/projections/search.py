"""The search projection: an FTS5 index over the current memories of every tier.

A `Store` indexes the string leaves of its value and its tags (replacing an
older version of the key), `Forget` (of a key, or of every key of a
namespace) and maintenance deletes remove the memory, and maintenance moves
update its tier. `search` ranks matches with BM25; see
`replay.projections.text` for how text and queries are split.

FTS5 removes a deleted document's words from its index only when the
segments that contain them are merged, so a batch with a `Forget` ends
with an FTS5 `optimize`, which merges every segment into one.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence

import structlog
import xxhash

from events.types import Forget, SearchHit, Store
from replay.projections.base import EventWithEffects, Pipeline, Stage
from replay.projections.db import connect_readonly, read_checkpoint, read_transaction
from replay.projections.errors import DatabaseNotFoundError, ProjectionError
from replay.projections.text import (
    TOKEN_CATEGORIES,
    index_text,
    match_expression,
    strip_separators,
    value_text,
)

__all__ = ["SEARCH", "search", "search_projection", "wait_for_seq"]

log = structlog.get_logger("tiermem.projections")

SEARCH = "search"
"""The search projection's name, which is also its checkpoint key."""

_TOKENIZER = f"unicode61 remove_diacritics 2 categories '{TOKEN_CATEGORIES}'"
# SQLite builds without the `categories` option of unicode61 still get an
# index, in which emoji are not words and marks split words.
_FALLBACK_TOKENIZER = "unicode61"

_DOCS_SCHEMA = """
CREATE TABLE IF NOT EXISTS search_docs (
    docid INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    tier TEXT NOT NULL,
    seq INTEGER NOT NULL,
    expires_ts INTEGER,
    UNIQUE (namespace, key)
)
"""

# Column weights for bm25(): body, tags, namespace token. Tags are labels
# the writer chose, so a tag match counts double. The namespace token only
# filters, so it must not rank.
_WEIGHTS = "1.0, 2.0, 0.0"
_SNIPPET_TOKENS = 16


def _namespace_token(namespace: str) -> str:
    # One opaque word per namespace, so FTS5 intersects the query with the
    # namespace's documents instead of ranking every namespace's matches.
    # Queries still compare the namespace itself, so a hash collision
    # cannot leak another namespace's memories.
    return "n" + xxhash.xxh64_hexdigest(namespace.encode("utf-8"))


def _create_tables(conn: sqlite3.Connection) -> None:
    conn.execute(_DOCS_SCHEMA)
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'search_fts'"
    ).fetchone()
    if exists:
        return
    try:
        conn.execute(
            f'CREATE VIRTUAL TABLE search_fts USING fts5(body, tags, ns, tokenize="{_TOKENIZER}")'
        )
    except sqlite3.OperationalError as error:
        if "no such module" in str(error):
            raise ProjectionError(
                f"SQLite {sqlite3.sqlite_version} has no FTS5 module, which the "
                "search projection needs: use a Python built with FTS5 (the "
                "python.org and Debian builds have it)"
            ) from error
        log.warning(
            "projection.search.tokenizer_fallback",
            sqlite_version=sqlite3.sqlite_version,
            error=str(error),
            next=f"indexing with the plain {_FALLBACK_TOKENIZER} tokenizer; emoji are not searchable",
        )
        conn.execute(
            f"CREATE VIRTUAL TABLE search_fts USING fts5(body, tags, ns, tokenize='{_FALLBACK_TOKENIZER}')"
        )


def _docid(conn: sqlite3.Connection, namespace: str, key: str) -> int | None:
    row = conn.execute(
        "SELECT docid FROM search_docs WHERE namespace = ? AND key = ?", (namespace, key)
    ).fetchone()
    return row[0] if row else None


def _delete(conn: sqlite3.Connection, namespace: str, key: str) -> None:
    docid = _docid(conn, namespace, key)
    if docid is not None:
        conn.execute("DELETE FROM search_fts WHERE rowid = ?", (docid,))
        conn.execute("DELETE FROM search_docs WHERE docid = ?", (docid,))


def _delete_namespace(conn: sqlite3.Connection, namespace: str) -> None:
    conn.execute(
        "DELETE FROM search_fts WHERE rowid IN "
        "(SELECT docid FROM search_docs WHERE namespace = ?)",
        (namespace,),
    )
    conn.execute("DELETE FROM search_docs WHERE namespace = ?", (namespace,))


def _store(conn: sqlite3.Connection, event: Store) -> None:
    seq, ts = event.seq or 0, event.ts or 0
    expires = ts + event.ttl_s * 1000 if event.ttl_s is not None else None
    body = index_text(value_text(event.value))
    tags = index_text(" ".join(event.tags))
    docid = _docid(conn, event.namespace, event.key)
    if docid is None:
        cursor = conn.execute(
            "INSERT INTO search_docs (namespace, key, tier, seq, expires_ts) "
            "VALUES (?, ?, 'stm', ?, ?)",
            (event.namespace, event.key, seq, expires),
        )
        conn.execute(
            "INSERT INTO search_fts (rowid, body, tags, ns) VALUES (?, ?, ?, ?)",
            (cursor.lastrowid, body, tags, _namespace_token(event.namespace)),
        )
        return
    conn.execute(
        "UPDATE search_docs SET tier = 'stm', seq = ?, expires_ts = ? WHERE docid = ?",
        (seq, expires, docid),
    )
    conn.execute(
        "UPDATE search_fts SET body = ?, tags = ? WHERE rowid = ?", (body, tags, docid)
    )


def _apply_event(conn: sqlite3.Connection, item: EventWithEffects) -> None:
    event = item.event
    if item.conflicted:
        return
    if isinstance(event, Store):
        _store(conn, event)
    elif isinstance(event, Forget):
        if event.key is None:
            _delete_namespace(conn, event.namespace)
        else:
            _delete(conn, event.namespace, event.key)


def _apply_effects(conn: sqlite3.Connection, item: EventWithEffects) -> None:
    for effect in item.effects:
        if effect.kind == "move" and effect.target is not None:
            conn.execute(
                "UPDATE search_docs SET tier = ? WHERE namespace = ? AND key = ?",
                (effect.target, effect.namespace, effect.key),
            )
        elif effect.kind == "delete":
            _delete(conn, effect.namespace, effect.key)


def _merge_after_forget(
    conn: sqlite3.Connection, batch: Sequence[EventWithEffects]
) -> None:
    # A deleted document's words stay in the index's segments, with delete
    # markers in newer segments, until a merge of all of them drops both.
    # `optimize` rewrites the whole index: about 0.15 s for 100,000 short
    # documents (19 MB) on the 2-core development machine. So it runs once
    # per batch, and only after a Forget. A Forget of a key the index no
    # longer has also runs it, because the words of an earlier maintenance
    # delete of that key may still be in the segments.
    # TODO: with SQLite 3.44 or later, the FTS5 `secure-delete` option
    # removes the words at each delete and makes this merge unnecessary.
    if any(isinstance(item.event, Forget) and not item.conflicted for item in batch):
        conn.execute("INSERT INTO search_fts (search_fts) VALUES ('optimize')")


def search_projection() -> Pipeline:
    """Return a new search projection: stages `documents` (Store, Forget), `tiers` (effects)."""
    return Pipeline(
        SEARCH,
        [
            Stage("documents", _apply_event, setup=_create_tables),
            Stage("tiers", _apply_effects),
        ],
        finish=_merge_after_forget,
    )


def _has_index(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE name IN ('search_docs', 'search_fts')"
    ).fetchone()
    return row[0] == 2


def search(
    db_path: str | os.PathLike[str],
    namespace: str,
    query: str,
    limit: int = 10,
    *,
    now_ms: int | None = None,
) -> tuple[list[SearchHit], int]:
    """Return the best `limit` matches of `query` in `namespace`, and the index's seq.

    Every word of the query must occur in the memory's text or tags. Any
    text is a valid query: one without words returns no hits. Hits are best
    first; `score` is the negated BM25 rank, so higher is better. Memories
    whose TTL has run out by `now_ms` (default: the wall clock) are left
    out, as a `Get` would not find them, although maintenance has not
    deleted them yet. The seq is the search checkpoint that the hits
    reflect, 0 when the index does not exist yet.
    """
    if limit < 1:
        raise ValueError(f"limit {limit} is invalid: use 1 or more")
    expression = match_expression(query)
    try:
        conn = connect_readonly(db_path)
    except DatabaseNotFoundError:
        return [], 0
    try:
        with read_transaction(conn):
            if not _has_index(conn):
                return [], 0
            index_seq = read_checkpoint(conn, SEARCH)
            if expression is None:
                return [], index_seq
            now = int(time.time() * 1000) if now_ms is None else now_ms
            rows = conn.execute(
                f"SELECT d.key, d.tier, bm25(search_fts, {_WEIGHTS}) AS rank, "
                f"snippet(search_fts, 0, '', '', '…', {_SNIPPET_TOKENS}), search_fts.tags "
                "FROM search_fts JOIN search_docs AS d ON d.docid = search_fts.rowid "
                "WHERE search_fts MATCH ? AND d.namespace = ? "
                "AND (d.expires_ts IS NULL OR d.expires_ts > ?) "
                "ORDER BY rank, d.key LIMIT ?",
                (f'ns : "{_namespace_token(namespace)}" AND ({expression})', namespace, now, limit),
            ).fetchall()
    finally:
        conn.close()
    hits = [
        SearchHit(
            key=key,
            tier=tier,
            score=-rank,
            snippet=strip_separators(snippet or tags),
        )
        for key, tier, rank, snippet, tags in rows
    ]
    return hits, index_seq


def wait_for_seq(
    db_path: str | os.PathLike[str],
    min_seq: int,
    timeout: float,
    *,
    projection: str = SEARCH,
    interval: float = 0.01,
) -> bool:
    """Wait until `projection`'s checkpoint reaches `min_seq`; return whether it did.

    Polls the checkpoint every `interval` seconds for at most `timeout`
    seconds. A database that does not exist yet counts as checkpoint 0.
    """
    deadline = time.monotonic() + timeout
    conn: sqlite3.Connection | None = None
    try:
        while True:
            if conn is None:
                try:
                    conn = connect_readonly(db_path)
                except DatabaseNotFoundError:
                    conn = None
            current = 0 if conn is None else _checkpoint_or_zero(conn, projection)
            if current >= min_seq:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(interval, remaining))
    finally:
        if conn is not None:
            conn.close()


def _checkpoint_or_zero(conn: sqlite3.Connection, projection: str) -> int:
    try:
        return read_checkpoint(conn, projection)
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return 0  # the runner has not created its tables yet
        raise
