"""Projections apply each event once: across failures, SIGKILL, repeats and races."""

from __future__ import annotations

import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from events.log import RedisEventLog
from events.types import Forget, Get, Maintain, Store
from handlers.effects import RedisEffectLog
from handlers.policy import Policy
from replay.projections import (
    EventWithEffects,
    Pipeline,
    Stage,
    builtin_projections,
    run_projections,
)
from replay.projections.db import connect_readonly, read_checkpoints

pytestmark = pytest.mark.integration

SHARDS = 2
TINY = Policy(cache_capacity=4, stm_capacity=2, im_capacity=2, ltm_capacity=3)
WORDS = ["ramen", "東京", "multi-agent", "don't", "🍕", "Привет", "notes", "a.md"]
NAMES = ("search", "stats", "history")


class Runner:
    def __init__(self, servers) -> None:
        self.log_client = redis.Redis.from_url(servers.log.url)
        self.stm_client = redis.Redis.from_url(servers.stm.url)
        self.event_log = RedisEventLog(self.log_client)
        self.effect_log = RedisEffectLog(self.log_client)

    def run(self, db: Path, **kwargs):
        return run_projections(db, self.event_log, self.effect_log, self.stm_client, SHARDS, **kwargs)

    def close(self) -> None:
        self.log_client.close()
        self.stm_client.close()


@pytest.fixture
def runner(servers) -> Iterator[Runner]:
    opened = Runner(servers)
    yield opened
    opened.close()


def traffic() -> list:
    """About 170 events over four namespaces: stores, reads, Forget and Maintain."""
    events: list = []
    for index in range(120):
        namespace = f"agent-{index % 4}"
        word = WORDS[index % len(WORDS)]
        events.append(
            Store(
                namespace=namespace,
                key=f"k{index % 25}",
                value={"text": f"memory {index} about {word}", "n": index},
                tags=[word] if index % 3 == 0 else [],
                importance=(index % 10) / 10,
            )
        )
        if index % 4 == 1:
            events.append(Get(namespace=namespace, key=f"k{(index * 3) % 25}"))
        if index % 11 == 0:
            events.append(Forget(namespace=namespace, key=f"k{(index * 7) % 25}"))
        if index % 30 == 29:
            events.append(Maintain())
    return events


@pytest.fixture
def logged(start_router, runner) -> int:
    """Send the traffic through a router and wait until the shards applied it."""
    router = start_router(SHARDS, policy=TINY)
    with router.client() as client:
        client.pipeline(traffic())
        client.digest()
    router.stop()
    return runner.event_log.last_seq()


