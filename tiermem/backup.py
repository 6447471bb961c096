"""Backup and restore of a stack's data: snapshots, the log, projections, stack.json.

A backup is a directory:

    manifest.json                   positions, counts, and the SHA-256 and size of every other file
    stack.json                      the stack's configuration when the backup was taken
    log.tmlog                       the log Redis's tiermem keys (see below)
    snapshots/shard-<n>/<seq>.snap  one fresh snapshot per shard, all at `snapshot_seq`
    projections.sqlite3             the projection database (absent when the stack had none)

The log is exported as data, not copied as Redis files. The export is
zstandard-compressed MessagePack of the log stream, the id index (so a
client that resends an old request id still gets its original seq) and
every shard's effect stream (which the projections read). It reads over
any Redis connection and loads into any Redis version with streams.
Copying the append-only file after a `BGREWRITEAOF` would need the log
host's file system and a Redis that reads that AOF format.

`create_backup` copies the projection database first, then waits until
every shard has applied the log up to its last seq (so the effects of
those events exist), takes the snapshots at that seq, and exports the log
last. Events appended meanwhile are exported too, and a restored shard
replays them after its snapshot. The manifest is written last, so a
directory without one is an unfinished backup.

`restore_backup` checks every checksum, loads the export into a fresh log
Redis (a private one under the new data directory, or an empty one given
by URL), and puts the snapshots and the projection database in place. A
stack started on that directory finds empty STM and IM, loads each shard's
snapshot and replays the log after it.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import BinaryIO

import msgspec
import redis
import structlog
import zstandard

from events.errors import TiermemError
from events.log import RedisEventLog, check_log_config
from handlers.effects import effects_stream
from replay.projections.runner import readable_count, shard_watermarks
from replay.snapshot import take_snapshot
from tiers.redis_tier import client_from_url
from tiers.snapshot import snapshot_path
from tiermem.config import StackConfig, load_stack_config, write_stack_config
from tiermem.servers import RedisServer

__all__ = [
    "BackupError",
    "BackupManifest",
    "FileEntry",
    "RestoreResult",
    "create_backup",
    "read_manifest",
    "restore_backup",
    "verify_backup",
]

log = structlog.get_logger("tiermem.backup")

FORMAT = "tiermem-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOG_EXPORT = "log.tmlog"
PROJECTIONS = "projections.sqlite3"
STACK_CONFIG = "stack.json"

# The key of the log's id index, as `RedisEventLog` names it by default.
IDS_KEY = "tiermem:ids"

_EXPORT_MAGIC = b"TMLOG\r\n\x01"
_LENGTH = struct.Struct(">I")
# Bounds of one record of the export. A log entry contains one appended
# batch (up to the router's max_batch events), so entries are grouped by size.
_CHUNK_ENTRIES = 1000
_CHUNK_BYTES = 8 * 1024 * 1024
_XRANGE_COUNT = 64
_HSCAN_COUNT = 5000
_ZSTD_LEVEL = 3
_HASH_BLOCK = 1024 * 1024

# How often the backup checks whether the shards have applied the log.
_POLL_INTERVAL_S = 0.05


class BackupError(TiermemError):
    """A backup could not be taken, or a backup directory is invalid or cannot be restored."""


class FileEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One file of a backup, by its path relative to the backup directory."""

    path: str
    bytes: int
    sha256: str


class BackupManifest(msgspec.Struct, frozen=True, kw_only=True):
    """The contents of a backup and the log positions it covers.

    `snapshot_seq` is the position of every shard's snapshot and `log_seq`
    the last event of the exported log (at least `snapshot_seq`).
    `projection_checkpoints` are the projection database's checkpoints,
    each at most `log_seq`. `ids` counts the id index entries exported:
    HSCAN may return an entry twice while the hash grows, so it can exceed
    the number of distinct ids.
    """

    format: str = FORMAT
    version: int = FORMAT_VERSION
    tiermem_version: str
    created_at: str
    source_data_dir: str
    shards: int
    fingerprint: str
    log_stream: str
    snapshot_seq: int
    log_seq: int
    log_entries: int
    ids: int
    effects: dict[str, int]
    projection_checkpoints: dict[str, int] | None
    seconds: float
    files: list[FileEntry]


class RestoreResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of `restore_backup`: the data directory, the restored log and its positions."""

    data_dir: str
    log_url: str | None
    log_seq: int
    snapshot_seq: int
    shards: int
    log_entries: int
    seconds: float


# ----------------------------------------------------------- the log export


class _StreamChunk(msgspec.Struct, frozen=True, tag="stream", array_like=True):
    """Consecutive entries of one stream: (entry id, fields) in stream order."""

    key: str
    entries: list[tuple[bytes, dict[bytes, bytes]]]


class _HashChunk(msgspec.Struct, frozen=True, tag="hash", array_like=True):
    key: str
    fields: dict[bytes, bytes]


_chunk_encoder = msgspec.msgpack.Encoder()
_chunk_decoder = msgspec.msgpack.Decoder(_StreamChunk | _HashChunk)


def _stream_chunks(client: redis.Redis, key: str, until_seq: int) -> Iterator[_StreamChunk]:
    """Yield the entries of stream `key` whose id's first part is at most `until_seq`."""
    start = "-"
    end = f"{until_seq}-{2**63 - 1}"
    entries: list[tuple[bytes, dict[bytes, bytes]]] = []
    size = 0
    while True:
        found = client.xrange(key, min=start, max=end, count=_XRANGE_COUNT)
        if not found:
            break
        for entry_id, fields in found:
            entries.append((entry_id, fields))
            size += sum(len(name) + len(value) for name, value in fields.items())
            if len(entries) >= _CHUNK_ENTRIES or size >= _CHUNK_BYTES:
                yield _StreamChunk(key=key, entries=entries)
                entries, size = [], 0
        start = "(" + found[-1][0].decode()
    if entries:
        yield _StreamChunk(key=key, entries=entries)


def _id_chunks(client: redis.Redis, until_seq: int) -> Iterator[_HashChunk]:
    """Yield the id index entries of events at or below `until_seq`.

    Each value is `SEQ:BODYHASH`. An entry past `until_seq` belongs to a
    batch appended during the export, which the export leaves out.
    """
    fields: dict[bytes, bytes] = {}
    for name, value in client.hscan_iter(IDS_KEY, count=_HSCAN_COUNT):
        if int(value.split(b":", 1)[0]) <= until_seq:
            fields[name] = value
        if len(fields) >= _HSCAN_COUNT:
            yield _HashChunk(key=IDS_KEY, fields=fields)
            fields = {}
    if fields:
        yield _HashChunk(key=IDS_KEY, fields=fields)


def _key_store_chunks(client: redis.Redis, config: StackConfig) -> Iterator[_HashChunk]:
    """Yield the log's key store: every namespace's data key hash, the namespace epochs and the forget ledger.

    Without the data keys, the restored log's Stores would all read as
    forgotten (see `events.seal`). The ledger, a sorted set, travels as
    member -> score.

    NOTE: a Forget logged after the backup's position but before this
    export destroys data keys that the exported log still uses, so the
    restored log reads those Stores as erased while the backup's snapshots
    still have their values. `export_log` exports the key store first to
    keep that window short.
    """
    data_keys = RedisEventLog(client, stream=config.log_stream).data_keys
    for name in client.scan_iter(match=f"{data_keys.prefix}:n:*", count=_HSCAN_COUNT):
        fields = client.hgetall(name)
        if fields:
            yield _HashChunk(key=name.decode(), fields=fields)
    epochs = client.hgetall(data_keys.namespace_epochs)
    if epochs:
        yield _HashChunk(key=data_keys.namespace_epochs, fields=epochs)
    ledger = client.zrange(data_keys.ledger, 0, -1, withscores=True)
    if ledger:
        yield _HashChunk(key=data_keys.ledger, fields={member: str(int(score)).encode() for member, score in ledger})


def _write_record(output: BinaryIO, record: _StreamChunk | _HashChunk) -> None:
    payload = _chunk_encoder.encode(record)
    output.write(_LENGTH.pack(len(payload)))
    output.write(payload)


