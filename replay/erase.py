"""The erasure pass: what a Forget cannot remove at once, removed from the files on disk.

A Forget takes effect in the tiers when its shard applies it and in the log
when its data keys are destroyed (see `events.seal`). Three kinds of file can
still hold the forgotten bytes afterwards, and this pass cleans each:

- snapshot and view files taken before the Forget: rewritten with the
  forgotten values erased (`tiers.snapshot.scrub_snapshot`);
- SQLite files (LTM and the projections): deleted rows are zeroed as they go
  (`secure_delete`), but a page image can remain in the write-ahead log until
  a checkpoint, which this pass forces (`tiers.sqlite_tier.scrub_sqlite`);
- Redis append-only files: the log's Redis keeps the destroyed data keys, and
  STM and IM the deleted values, in the AOF until it is rewritten.

Beat runs the pass often (`replay.tasks.erase`), and it costs one Redis GET
when no Forget happened since the last pass. The AOF rewrite is heavier, so
the scheduled pass rewrites at most every `aof_interval_s`; `tiermem erase`
runs a whole pass now.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any
from pathlib import Path

import msgspec
import redis
import structlog

from events.log import RedisEventLog
from tiermem.servers import wait_until
from tiermem.settings import mask_secrets
from tiers.redis_tier import cluster_node_urls, is_cluster_url
from tiers.snapshot import SnapshotError, list_snapshots, read_header, rewrite_scrubbed
from tiers.sqlite_tier import scrub_sqlite

__all__ = [
    "ErasureReport",
    "aof_targets",
    "erase",
    "erase_stack",
    "rewrite_aof",
    "snapshot_files",
    "stack_files",
    "state_path",
]

log = structlog.get_logger("tiermem.erase")



class ErasureReport(msgspec.Struct, kw_only=True):
    """The outcome of one pass. `skipped` is True when no Forget happened since the last pass."""

    skipped: bool
    forgets: int = 0
    files_checked: int = 0
    files_rewritten: int = 0
    records_erased: int = 0
    sqlite_checkpointed: list[str] = []
    aof_rewritten: list[str] = []
    seconds: float = 0.0


class _State(msgspec.Struct, kw_only=True):
    """The position of the last pass, kept in `DIR/erase.json`."""

    shredded: int = -1
    aof_shredded: int = -1
    aof_at: float = 0.0


def state_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / "erase.json"


def _read_state(data_dir: str | Path) -> _State:
    try:
        return msgspec.json.decode(state_path(data_dir).read_bytes(), type=_State)
    except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
        return _State()


def _write_state(data_dir: str | Path, state: _State) -> None:
    path = state_path(data_dir)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(msgspec.json.encode(state))
    temporary.replace(path)


def snapshot_files(data_dir: str | Path) -> list[Path]:
    """Return every snapshot and view file under `data_dir`."""
    data = Path(data_dir)
    roots = [data / "snapshots", *sorted((data / "views").glob("*"))]
    found: list[Path] = []
    for root in roots:
        for directory in sorted(root.glob("shard-*")):
            shard = directory.name.removeprefix("shard-")
            if shard.isdigit():
                found.extend(path for _, path in list_snapshots(root, int(shard)))
    return sorted(found)


def rewrite_aof(url: str, *, timeout: float = 120.0) -> None:
    """Rewrite a Redis server's append-only file and wait until the rewrite finished.

    Redis 7 keeps the AOF as a base file and increments. A rewrite writes a
    new base from the current data set and deletes the old files, so the
    commands that wrote deleted keys are gone with them.
    """
    client = redis.Redis.from_url(url)
    try:
        before = int(client.info("persistence").get("aof_rewrites", 0))
        try:
            client.bgrewriteaof()
        except redis.ResponseError as error:
            # One already running: ours is scheduled after it.
            if "already in progress" not in str(error):
                raise

        def finished() -> bool:
            info = client.info("persistence")
            return (
                int(info.get("aof_rewrites", 0)) > before
                and not int(info.get("aof_rewrite_in_progress", 0))
                and not int(info.get("aof_rewrite_scheduled", 0))
            )

        wait_until(finished, timeout=timeout, what=f"the AOF rewrite of {mask_secrets(url)}")
        if client.info("persistence").get("aof_last_bgrewrite_status") != "ok":
            raise redis.RedisError(f"the AOF rewrite of {mask_secrets(url)} failed; see its redis.log")
    finally:
        client.close()


def aof_targets(url: str) -> list[str]:
    """Return the URLs of the servers whose AOF contains the data at `url`.

    For a Redis Cluster that is every node, replicas included, because a
    replica writes the deleted values to its own AOF as well.
    """
    return cluster_node_urls(url) if is_cluster_url(url) else [url]


def erase(
    data_dir: str | Path,
    event_log: RedisEventLog,
    *,
    sqlite_paths: Iterable[str | Path] = (),
    redis_urls: Sequence[str] = (),
    force: bool = False,
    aof_interval_s: float | None = None,
) -> ErasureReport:
    """Run one erasure pass over `data_dir`, the SQLite files and the Redis servers given.

    Without `force` the pass does nothing when no data key was destroyed
    since the last pass. The AOF rewrite runs when `force` is set, or when
    `aof_interval_s` has passed since the last rewrite and keys were
    destroyed since it.
    """
    started = time.monotonic()
    state = _read_state(data_dir)
    shredded = event_log.data_keys.shred_count()
    if not force and shredded == state.shredded:
        return ErasureReport(skipped=True)
    report = ErasureReport(skipped=False)
    files = snapshot_files(data_dir)
    watermarks: dict[Path, int] = {}
    for path in files:
        try:
            watermarks[path] = read_header(path).watermark
        except (SnapshotError, OSError) as error:
            log.warning("erase.snapshot.unreadable", path=str(path), error=str(error), next="left as it is; delete it if it is not needed")
    forgets = event_log.forgets_after(min(watermarks.values(), default=0))
    report.forgets = len(forgets)
    for path, watermark in watermarks.items():
        later = [forget for forget in forgets if forget.seq > watermark]
        if not later:
            continue
        report.files_checked += 1
        erased = rewrite_scrubbed(path, later)
        if erased:
            report.files_rewritten += 1
            report.records_erased += erased
    for path in sqlite_paths:
        if Path(path).exists():
            if scrub_sqlite(path).complete:
                report.sqlite_checkpointed.append(str(path))
    now = time.time()
    due = force or (
        aof_interval_s is not None and shredded != state.aof_shredded and now - state.aof_at >= aof_interval_s
    )
    if due:
        for url in redis_urls:
            for node_url in aof_targets(url):
                rewrite_aof(node_url)
                report.aof_rewritten.append(mask_secrets(node_url))
        state.aof_shredded, state.aof_at = shredded, now
    state.shredded = shredded
    _write_state(data_dir, state)
    report.seconds = round(time.monotonic() - started, 3)
    log.info(
        "erase.pass.done",
        forgets=report.forgets,
        files_rewritten=report.files_rewritten,
        records_erased=report.records_erased,
        sqlite=len(report.sqlite_checkpointed),
        aof=len(report.aof_rewritten),
        seconds=report.seconds,
    )
    return report


def stack_files(config: Any) -> tuple[list[Path], list[str]]:
    """Return the SQLite files and the Redis URLs whose AOF an erasure pass of `config` covers.

    `config` is a `tiermem.config.StackConfig`. A Redis Cluster URL stays
    one URL here, and the pass rewrites the AOF of each of its nodes.
    """
    sqlite_paths = sorted(Path(config.ltm_dir).glob("*.sqlite3")) + [Path(config.projections_db)]
    urls = [config.log_url, config.stm_url, config.im_url, config.broker_url]
    schemes = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
    return sqlite_paths, [url for url in urls if url and url.startswith(schemes)]


def erase_stack(config: Any, *, force: bool = False) -> ErasureReport:
    """Run one erasure pass over the stack that `config` (a StackConfig) describes."""
    sqlite_paths, urls = stack_files(config)
    event_log = RedisEventLog(redis.Redis.from_url(config.log_url), stream=config.log_stream)
    try:
        return erase(
            config.data_dir,
            event_log,
            sqlite_paths=sqlite_paths,
            redis_urls=urls,
            force=force,
            aof_interval_s=config.erase_aof_interval_s,
        )
    finally:
        event_log.client.close()
