"""The search projection and query: hostile text, tiers, Forget, ranking."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.types import Forget, Get, Maintain, Search, Store
from handlers.effects import Effect
from replay.projections import EventWithEffects, search, wait_for_seq
from replay.projections.db import connect, create_core_tables, write_checkpoint, write_transaction
from replay.projections.search import search_projection

CORPUS = {
    "notes": "multi-agent systems share memory",
    "contraction": "don't forget the milk",
    "file": "see a.md for details",
    "quote": 'he said "unbalanced quotes are fine',
    "near": "NEAR the river bank",
    "colon": "col:value pairs in the config",
    "star": "rate it * out of five",
    "emoji": "pizza 🍕 party",
    "ja": "東京は晴れです",
    "ar": "مرحبا بالعالم",
    "ru": "Привет мир",
}


class Log:
    """Builds logged events with consecutive seqs and applies them to a database."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.seq = 0
        self.projection = search_projection()
        conn = connect(db_path)
        with write_transaction(conn):
            create_core_tables(conn)
            self.projection.setup(conn)
        conn.close()

    def event(self, cls, **fields):
        self.seq += 1
        return cls(id=f"e{self.seq}", seq=self.seq, ts=1_000_000 + self.seq, **fields)

    def apply(self, *items: EventWithEffects | object) -> None:
        batch = [item if isinstance(item, EventWithEffects) else EventWithEffects(item, ()) for item in items]
        conn = connect(self.db_path)
        with write_transaction(conn):
            self.projection.apply(conn, batch)
            write_checkpoint(conn, self.projection.name, batch[-1].seq, batch[-1].ts)
        conn.close()


@pytest.fixture
def log(tmp_path) -> Log:
    return Log(tmp_path / "projections.db")


@pytest.fixture(scope="module")
def corpus_db(tmp_path_factory) -> Path:
    built = Log(tmp_path_factory.mktemp("search") / "projections.db")
    built.apply(*[built.event(Store, namespace="a", key=key, value={"text": text}) for key, text in CORPUS.items()])
    return built.db_path


def keys(db_path: Path, query: str, namespace: str = "a", **kwargs) -> list[str]:
    hits, _ = search(db_path, namespace, query, 10, **kwargs)
    return [hit.key for hit in hits]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("multi-agent", ["notes"]),
        ("don't", ["contraction"]),
        ("a.md", ["file"]),
        ('"unbalanced', ["quote"]),
        ("NEAR", ["near"]),
        ("col:value", ["colon"]),
        ("*", []),
        ("🍕", ["emoji"]),
        ("東京", ["ja"]),
        ("晴れ", ["ja"]),
        ("大阪", []),
        ("مرحبا", ["ar"]),
        ("мир", ["ru"]),
        ("МИР", ["ru"]),
    ],
)
def test_search_hostile_queries(corpus_db, query, expected):
    assert keys(corpus_db, query) == expected


@pytest.mark.parametrize("query", ["", "   ", "*", '"', "AND", "NOT", "(", ")", "-x", "x:", "🏽", "\x00"])
def test_search_operator_text_is_not_syntax(corpus_db, query):
    hits, index_seq = search(corpus_db, "a", query, 10)
    assert isinstance(hits, list)
    assert index_seq == len(CORPUS)


@settings(max_examples=200, deadline=None)
@given(query=st.text(max_size=40))
def test_search_any_text_returns_a_list(corpus_db, query):
    hits, _ = search(corpus_db, "a", query, 10)
    assert isinstance(hits, list)


def test_search_every_word_must_match(corpus_db):
    assert keys(corpus_db, "forget milk") == ["contraction"]
    assert keys(corpus_db, "forget river") == []


def test_search_hit_fields(corpus_db):
    hits, index_seq = search(corpus_db, "a", "東京", 10)
    assert index_seq == len(CORPUS)
    assert len(hits) == 1
    assert hits[0].key == "ja"
    assert hits[0].tier == "stm"
    assert hits[0].snippet == "東京は晴れです"
    assert hits[0].score > 0


def test_search_other_namespace_sees_nothing(corpus_db):
    assert keys(corpus_db, "milk", namespace="b") == []


def test_search_namespace_token_collision(log, monkeypatch):
    # The package attribute `search` is the function, so patch the module.
    module = importlib.import_module("replay.projections.search")
    monkeypatch.setattr(module, "_namespace_token", lambda namespace: "nsame")
    log.apply(
        log.event(Store, namespace="a", key="mine", value="shared word"),
        log.event(Store, namespace="b", key="theirs", value="shared word"),
    )
    assert keys(log.db_path, "shared", namespace="a") == ["mine"]
    assert keys(log.db_path, "shared", namespace="b") == ["theirs"]


def test_search_ranks_by_bm25(log):
    log.apply(
        log.event(Store, namespace="a", key="once", value="ramen and other things to eat later"),
        log.event(Store, namespace="a", key="twice", value="ramen ramen"),
        log.event(Store, namespace="a", key="none", value="udon"),
    )
    hits, _ = search(log.db_path, "a", "ramen", 10)
    assert [hit.key for hit in hits] == ["twice", "once"]
    assert hits[0].score > hits[1].score


def test_search_limit(log):
    log.apply(*[log.event(Store, namespace="a", key=f"k{i:02}", value="same words") for i in range(20)])
    hits, _ = search(log.db_path, "a", "same", 5)
    assert len(hits) == 5