def _read_exactly(source: BinaryIO, size: int, path: Path) -> bytes:
    data = b""
    while len(data) < size:
        part = source.read(size - len(data))
        if not part:
            raise BackupError(f"{path} ends in the middle of a record: the export is truncated")
        data += part
    return data


def _read_records(path: Path) -> Iterator[_StreamChunk | _HashChunk]:
    with open(path, "rb") as raw:
        if raw.read(len(_EXPORT_MAGIC)) != _EXPORT_MAGIC:
            raise BackupError(f"{path} is not a tiermem log export (its first bytes differ)")
        with zstandard.ZstdDecompressor().stream_reader(raw) as source:
            while True:
                header = source.read(_LENGTH.size)
                if not header:
                    return
                header += _read_exactly(source, _LENGTH.size - len(header), path)
                (length,) = _LENGTH.unpack(header)
                payload = _read_exactly(source, length, path)
                try:
                    yield _chunk_decoder.decode(payload)
                except msgspec.DecodeError as error:
                    raise BackupError(f"{path} contains an invalid record: {error}") from error


class _ExportCounts(msgspec.Struct, kw_only=True):
    log_entries: int = 0
    ids: int = 0
    effects: dict[str, int] = {}


def export_log(client: redis.Redis, config: StackConfig, until_seq: int, path: Path) -> _ExportCounts:
    """Write the log stream, id index and effect streams, up to `until_seq`, to `path`."""
    counts = _ExportCounts(effects={})
    with open(path, "wb") as raw:
        raw.write(_EXPORT_MAGIC)
        with zstandard.ZstdCompressor(level=_ZSTD_LEVEL).stream_writer(raw, closefd=False) as output:
            # The key store first: see the NOTE in `_key_store_chunks`.
            for chunk in _key_store_chunks(client, config):
                _write_record(output, chunk)
            for chunk in _stream_chunks(client, config.log_stream, until_seq):
                _write_record(output, chunk)
                counts.log_entries += len(chunk.entries)
            for chunk in _id_chunks(client, until_seq):
                _write_record(output, chunk)
                counts.ids += len(chunk.fields)
            for shard in range(config.shards):
                key = effects_stream(shard)
                counts.effects[key] = 0
                for chunk in _stream_chunks(client, key, until_seq):
                    _write_record(output, chunk)
                    counts.effects[key] += len(chunk.entries)
        raw.flush()
    return counts


def _exported_keys(config: StackConfig) -> set[bytes]:
    return {config.log_stream.encode(), IDS_KEY.encode()} | {
        effects_stream(shard).encode() for shard in range(config.shards)
    }


def _warn_unexported(client: redis.Redis, config: StackConfig) -> None:
    """Log the keys of the log Redis that the export leaves out."""
    known = _exported_keys(config)
    key_store = f"{config.log_stream}:dk:".encode()
    others = sorted(key for key in client.scan_iter(count=1000) if key not in known and not key.startswith(key_store))
    if others:
        log.warning(
            "backup.keys.skipped",
            keys=[key.decode(errors="replace") for key in others[:20]],
            count=len(others),
            next="the export contains only the log stream, the id index, the effect streams and the key store",
        )


def import_log(client: redis.Redis, path: Path, log_stream: str) -> int:
    """Load an export into `client`; return the number of `log_stream` entries written.

    Every stream entry keeps its id, so the log's sequence numbers and the
    effects' positions stay as they were.
    """
    written = 0
    data_keys = RedisEventLog(client, stream=log_stream).data_keys
    for record in _read_records(path):
        pipe = client.pipeline(transaction=False)
        if isinstance(record, _StreamChunk):
            for entry_id, fields in record.entries:
                pipe.xadd(record.key, fields, id=entry_id)
            if record.key == log_stream:
                written += len(record.entries)
        elif record.key == data_keys.ledger:
            pipe.zadd(record.key, {member: int(score) for member, score in record.fields.items()})
        else:
            pipe.hset(record.key, mapping=record.fields)
        pipe.execute()
    return written


