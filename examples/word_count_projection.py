"""A custom projection: how many words the current memories of each namespace contain.

Run it with the built-ins by naming it in a projection spec,

    run_projections(..., projections=[*builtin_projections(),
                                      "examples/word_count_projection.py:projection"])

or by registering it before the runner starts:

    from replay.projections import register
    register(projection)

It keeps the word count of every current key, so an overwrite, a `Forget`
or a maintenance delete takes the key's words out of its namespace's
total, and `word_counts` reads the totals.
"""

from __future__ import annotations

import os
import sqlite3

from events.types import Forget, Store
from replay.projections import EventWithEffects, OnError, Pipeline, Stage
from replay.projections.db import connect_readonly
from replay.projections.text import value_text, words


def create_tables(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS word_count_keys ("
        " namespace TEXT NOT NULL, key TEXT NOT NULL, words INTEGER NOT NULL,"
        " PRIMARY KEY (namespace, key)) WITHOUT ROWID"
    )
    conn.execute(
        "CREATE TABLE IF NOT EXISTS word_count_totals ("
        " namespace TEXT PRIMARY KEY, words INTEGER NOT NULL) WITHOUT ROWID"
    )


def _remove_key(conn: sqlite3.Connection, namespace: str, key: str) -> None:
    row = conn.execute(
        "SELECT words FROM word_count_keys WHERE namespace = ? AND key = ?",
        (namespace, key),
    ).fetchone()
    if row is not None:
        conn.execute(
            "DELETE FROM word_count_keys WHERE namespace = ? AND key = ?",
            (namespace, key),
        )
        conn.execute(
            "UPDATE word_count_totals SET words = words - ? WHERE namespace = ?",
            (row[0], namespace),
        )


def count_words(conn: sqlite3.Connection, item: EventWithEffects) -> None:
    """Keep each namespace's total in step with its current keys."""
    event = item.event
    if item.conflicted:
        return  # a rejected conditional write changed nothing
    if isinstance(event, Store):
        _remove_key(conn, event.namespace, event.key)
        count = len(words(value_text(event.value)))
        conn.execute(
            "INSERT INTO word_count_keys (namespace, key, words) VALUES (?, ?, ?)",
            (event.namespace, event.key, count),
        )
        conn.execute(
            "INSERT INTO word_count_totals (namespace, words) VALUES (?, ?) "
            "ON CONFLICT (namespace) DO UPDATE SET words = words + excluded.words",
            (event.namespace, count),
        )
    elif isinstance(event, Forget) and event.key is None:
        # A Forget of the whole namespace.
        conn.execute("DELETE FROM word_count_keys WHERE namespace = ?", (event.namespace,))
        conn.execute("DELETE FROM word_count_totals WHERE namespace = ?", (event.namespace,))
    elif isinstance(event, Forget):
        _remove_key(conn, event.namespace, event.key)
    for effect in item.effects:
        if effect.kind == "delete":
            _remove_key(conn, effect.namespace, effect.key)


projection = Pipeline(
    "word_count",
    [Stage("count", count_words, setup=create_tables, on_error=OnError.FAIL)],
)


def word_counts(db_path: str | os.PathLike[str]) -> dict[str, int]:
    """Return the word total of every namespace the projection has seen."""
    conn = connect_readonly(db_path)
    try:
        rows = conn.execute(
            "SELECT namespace, words FROM word_count_totals ORDER BY namespace"
        ).fetchall()
    finally:
        conn.close()
    return dict(rows)