def test_search_matches_tags(log):
    log.apply(log.event(Store, namespace="a", key="k", value={"n": 1}, tags=["travel", "東京"]))
    assert keys(log.db_path, "travel") == ["k"]
    assert keys(log.db_path, "東京") == ["k"]


def test_search_overwrite_replaces_text(log):
    log.apply(log.event(Store, namespace="a", key="k", value="old words"))
    log.apply(log.event(Store, namespace="a", key="k", value="new words"))
    assert keys(log.db_path, "old") == []
    assert keys(log.db_path, "new") == ["k"]


def test_search_forget_removes(log):
    log.apply(log.event(Store, namespace="a", key="k", value="secret"), log.event(Store, namespace="b", key="k", value="secret"))
    log.apply(log.event(Forget, namespace="a", key="k"))
    assert keys(log.db_path, "secret") == []
    assert keys(log.db_path, "secret", namespace="b") == ["k"]


def test_search_follows_moves_and_deletes(log):
    log.apply(
        log.event(Store, namespace="a", key="moved", value="alpha"),
        log.event(Store, namespace="a", key="evicted", value="alpha"),
    )
    maintain = log.event(Maintain)
    effects = (
        Effect(maintain.seq, "move", "a", "moved", tier="stm", target="im", reason="capacity"),
        Effect(maintain.seq, "move", "a", "moved", tier="im", target="ltm", reason="capacity"),
        Effect(maintain.seq, "delete", "a", "evicted", tier="stm", reason="expired"),
    )
    log.apply(EventWithEffects(maintain, effects))
    hits, index_seq = search(log.db_path, "a", "alpha", 10)
    assert [(hit.key, hit.tier) for hit in hits] == [("moved", "ltm")]
    assert index_seq == maintain.seq


def test_search_store_after_move_returns_to_stm(log):
    log.apply(log.event(Store, namespace="a", key="k", value="alpha"))
    maintain = log.event(Maintain)
    log.apply(EventWithEffects(maintain, (Effect(maintain.seq, "move", "a", "k", tier="stm", target="im", reason="idle"),)))
    log.apply(log.event(Store, namespace="a", key="k", value="alpha again"))
    hits, _ = search(log.db_path, "a", "alpha", 10)
    assert [(hit.key, hit.tier) for hit in hits] == [("k", "stm")]


def test_search_hides_expired(log):
    store = log.event(Store, namespace="a", key="k", value="short lived", ttl_s=1)
    log.apply(store)
    assert keys(log.db_path, "short", now_ms=store.ts + 999) == ["k"]
    assert keys(log.db_path, "short", now_ms=store.ts + 1000) == []


def test_search_ignores_gets_and_searches(log):
    log.apply(log.event(Store, namespace="a", key="k", value="kept"))
    log.apply(log.event(Get, namespace="a", key="k"), log.event(Search, namespace="a", query="kept"))
    assert keys(log.db_path, "kept") == ["k"]


def test_search_missing_database(tmp_path):
    assert search(tmp_path / "absent.db", "a", "anything", 10) == ([], 0)
    assert not (tmp_path / "absent.db").exists()


def test_search_rejects_bad_limit(corpus_db):
    with pytest.raises(ValueError, match="limit 0 is invalid"):
        search(corpus_db, "a", "milk", 0)


def test_wait_for_seq_reached(corpus_db):
    assert wait_for_seq(corpus_db, len(CORPUS), timeout=0.0)


def test_wait_for_seq_times_out(corpus_db):
    assert not wait_for_seq(corpus_db, len(CORPUS) + 1, timeout=0.05)


def test_wait_for_seq_sees_a_later_commit(log):
    log.apply(log.event(Store, namespace="a", key="k", value="v"))
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(wait_for_seq(log.db_path, 2, timeout=10)))
    waiter.start()
    log.apply(log.event(Store, namespace="a", key="k2", value="v"))
    waiter.join(timeout=15)
    assert results == [True]


def test_wait_for_seq_missing_database(tmp_path):
    assert wait_for_seq(tmp_path / "absent.db", 0, timeout=0.0)
    assert not wait_for_seq(tmp_path / "absent.db", 1, timeout=0.02)


def test_search_skips_rejected_conditional_write(log):
    log.apply(log.event(Store, namespace="a", key="k", value="original"))
    rejected = log.event(Store, namespace="a", key="k", value="replacement", expected_version=5)
    conflict = Effect(rejected.seq, "conflict", "a", "k", reason="5:1", client=rejected.id)
    log.apply(EventWithEffects(rejected, (conflict,)))
    assert keys(log.db_path, "original") == ["k"]
    assert keys(log.db_path, "replacement") == []


def test_search_forget_namespace_removes_all(log):
    log.apply(
        log.event(Store, namespace="a", key="k1", value="shared words"),
        log.event(Store, namespace="a", key="k2", value="shared words", tags=["label"]),
        log.event(Store, namespace="b", key="k1", value="shared words"),
    )

    log.apply(log.event(Forget, namespace="a"))

    assert keys(log.db_path, "shared") == []
    assert keys(log.db_path, "label") == []
    assert keys(log.db_path, "shared", namespace="b") == ["k1"]
    conn = connect(log.db_path)
    try:
        docs = conn.execute("SELECT count(*) FROM search_docs WHERE namespace = 'a'").fetchone()[0]
        texts = conn.execute("SELECT count(*) FROM search_fts").fetchone()[0]
    finally:
        conn.close()
    assert docs == 0
    assert texts == 1

