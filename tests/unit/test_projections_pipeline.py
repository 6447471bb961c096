"""Stage pipelines, the projection registry and the word count example."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from pathlib import Path

import pytest

from events.types import Forget, Maintain, Store
from handlers.effects import Effect
from replay.projections import (
    EventWithEffects,
    OnError,
    Pipeline,
    ProjectionError,
    Stage,
    load_projection,
    register,
    registered_projections,
    unregister,
)
from replay.projections.db import connect, create_core_tables, write_transaction
from replay.projections.registry import BUILTIN_NAMES, resolve_projections

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "word_count_projection.py"


def stores(count: int, namespace: str = "a") -> list[EventWithEffects]:
    return [
        EventWithEffects(Store(id=f"e{seq}", seq=seq, ts=1000 + seq, namespace=namespace, key=f"k{seq}", value=f"value {seq}"), ())
        for seq in range(1, count + 1)
    ]


def create_seen(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS seen (stage TEXT, seq INTEGER)")


def recorder(stage_name: str, fail_on: set[int] = frozenset()):
    def record(conn: sqlite3.Connection, item: EventWithEffects) -> None:
        conn.execute("INSERT INTO seen VALUES (?, ?)", (stage_name, item.seq))
        if item.seq in fail_on:
            raise RuntimeError(f"{stage_name} fails on seq {item.seq}")

    return record


def run(pipeline: Pipeline, batch: list[EventWithEffects], db_path: Path):
    conn = connect(db_path)
    with write_transaction(conn):
        create_core_tables(conn)
        pipeline.setup(conn)
        reports = pipeline.apply(conn, batch)
    return conn, reports


def test_pipeline_runs_stages_in_order_per_event(tmp_path):
    def copy_count(conn: sqlite3.Connection, item: EventWithEffects) -> None:
        (count,) = conn.execute("SELECT count(*) FROM seen WHERE stage = 'first'").fetchone()
        conn.execute("INSERT INTO seen VALUES ('second', ?)", (count,))

    pipeline = Pipeline("ordered", [Stage("first", recorder("first"), setup=create_seen), Stage("second", copy_count)])
    conn, _ = run(pipeline, stores(3), tmp_path / "p.db")
    rows = conn.execute("SELECT stage, seq FROM seen ORDER BY rowid").fetchall()
    assert rows == [("first", 1), ("second", 1), ("first", 2), ("second", 2), ("first", 3), ("second", 3)]


def test_pipeline_reports_each_stage(tmp_path):
    pipeline = Pipeline("timed", [Stage("first", recorder("first"), setup=create_seen), Stage("second", recorder("second"))])
    _, reports = run(pipeline, stores(4), tmp_path / "p.db")
    assert [report.name for report in reports] == ["first", "second"]
    assert [report.events for report in reports] == [4, 4]
    assert [report.skipped for report in reports] == [0, 0]
    assert all(report.seconds >= 0.0 for report in reports)


def test_pipeline_finish_runs_once_after_stages(tmp_path):
    def finish(conn: sqlite3.Connection, batch) -> None:
        conn.execute("INSERT INTO seen VALUES ('finish', ?)", (batch[-1].seq,))

    pipeline = Pipeline("finished", [Stage("first", recorder("first"), setup=create_seen)], finish=finish)
    conn, reports = run(pipeline, stores(3), tmp_path / "p.db")
    rows = conn.execute("SELECT stage, seq FROM seen ORDER BY rowid").fetchall()
    empty = pipeline.apply(conn, [])
    after_empty = conn.execute("SELECT count(*) FROM seen").fetchone()[0]
    conn.close()
    assert rows == [("first", 1), ("first", 2), ("first", 3), ("finish", 3)]
    assert [report.name for report in reports] == ["first"]
    assert [report.events for report in empty] == [0]
    assert after_empty == 4


def test_pipeline_skip_policy_undoes_and_records(tmp_path):
    pipeline = Pipeline(
        "skipping",
        [
            Stage("flaky", recorder("flaky", fail_on={2, 3}), setup=create_seen, on_error=OnError.SKIP),
            Stage("steady", recorder("steady")),
        ],
    )
    conn, reports = run(pipeline, stores(4), tmp_path / "p.db")
    flaky = [seq for (seq,) in conn.execute("SELECT seq FROM seen WHERE stage = 'flaky' ORDER BY seq")]
    steady = [seq for (seq,) in conn.execute("SELECT seq FROM seen WHERE stage = 'steady' ORDER BY seq")]
    skips = conn.execute("SELECT projection, stage, seq, error FROM projection_skips ORDER BY seq").fetchall()
    assert flaky == [1, 4]
    assert steady == [1, 2, 3, 4]
    assert [(projection, stage, seq) for projection, stage, seq, _ in skips] == [("skipping", "flaky", 2), ("skipping", "flaky", 3)]
    assert "flaky fails on seq 2" in skips[0][3]
    assert reports[0].skipped == 2
    assert reports[1].skipped == 0


def test_pipeline_fail_policy_raises(tmp_path):
    pipeline = Pipeline("failing", [Stage("strict", recorder("strict", fail_on={2}), setup=create_seen)])
    conn = connect(tmp_path / "p.db")
    with pytest.raises(RuntimeError, match="strict fails on seq 2"):
        with write_transaction(conn):
            create_core_tables(conn)
            pipeline.setup(conn)
            pipeline.apply(conn, stores(3))
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'seen'").fetchone() == (0,)


def test_pipeline_skip_accepts_plain_string_policy(tmp_path):
    pipeline = Pipeline("plain", [Stage("flaky", recorder("flaky", fail_on={1}), setup=create_seen, on_error="skip")])
    _, reports = run(pipeline, stores(2), tmp_path / "p.db")
    assert reports[0].skipped == 1


@pytest.mark.parametrize("name", ["", "Upper", "1starts_with_digit", "has-dash", "has space", "x" * 64])
def test_pipeline_rejects_invalid_name(name):
    with pytest.raises(ProjectionError, match="name .* is invalid"):
        Pipeline(name, [Stage("ok", recorder("ok"))])


def test_pipeline_rejects_duplicate_stage():
    with pytest.raises(ProjectionError, match="two stages named 'same'"):
        Pipeline("dup", [Stage("same", recorder("a")), Stage("same", recorder("b"))])


def test_pipeline_rejects_no_stages():
    with pytest.raises(ProjectionError, match="has no stages"):
        Pipeline("empty", [])


def test_pipeline_rejects_unknown_policy():
    with pytest.raises(ValueError, match="'retry' is not a valid OnError"):
        Pipeline("bad", [Stage("s", recorder("s"), on_error="retry")])


# ----------------------------------------------------------- registry


@pytest.fixture
def clean_registry():
    before = {projection.name for projection in registered_projections()}
    yield
    for projection in registered_projections():
        if projection.name not in before:
            unregister(projection.name)


def test_register_adds_to_defaults(clean_registry):
    custom = Pipeline("custom_one", [Stage("s", recorder("s"))])
    assert register(custom) is custom
    names = [projection.name for projection in resolve_projections(None)]
    assert names == [*BUILTIN_NAMES, "custom_one"]


def test_register_same_object_twice(clean_registry):
    custom = Pipeline("custom_two", [Stage("s", recorder("s"))])
    register(custom)
    register(custom)
    assert [p.name for p in registered_projections()].count("custom_two") == 1


def test_register_rejects_taken_name(clean_registry):
    register(Pipeline("custom_three", [Stage("s", recorder("s"))]))
    with pytest.raises(ProjectionError, match="already registered"):
        register(Pipeline("custom_three", [Stage("s", recorder("s"))]))


def test_register_rejects_builtin_name():
    with pytest.raises(ProjectionError, match="'search' is a built-in"):
        register(Pipeline("search", [Stage("s", recorder("s"))]))


def test_register_rejects_non_projection():
    with pytest.raises(ProjectionError, match="not a projection"):
        register(object())  # type: ignore[arg-type]


def test_resolve_rejects_duplicate_names():
    first = Pipeline("twin", [Stage("s", recorder("s"))])
    second = Pipeline("twin", [Stage("s", recorder("s"))])
    with pytest.raises(ProjectionError, match=r"\['twin'\] appear more than once"):
        resolve_projections([first, second])


def test_load_projection_from_file():
    loaded = load_projection(f"{EXAMPLE}:projection")
    assert loaded.name == "word_count"


def test_load_projection_from_module(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    loaded = load_projection("word_count_projection:projection")
    assert loaded.name == "word_count"
    sys.modules.pop("word_count_projection", None)


def test_load_projection_calls_factory():
    loaded = load_projection("replay.projections.search:search_projection")
    assert loaded.name == "search"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "is invalid: use module:attribute"),
        (":attr", "is invalid: use module:attribute"),
        ("module_that_does_not_exist_x:attr", "cannot import projection module"),
        ("replay.projections.search:no_such_thing", "has no attribute 'no_such_thing'"),
        ("replay.projections.search:SEARCH", "is a str, not a projection"),
        ("missing/file.py:projection", "projection file 'missing/file.py' not found"),
    ],
)
def test_load_projection_errors(spec, message):
    with pytest.raises(ProjectionError, match=message):
        load_projection(spec)


# ----------------------------------------------------------- example


def load_example():
    spec = importlib.util.spec_from_file_location("word_count_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_word_count_example_follows_current_keys(tmp_path):
    example = load_example()
    batch = [
        EventWithEffects(Store(seq=1, ts=1, namespace="a", key="k1", value={"t": "one two three"}), ()),
        EventWithEffects(Store(seq=2, ts=2, namespace="a", key="k2", value=["four", "five"]), ()),
        EventWithEffects(Store(seq=3, ts=3, namespace="b", key="k1", value="six"), ()),
        EventWithEffects(Store(seq=4, ts=4, namespace="a", key="k1", value="seven"), ()),
        EventWithEffects(Forget(seq=5, ts=5, namespace="b", key="k1"), ()),
        EventWithEffects(Maintain(seq=6, ts=6), (Effect(6, "delete", "a", "k2", tier="ltm", reason="evicted"),)),
    ]
    db_path = tmp_path / "p.db"
    conn = connect(db_path)
    with write_transaction(conn):
        create_core_tables(conn)
        example.projection.setup(conn)
        example.projection.apply(conn, batch[:3])
    assert example.word_counts(db_path) == {"a": 5, "b": 1}
    with write_transaction(conn):
        example.projection.apply(conn, batch[3:])
    conn.close()
    assert example.word_counts(db_path) == {"a": 1, "b": 0}
