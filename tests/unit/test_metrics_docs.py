"""docs/metrics.md against a scrape: every metric, its type and its labels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bus.metrics import RouterMetrics, RouterState
from events.types import ShardStatus, TierDigest
from replay.metrics import StackCollector, WorkerMetrics, replay_progress
from replay.projections.db import (
    connect,
    create_core_tables,
    write_checkpoint,
    write_transaction,
)
from replay.projections.stats import stats_projection
from tiermem.config import StackConfig
from tiers.pools import TierPools

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
LANES = ("high", "normal", "low")

_ROW = re.compile(r"^\| `(tiermem_[a-z_]+)` \| (counter|gauge|histogram) \|([^|]*)\|")


def documented(section: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Return {name: (type, labels)} from the table under the `## section` heading."""
    text = DOC.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    for line in text[start : end if end != -1 else None].splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        name, kind, labels = match.groups()
        rows[name] = (kind, frozenset(re.findall(r"`([a-z_]+)`", labels)))
    return rows


def scraped(registry) -> dict[str, tuple[str, frozenset[str]]]:
    """Return {exported name: (type, labels)} of the tiermem families that have samples.

    The `_created` gauges that prometheus-client adds to each counter and
    histogram are left out.
    """
    families: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if not family.name.startswith("tiermem_") or not family.samples:
            continue
        if family.name.endswith("_created"):
            continue
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = frozenset(
            label
            for sample in family.samples
            for label in sample.labels
            if label != "le"
        )
        families[name] = (family.type, labels)
    return families


def router_registry():
    state = RouterState(
        last_seq=9,
        inflight_batches=1,
        pending_gets=2,
        pending_searches=0,
        pending_admin=0,
        resend_queue=0,
    )
    metrics = RouterMetrics(LANES, 2, 0, lambda: state, projection_checkpoint=lambda: 4)
    metrics.shard_status(
        [ShardStatus(shard=0, watermark=3, pid=1, node="local", keys=5)]
    )
    metrics.digests([TierDigest(shard=0, tier="cache", digest="00", records=2)])
    metrics.shard_pools(0, TierPools().stats())
    metrics.append_seconds.observe(0.001)
    return metrics.registry


class FixedLog:
    def last_seq(self) -> int:
        return 12


def worker_registry(tmp_path: Path, monkeypatch):
    from prometheus_client import CollectorRegistry

    import replay.metrics

    db = tmp_path / "projections.sqlite3"
    conn = connect(db)
    with write_transaction(conn):
        create_core_tables(conn)
        stats_projection().setup(conn)
        write_checkpoint(conn, "search", 7, 0)
    conn.close()
    config = StackConfig(
        data_dir=str(tmp_path), shards=2, log_url="redis://127.0.0.1:1"
    )
    registry = CollectorRegistry(auto_describe=True)
    metrics = WorkerMetrics(registry)
    metrics.precreate(["tiermem.projections.run"])
    monkeypatch.setattr(replay.metrics, "worker_metrics", lambda: metrics)
    with replay_progress("verify", 0, 10) as progress:
        progress(4)
    registry.register(StackCollector(config, event_log=FixedLog()))
    return registry


@pytest.mark.parametrize("section", ["Router", "Celery worker"])
def test_docs_table_not_empty(section):
    assert len(documented(section)) >= 10


def test_router_documented_metrics_scraped():
    docs = documented("Router")
    scrape = scraped(router_registry())
    assert sorted(set(docs) - set(scrape)) == []


def test_router_scraped_metrics_documented():
    docs = documented("Router")
    scrape = scraped(router_registry())
    assert sorted(set(scrape) - set(docs)) == []


def test_router_types_and_labels_match_docs():
    docs = documented("Router")
    scrape = scraped(router_registry())
    for name in sorted(set(docs) & set(scrape)):
        assert scrape[name] == docs[name], name


def test_worker_documented_metrics_scraped(tmp_path, monkeypatch):
    docs = documented("Celery worker")
    scrape = scraped(worker_registry(tmp_path, monkeypatch))
    assert sorted(set(docs) - set(scrape)) == []


def test_worker_scraped_metrics_documented(tmp_path, monkeypatch):
    docs = documented("Celery worker")
    scrape = scraped(worker_registry(tmp_path, monkeypatch))
    assert sorted(set(scrape) - set(docs)) == []


def test_worker_types_and_labels_match_docs(tmp_path, monkeypatch):
    docs = documented("Celery worker")
    scrape = scraped(worker_registry(tmp_path, monkeypatch))
    for name in sorted(set(docs) & set(scrape)):
        assert scrape[name] == docs[name], name