# ----------------------------------------------------------- backup


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _file_entry(root: Path, path: Path) -> FileEntry:
    return FileEntry(path=path.relative_to(root).as_posix(), bytes=path.stat().st_size, sha256=_sha256(path))


def _tiermem_version() -> str:
    try:
        return version("tiermem")
    except PackageNotFoundError:
        return "unknown"


def _copy_projections(source: Path, target: Path) -> dict[str, int] | None:
    """Copy the projection database with SQLite's online backup; return its checkpoints.

    The copy is switched from WAL to a rollback journal, so it is one
    self-contained file. Returns None when there is no database.
    """
    if not source.is_file():
        return None
    with closing(sqlite3.connect(source)) as origin, closing(sqlite3.connect(target)) as copy:
        origin.backup(copy)
        copy.execute("PRAGMA journal_mode=DELETE")
        try:
            rows = copy.execute("SELECT name, seq FROM projection_checkpoints").fetchall()
        except sqlite3.OperationalError:
            rows = []  # a database whose projections never ran has no checkpoint table yet
    return {name: int(seq) for name, seq in rows}


def wait_until_applied(
    event_log: RedisEventLog, stm_client: redis.Redis, shards: int, seq: int, timeout: float
) -> None:
    """Block until every shard has committed each of its events up to `seq`.

    A shard writes an event's effects before it commits it, so afterwards
    the effect streams are complete up to `seq`. Raises BackupError at the
    deadline, naming the shards still behind.
    """
    deadline = time.monotonic() + timeout
    position = min(shard_watermarks(stm_client, shards))
    while position < seq:
        batch = event_log.read(position, min(event_log.read_batch, seq - position))
        if not batch:
            raise BackupError(f"the log ends at seq {event_log.last_seq()} before seq {seq}: was it replaced?")
        while True:
            watermarks = shard_watermarks(stm_client, shards)
            readable = readable_count(batch, watermarks)
            if readable:
                position = batch[readable - 1].seq or position
                break
            if time.monotonic() >= deadline:
                behind = [shard for shard, mark in enumerate(watermarks) if mark < (batch[0].seq or 0)]
                raise BackupError(
                    f"shards {behind} have not applied the log up to seq {seq} after {timeout:.0f}s "
                    f"(watermarks {watermarks}): start the stack with `tiermem up` so that they catch up, "
                    "then run the backup again"
                )
            time.sleep(_POLL_INTERVAL_S)