def dump(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table; the FTS5 table by its rows, not its segments."""
    conn = sqlite3.connect(db)
    names = [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "AND name NOT LIKE 'search_fts_%' ORDER BY name"
        )
    ]
    tables: dict[str, list[tuple]] = {}
    for name in names:
        if name == "search_fts":
            tables[name] = conn.execute("SELECT rowid, body, tags, ns FROM search_fts ORDER BY rowid").fetchall()
            continue
        width = len(conn.execute(f"SELECT * FROM {name} LIMIT 0").description)
        order = ", ".join(str(column) for column in range(1, width + 1))
        tables[name] = conn.execute(f"SELECT * FROM {name} ORDER BY {order}").fetchall()
    conn.close()
    return tables


def check_fts_integrity(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO search_fts (search_fts) VALUES ('integrity-check')")
    conn.close()


def copying(fail_at: int | None = None) -> Pipeline:
    """A projection whose second stage raises on event `fail_at`, after the first wrote."""

    def create(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS copied (seq INTEGER PRIMARY KEY, type TEXT)")

    def copy(conn: sqlite3.Connection, item: EventWithEffects) -> None:
        conn.execute("INSERT INTO copied VALUES (?, ?)", (item.seq, type(item.event).__name__))

    def check(conn: sqlite3.Connection, item: EventWithEffects) -> None:
        if item.seq == fail_at:
            raise RuntimeError(f"injected failure at seq {item.seq}")

    return Pipeline("copied", [Stage("copy", copy, setup=create), Stage("check", check)])


def test_traffic_has_moves_and_deletes(runner, logged, tmp_path):
    db = tmp_path / "p.db"
    runner.run(db)
    conn = sqlite3.connect(db)
    kinds = dict(conn.execute("SELECT kind, count(*) FROM history GROUP BY kind").fetchall())
    conn.close()
    assert logged > 150
    assert set(kinds) == {"store", "read", "forget", "move", "delete"}


def test_second_run_changes_nothing(runner, logged, tmp_path):
    db = tmp_path / "p.db"
    first = runner.run(db)
    before = dump(db)
    second = runner.run(db)
    assert first.checkpoints == dict.fromkeys(NAMES, logged)
    assert second.events == 0
    assert second.complete
    assert second.checkpoints == first.checkpoints
    assert dump(db) == before


def test_failed_batch_resumes_exactly_once(runner, logged, tmp_path):
    interrupted, reference = tmp_path / "interrupted.db", tmp_path / "reference.db"
    first = runner.run(interrupted, projections=[*builtin_projections(), copying(fail_at=97)], batch_size=20)
    assert first.projections["copied"].error == "RuntimeError('injected failure at seq 97')"
    assert not first.complete
    assert first.checkpoints == {**dict.fromkeys(NAMES, logged), "copied": 80}
    conn = sqlite3.connect(interrupted)
    # The first stage wrote 81..96 before the second raised; none of it stayed.
    assert conn.execute("SELECT max(seq) FROM copied").fetchone() == (80,)
    conn.close()

    second = runner.run(interrupted, projections=[*builtin_projections(), copying()], batch_size=20)
    assert second.complete
    assert second.projections["copied"].events == logged - 80
    assert second.projections["search"].events == 0

    runner.run(reference, projections=[*builtin_projections(), copying()], batch_size=7)
    assert dump(interrupted) == dump(reference)


def test_concurrent_runs_apply_once(runner, logged, tmp_path):
    shared, reference = tmp_path / "shared.db", tmp_path / "reference.db"
    runner.run(shared, max_seconds=0.0)  # creates the tables, so both start at 0
    reports: list = []
    errors: list[BaseException] = []

    def run_one() -> None:
        try:
            reports.append(runner.run(shared, batch_size=10))
        except BaseException as error:  # noqa: BLE001 - re-raised by the assertions below
            errors.append(error)

    threads = [threading.Thread(target=run_one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(reports) == 2
    for name in NAMES:
        assert sum(report.projections[name].events for report in reports) == logged
    runner.run(reference)
    assert dump(shared) == dump(reference)


CHILD = r"""
import sys

import redis

from events.log import RedisEventLog
from handlers.effects import RedisEffectLog
from replay.projections import Pipeline, Stage, builtin_projections, run_projections

db, log_url, stm_url, block_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def block(conn, item):
    if item.seq == block_at:
        sys.stderr.write("blocked\n")
        sys.stderr.flush()
        sys.stdin.read()  # keeps the transaction open until the test kills us


log_client = redis.Redis.from_url(log_url)
run_projections(
    db,
    RedisEventLog(log_client),
    RedisEffectLog(log_client),
    redis.Redis.from_url(stm_url),
    2,
    [*builtin_projections(), Pipeline("blocker", [Stage("block", block)])],
    batch_size=20,
)
"""


def wait_for_output(process: subprocess.Popen, expected: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    selector.register(process.stderr, selectors.EVENT_READ)
    received = b""
    try:
        while expected not in received:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"child did not write {expected!r} in {timeout} s: {received[-2000:]!r}"
            if selector.select(remaining):
                chunk = os.read(process.stderr.fileno(), 65536)
                assert chunk, f"child exited with {process.wait()}: {received[-2000:]!r}"
                received += chunk
    finally:
        selector.close()


def test_sigkill_mid_batch_then_resume(runner, servers, logged, tmp_path):
    killed, reference = tmp_path / "killed.db", tmp_path / "reference.db"
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(killed), servers.log.url, servers.stm.url, "57"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_output(process, b"blocked\n", timeout=60)
        # The built-ins have written events 41..57 in the open transaction.
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        process.stdin.close()
        process.stderr.close()

    conn = connect_readonly(killed)
    assert read_checkpoints(conn, [*NAMES, "blocker"]) == {**dict.fromkeys(NAMES, 40), "blocker": 40}
    conn.close()

    quiet = Pipeline("blocker", [Stage("block", lambda conn, item: None)])
    resumed = runner.run(killed, projections=[*builtin_projections(), quiet], batch_size=20)
    assert resumed.complete
    assert resumed.projections["search"].events == logged - 40
    runner.run(reference, projections=[*builtin_projections(), quiet])
    check_fts_integrity(killed)
    assert dump(killed) == dump(reference)