def _prepare_empty_dir(path: Path, description: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BackupError(f"{description} {path} is not empty: give a new or empty directory")
    path.mkdir(parents=True, exist_ok=True)


def create_backup(
    data_dir: str | Path,
    out: str | Path,
    *,
    timeout: float = 300.0,
    keep: int = 3,
    say: Callable[[str], None] = lambda text: None,
) -> BackupManifest:
    """Back up the running stack of `data_dir` into the new or empty directory `out`.

    Needs the stack's Redis servers running, and its router running when
    a shard has not applied the log up to its end (the backup waits up to
    `timeout` seconds for that). `keep` is passed on to the snapshots,
    which are also written to `DIR/snapshots`, where they shorten the live
    shards' next recovery. `say` receives one line per step.
    """
    started = time.monotonic()
    data_dir = Path(data_dir).resolve()
    out = Path(out).resolve()
    config_path = data_dir / STACK_CONFIG
    if not config_path.is_file():
        raise BackupError(f"{config_path} does not exist: back up the data directory of a stack started with `tiermem up`")
    config = load_stack_config(config_path)
    if not (config.log_url and config.stm_url and config.im_url):
        raise BackupError(f"{config_path} does not name the log, STM and IM Redis URLs: start the stack with `tiermem up` first")
    _prepare_empty_dir(out, "backup directory")

    log_client = redis.Redis.from_url(config.log_url)
    stm_client = client_from_url(config.stm_url)
    event_log = RedisEventLog(log_client, stream=config.log_stream)
    try:
        try:
            event_log.last_seq()
        except redis.ConnectionError as error:
            raise BackupError(f"cannot reach the log Redis at {config.log_url} ({error}): is the stack running?") from error
        shutil.copyfile(config_path, out / STACK_CONFIG)
        # Copied before the log's end is read, so every checkpoint in the
        # copy is at or below the end of the exported log.
        checkpoints = _copy_projections(Path(config.projections_db), out / PROJECTIONS)
        say(f"projection database: {'copied' if checkpoints is not None else 'none'}")

        seq = event_log.last_seq()
        say(f"waiting until {config.shards} shard(s) have applied the log up to seq {seq}")
        wait_until_applied(event_log, stm_client, config.shards, seq, timeout)

        for shard in range(config.shards):
            result = take_snapshot(data_dir, event_log, config.shards, config.policy, shard, seq, keep=keep)
            target = snapshot_path(out / "snapshots", shard, seq)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result.path, target)
            say(f"shard {shard}: snapshot at seq {seq}, {result.events} events after seq {result.base_seq}")

        log_seq = event_log.last_seq()
        _warn_unexported(log_client, config)
        counts = export_log(log_client, config, log_seq, out / LOG_EXPORT)
        say(f"log: {counts.log_entries} entries up to seq {log_seq}, {counts.ids} ids, {sum(counts.effects.values())} effects")
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise BackupError(
            f"a Redis of the stack failed during the backup ({error}): {out} is unfinished; "
            "delete it and run the backup again once the stack's Redis servers run"
        ) from error
    finally:
        log_client.close()
        stm_client.close()

    files = sorted((path for path in out.rglob("*") if path.is_file()), key=lambda path: path.as_posix())
    manifest = BackupManifest(
        tiermem_version=_tiermem_version(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        source_data_dir=str(data_dir),
        shards=config.shards,
        fingerprint=f"{config.policy.fingerprint()}:{config.shards}",
        log_stream=config.log_stream,
        snapshot_seq=seq,
        log_seq=log_seq,
        log_entries=counts.log_entries,
        ids=counts.ids,
        effects=counts.effects,
        projection_checkpoints=checkpoints,
        seconds=round(time.monotonic() - started, 3),
        files=[_file_entry(out, path) for path in files],
    )
    temporary = out / (MANIFEST + ".tmp")
    temporary.write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
    temporary.replace(out / MANIFEST)
    log.info("backup.completed", out=str(out), snapshot_seq=seq, log_seq=log_seq, seconds=manifest.seconds)
    return manifest


# ----------------------------------------------------------- restore


def read_manifest(backup_dir: str | Path) -> BackupManifest:
    """Read and check the manifest of a backup directory (not the files it lists)."""
    path = Path(backup_dir) / MANIFEST
    if not path.is_file():
        raise BackupError(f"{path} does not exist: {backup_dir} is not a finished tiermem backup")
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=BackupManifest)
    except msgspec.DecodeError as error:
        raise BackupError(f"{path} is invalid: {error}") from error
    if manifest.format != FORMAT:
        raise BackupError(f"{path} has format {manifest.format!r}, expected {FORMAT!r}")
    if manifest.version > FORMAT_VERSION:
        raise BackupError(
            f"{path} has format version {manifest.version}; this release reads versions up to {FORMAT_VERSION}: "
            "restore with a newer tiermem"
        )
    return manifest


def verify_backup(backup_dir: str | Path) -> BackupManifest:
    """Check that every file the manifest lists exists with its size and SHA-256; return the manifest."""
    root = Path(backup_dir)
    manifest = read_manifest(root)
    for entry in manifest.files:
        path = root / entry.path
        if not path.is_file():
            raise BackupError(f"{path} is missing from the backup")
        if path.stat().st_size != entry.bytes:
            raise BackupError(f"{path} has {path.stat().st_size} bytes, the manifest lists {entry.bytes}: the file is damaged")
        if _sha256(path) != entry.sha256:
            raise BackupError(f"{path} failed its SHA-256 check: the file is damaged")
    listed = {entry.path for entry in manifest.files}
    for required in (LOG_EXPORT, STACK_CONFIG):
        if required not in listed:
            raise BackupError(f"the manifest of {root} does not list {required}")
    return manifest


def _check_empty_log(client: redis.Redis, keys: set[bytes], url: str) -> None:
    present = sorted(key.decode() for key in keys if client.exists(key))
    if present:
        raise BackupError(f"the log Redis at {url} already contains {', '.join(present)}: restore into an empty Redis")


def _load_log(root: Path, manifest: BackupManifest, config: StackConfig, data_dir: Path, log_url: str | None) -> int:
    """Load the backup's log into `log_url`, or into a private log Redis under `data_dir`; return the entries written."""
    server: RedisServer | None = None
    target = log_url
    try:
        if log_url is None:
            server = RedisServer(data_dir, role="log").start()
            target = server.url
            client = server.client()
        else:
            client = redis.Redis.from_url(log_url)
        with client:
            try:
                check_log_config(client, allow_everysec=config.allow_everysec)
                _check_empty_log(client, _exported_keys(config), target or "")
            except redis.ConnectionError as error:
                raise BackupError(f"cannot reach the log Redis at {target} ({error})") from error
            try:
                written = import_log(client, root / LOG_EXPORT, config.log_stream)
                last = RedisEventLog(client, stream=config.log_stream).last_seq()
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as error:
                keys = ", ".join(sorted(key.decode() for key in _exported_keys(config)))
                raise BackupError(
                    f"loading the log into {target} failed ({error}): delete the keys {keys} there before you retry"
                ) from error
    finally:
        if server is not None:
            server.stop()
    if last != manifest.log_seq or written != manifest.log_entries:
        raise BackupError(
            f"the restored log ends at seq {last} with {written} entries, "
            f"the manifest lists seq {manifest.log_seq} with {manifest.log_entries}"
        )
    return written


def restore_backup(
    backup_dir: str | Path,
    data_dir: str | Path,
    *,
    log_url: str | None = None,
    say: Callable[[str], None] = lambda text: None,
) -> RestoreResult:
    """Restore a backup into the new or empty data directory `data_dir`.

    With `log_url`, the log goes into that Redis, which must pass the log
    checks (`appendfsync always`, `noeviction`) and hold none of the log's
    keys. Otherwise it goes into a private log Redis under `data_dir`,
    which this function starts and stops, and which `tiermem up
    --data-dir DATA_DIR` starts again.
    """
    started = time.monotonic()
    root = Path(backup_dir).resolve()
    manifest = verify_backup(root)
    say(f"backup verified: {len(manifest.files)} files, log up to seq {manifest.log_seq}")
    data_dir = Path(data_dir).resolve()
    _prepare_empty_dir(data_dir, "data directory")

    config = load_stack_config(root / STACK_CONFIG)
    # Every other server of the old stack contains the old stack's live
    # state, so the restored configuration names none of them.
    restored = msgspec.structs.replace(
        config, data_dir=str(data_dir), log_url=log_url, stm_url=None, im_url=None, broker_url=None, ray_address=None
    )

    try:
        written = _load_log(root, manifest, config, data_dir, log_url)
        say(f"log: {written} entries restored up to seq {manifest.log_seq}")
        for entry in manifest.files:
            if entry.path.startswith("snapshots/"):
                target = data_dir / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / entry.path, target)
        if (root / PROJECTIONS).is_file():
            shutil.copyfile(root / PROJECTIONS, data_dir / PROJECTIONS)
        write_stack_config(restored, data_dir / STACK_CONFIG)
    except BaseException:
        # The directory was empty before, so everything in it is this restore's.
        for item in data_dir.iterdir():
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()
        raise
    say(f"snapshots of {manifest.shards} shard(s) at seq {manifest.snapshot_seq} in place")

    result = RestoreResult(
        data_dir=str(data_dir),
        log_url=log_url,
        log_seq=manifest.log_seq,
        snapshot_seq=manifest.snapshot_seq,
        shards=manifest.shards,
        log_entries=written,
        seconds=round(time.monotonic() - started, 3),
    )
    log.info("restore.completed", **msgspec.structs.asdict(result))
    return result
