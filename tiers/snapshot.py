"""The snapshot file: the canonical state of one shard's tiers at one log position.

A snapshot contains every record of STM, IM and LTM with its value and
`Meta`. The cache is implied by `Meta.cache_touch`. It also records the
watermark (the last sequence number whose events it reflects), the ingest
timestamp of that event, the shard and shard count, and the policy
fingerprint of the shard that wrote it. Files live at `ROOT/shard-<n>/<watermark, 20 digits>.snap`,
so a plain sort of the names is a sort by watermark.

Layout of a file, all integers big-endian:

    magic     8 bytes   b"TMSNAP\\r\\n"
    length    4 bytes   size of the header
    header    MessagePack of `SnapshotHeader`
    payload   one zstandard frame of the MessagePack records, per tier
    checksum  32 bytes  SHA-256 of every byte before it

Readers verify the checksum before they decode anything, so a truncated or
damaged file raises `CorruptSnapshotError` instead of loading wrong state.
Nothing here uses pickle. Bump `SNAPSHOT_SCHEMA` when the layout or the
meaning of a field changes; readers raise `SnapshotVersionError` on another
version, and `newest_valid` skips such files.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import structlog
import zstandard

from events.limits import value_size
from tiers.base import TIER_NAMES, Meta, Record, Tier, TierWrites
from tiers.digest import digest_sorted_records
from tiers.errors import TierError

__all__ = [
    "SNAPSHOT_SCHEMA",
    "CorruptSnapshotError",
    "Snapshot",
    "SnapshotError",
    "SnapshotHeader",
    "SnapshotVersionError",
    "encode_snapshot",
    "list_snapshots",
    "load_into_tiers",
    "newest_valid",
    "prune_snapshots",
    "rewrite_scrubbed",
    "read_header",
    "read_snapshot",
    "scrub_snapshot",
    "snapshot_from_tiers",
    "snapshot_path",
    "write_snapshot",
]

log = structlog.get_logger("tiermem.snapshot")

SNAPSHOT_SCHEMA = 1

_MAGIC = b"TMSNAP\r\n"
_LENGTH = struct.Struct(">I")
_CHECKSUM_SIZE = hashlib.sha256().digest_size
_NAME = re.compile(r"^(\d{20})\.snap$")

# Records per `Tier.commit` when a snapshot is loaded, so one Redis
# MULTI/EXEC never carries a whole large shard.
_LOAD_CHUNK = 5000

# zstd level 3 is the library's default: a good ratio at a few hundred MB/s,
# so taking a snapshot is bound by replaying the log, not by compression.
_ZSTD_LEVEL = 3

# The size of an erased record's value (None), as `Meta.size` counts it.
_PLACEHOLDER_SIZE = value_size(None)


class SnapshotError(TierError):
    """A snapshot file cannot be used; `path` is the file."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


class CorruptSnapshotError(SnapshotError):
    """A snapshot file is truncated, damaged or not a snapshot at all."""


class SnapshotVersionError(SnapshotError):
    """A snapshot file was written with another `SNAPSHOT_SCHEMA`."""

    def __init__(self, message: str, *, path: Path, schema: int) -> None:
        super().__init__(message, path=path)
        self.schema = schema


class SnapshotHeader(msgspec.Struct, frozen=True, kw_only=True):
    """The description of a snapshot's contents, readable without decompressing its records.

    `records` is the record count per tier. `ts` is the ingest timestamp
    (Unix ms) of the event at `watermark`, 0 when the watermark is 0.
    """

    schema: int
    shard: int
    shards: int
    fingerprint: str
    watermark: int
    ts: int
    records: dict[str, int]


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The records of every tier of one shard, at log position `watermark`.

    `tiers` maps each name of `TIER_NAMES` to its records in (namespace, key)
    order. `fingerprint` is the shard's `Shard.fingerprint` (policy
    fingerprint and shard count): a snapshot applies only to a shard with
    the same one.
    """

    shard: int
    shards: int
    fingerprint: str
    watermark: int
    ts: int
    tiers: dict[str, list[Record]]

    @property
    def header(self) -> SnapshotHeader:
        return SnapshotHeader(
            schema=SNAPSHOT_SCHEMA,
            shard=self.shard,
            shards=self.shards,
            fingerprint=self.fingerprint,
            watermark=self.watermark,
            ts=self.ts,
            records={name: len(self.tiers.get(name, [])) for name in TIER_NAMES},
        )

    def digests(self) -> dict[str, tuple[str, int]]:
        """Return (digest, count) per tier, as `Tier.digest` computes them."""
        return {name: digest_sorted_records(self.tiers.get(name, [])) for name in TIER_NAMES}


# One record in the payload: (namespace, key, value, meta), an array.
_Row = tuple[str, str, Any, Meta]

_header_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(SnapshotHeader)
_payload_encoder = msgspec.msgpack.Encoder()
_payload_decoder = msgspec.msgpack.Decoder(dict[str, list[_Row]])


# ----------------------------------------------------------- paths


def snapshot_path(root: str | Path, shard: int, watermark: int) -> Path:
    """Return where the snapshot of `shard` at `watermark` lives under `root`."""
    return Path(root) / f"shard-{shard}" / f"{watermark:020d}.snap"


def list_snapshots(root: str | Path, shard: int) -> list[tuple[int, Path]]:
    """Return (watermark, path) of every snapshot file of `shard`, oldest first.

    Only names of the form `<20 digits>.snap` count, so temporary files of a
    write in progress are never listed.
    """
    directory = Path(root) / f"shard-{shard}"
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), directory / name))
    return sorted(found)


# ----------------------------------------------------------- writing


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """Return the file bytes of `snapshot`; the same snapshot gives the same bytes."""
    for name in snapshot.tiers:
        if name not in TIER_NAMES:
            raise ValueError(f"snapshot tier {name!r} is invalid: use one of {', '.join(TIER_NAMES)}")
    rows = {
        name: [(r.namespace, r.key, r.value, r.meta) for r in snapshot.tiers.get(name, [])]
        for name in TIER_NAMES
    }
    payload = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(_payload_encoder.encode(rows))
    header = _header_encoder.encode(snapshot.header)
    body = b"".join((_MAGIC, _LENGTH.pack(len(header)), header, payload))
    return body + hashlib.sha256(body).digest()


def write_snapshot(root: str | Path, snapshot: Snapshot) -> Path:
    """Write `snapshot` under `root` atomically and durably; return its path.

    The bytes go to a temporary file in the same directory, which is
    fsynced and renamed over the final name, and the directory is fsynced,
    so a crash leaves either the whole new file or none. Writing the same
    snapshot again replaces the file with identical bytes.
    """
    path = snapshot_path(root, snapshot.shard, snapshot.watermark)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_snapshot(snapshot)
    _write_file(path, data)
    log.info(
        "snapshot.written",
        path=str(path),
        shard=snapshot.shard,
        watermark=snapshot.watermark,
        bytes=len(data),
        **{f"{name}_records": len(snapshot.tiers.get(name, [])) for name in TIER_NAMES},
    )
    return path


def _write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a fsynced temporary file and a rename, then fsync the directory."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as output:
            output.write(data)
            output.flush()
            os.fsync(output.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def snapshot_from_tiers(
    tiers: Mapping[str, Tier], *, shard: int, shards: int, fingerprint: str, watermark: int, ts: int
) -> Snapshot:
    """Return a snapshot of every record the tiers contain now."""
    return Snapshot(
        shard=shard,
        shards=shards,
        fingerprint=fingerprint,
        watermark=watermark,
        ts=ts,
        tiers={name: list(tiers[name].records()) for name in TIER_NAMES},
    )


# ----------------------------------------------------------- reading


def _split(data: bytes, path: Path) -> tuple[bytes, bytes]:
    """Check magic, length and checksum; return the header and payload bytes."""
    minimum = len(_MAGIC) + _LENGTH.size + _CHECKSUM_SIZE
    if len(data) < minimum:
        raise CorruptSnapshotError(
            f"snapshot {path} is truncated: {len(data)} bytes, fewer than the {minimum} of an empty file",
            path=path,
        )
    if not data.startswith(_MAGIC):
        raise CorruptSnapshotError(f"{path} is not a tiermem snapshot: it does not start with {_MAGIC!r}", path=path)
    (length,) = _LENGTH.unpack_from(data, len(_MAGIC))
    start = len(_MAGIC) + _LENGTH.size
    if start + length > len(data) - _CHECKSUM_SIZE:
        raise CorruptSnapshotError(
            f"snapshot {path} is truncated: its header of {length} bytes runs past the end of the file",
            path=path,
        )
    body, checksum = data[:-_CHECKSUM_SIZE], data[-_CHECKSUM_SIZE:]
    if hashlib.sha256(body).digest() != checksum:
        raise CorruptSnapshotError(
            f"snapshot {path} failed its SHA-256 check: the file is truncated or damaged",
            path=path,
        )
    return data[start : start + length], data[start + length : -_CHECKSUM_SIZE]


def _decode_header(raw: bytes, path: Path) -> SnapshotHeader:
    try:
        header = _header_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise CorruptSnapshotError(f"snapshot {path} has an invalid header: {error}", path=path) from error
    if header.schema != SNAPSHOT_SCHEMA:
        raise SnapshotVersionError(
            f"snapshot {path} has schema version {header.schema}, but this release reads only "
            f"version {SNAPSHOT_SCHEMA}; take a new snapshot with `tiermem snapshot`",
            path=path,
            schema=header.schema,
        )
    return header


def read_header(path: str | Path) -> SnapshotHeader:
    """Return the header of a snapshot file without checking its checksum.

    For choosing among files cheaply; `read_snapshot` checks everything.
    Raises CorruptSnapshotError or SnapshotVersionError.
    """
    path = Path(path)
    with open(path, "rb") as source:
        start = source.read(len(_MAGIC) + _LENGTH.size)
        if len(start) < len(_MAGIC) + _LENGTH.size or not start.startswith(_MAGIC):
            raise CorruptSnapshotError(f"{path} is not a tiermem snapshot or is truncated", path=path)
        (length,) = _LENGTH.unpack_from(start, len(_MAGIC))
        raw = source.read(length)
    if len(raw) < length:
        raise CorruptSnapshotError(f"snapshot {path} is truncated inside its header", path=path)
    return _decode_header(raw, path)


def read_snapshot(path: str | Path) -> Snapshot:
    """Read and verify a snapshot file.

    Raises CorruptSnapshotError when the file is truncated, fails its
    checksum or does not decode, and SnapshotVersionError when it was
    written with another schema version.
    """
    path = Path(path)
    raw_header, payload = _split(path.read_bytes(), path)
    header = _decode_header(raw_header, path)
    try:
        rows = _payload_decoder.decode(zstandard.ZstdDecompressor().decompress(payload))
    except (zstandard.ZstdError, msgspec.DecodeError, msgspec.ValidationError) as error:
        raise CorruptSnapshotError(f"snapshot {path} has invalid records: {error}", path=path) from error
    tiers = {name: [Record(*row) for row in rows.get(name, [])] for name in TIER_NAMES}
    counts = {name: len(records) for name, records in tiers.items()}
    if counts != header.records:
        raise CorruptSnapshotError(
            f"snapshot {path} contains {counts} records, but its header lists {header.records}",
            path=path,
        )
    expected = snapshot_path(path.parent.parent, header.shard, header.watermark)
    if expected.name != path.name or path.parent.name != f"shard-{header.shard}":
        raise CorruptSnapshotError(
            f"snapshot {path} is of shard {header.shard} at watermark {header.watermark}, "
            f"so it belongs at {expected.parent.name}/{expected.name}",
            path=path,
        )
    return Snapshot(
        shard=header.shard,
        shards=header.shards,
        fingerprint=header.fingerprint,
        watermark=header.watermark,
        ts=header.ts,
        tiers=tiers,
    )


class Forgotten(Protocol):
    """A Forget that took effect: its seq, namespace, and key (None: the whole namespace)."""

    seq: int
    namespace: str
    key: str | None


def scrub_snapshot(snapshot: Snapshot, forgets: Sequence[Forgotten]) -> tuple[Snapshot, int]:
    """Erase from `snapshot` the values of every Forget after its watermark; return it and the count.

    An erased record keeps its key, tier and metadata, with the value None,
    no tags and the size of None: the record a replay of the log builds once
    the Forget destroyed the value's data key. Forgets at or below the
    watermark are already reflected, so they change nothing.
    """
    keys: set[tuple[str, str]] = set()
    namespaces: set[str] = set()
    for forget in forgets:
        if forget.seq > snapshot.watermark:
            if forget.key is None:
                namespaces.add(forget.namespace)
            else:
                keys.add((forget.namespace, forget.key))
    if not keys and not namespaces:
        return snapshot, 0
    erased = 0
    tiers: dict[str, list[Record]] = {}
    for name in TIER_NAMES:
        records = []
        for record in snapshot.tiers.get(name, []):
            if record.namespace in namespaces or (record.namespace, record.key) in keys:
                if record.value is not None or record.meta.tags or record.meta.size != _PLACEHOLDER_SIZE:
                    record = Record(
                        record.namespace,
                        record.key,
                        None,
                        msgspec.structs.replace(record.meta, tags=(), size=_PLACEHOLDER_SIZE),
                    )
                    erased += 1
            records.append(record)
        tiers[name] = records
    if not erased:
        return snapshot, 0
    return msgspec.structs.replace(snapshot, tiers=tiers), erased


def rewrite_scrubbed(path: str | Path, forgets: Sequence[Forgotten]) -> int:
    """Rewrite the snapshot file at `path` without the values `forgets` erased; return how many.

    The new file replaces the old one atomically under the same name, so a
    crash leaves one or the other. A file that needs no change is left alone.
    """
    path = Path(path)
    snapshot = read_snapshot(path)
    scrubbed, erased = scrub_snapshot(snapshot, forgets)
    if erased:
        _write_file(path, encode_snapshot(scrubbed))
        log.info("snapshot.scrubbed", path=str(path), shard=snapshot.shard, watermark=snapshot.watermark, erased=erased)
    return erased


def newest_valid(
    root: str | Path,
    shard: int,
    fingerprint: str,
    *,
    max_seq: int | None = None,
    forgets: Callable[[int], Sequence[Forgotten]] | None = None,
) -> Snapshot | None:
    """Return the newest readable snapshot of `shard` with `fingerprint`, or None.

    Files with a watermark above `max_seq` are passed over (a view of an
    earlier point, or a log that ends before the file). A corrupt file, one
    of another schema version and one of another fingerprint are skipped
    for the previous file, each with a `snapshot.skipped` warning naming it.
    With `forgets` (the log's `forgets_after`), the snapshot returned has
    the values of every later Forget erased, even before the file itself
    is scrubbed.
    """
    for watermark, path in reversed(list_snapshots(root, shard)):
        if max_seq is not None and watermark > max_seq:
            log.info("snapshot.passed_over", path=str(path), watermark=watermark, max_seq=max_seq)
            continue
        try:
            header = read_header(path)
            if header.fingerprint != fingerprint:
                _skip(path, f"fingerprint {header.fingerprint} differs from the shard's {fingerprint}")
                continue
            snapshot = read_snapshot(path)
            if forgets is not None:
                snapshot, _ = scrub_snapshot(snapshot, forgets(snapshot.watermark))
            return snapshot
        except SnapshotError as error:
            _skip(path, str(error))
        except OSError as error:
            _skip(path, f"cannot be read: {error}")
    return None


def _skip(path: Path, reason: str) -> None:
    log.warning("snapshot.skipped", path=str(path), reason=reason, next="trying the previous snapshot")


def prune_snapshots(root: str | Path, shard: int, keep: int = 3) -> list[Path]:
    """Delete all but the newest `keep` snapshot files of `shard`; return the deleted paths.

    Files count by name, valid or not, so a corrupt newest file still takes
    one of the `keep` places until newer snapshots push it out.
    """
    if keep < 1:
        raise ValueError(f"keep {keep} is invalid: keep at least 1 snapshot")
    files = list_snapshots(root, shard)
    removed = [path for _, path in files[: max(0, len(files) - keep)]]
    for path in removed:
        path.unlink(missing_ok=True)
        log.info("snapshot.pruned", path=str(path), shard=shard, keep=keep)
    return removed


# ----------------------------------------------------------- loading


def load_into_tiers(
    snapshot: Snapshot, tiers: Mapping[str, Tier], control: dict[str, bytes | None] | None = None
) -> None:
    """Commit every record of `snapshot` to its tier with the snapshot's watermark.

    The tiers should be empty, because records they contain that the
    snapshot lacks stay. IM and LTM are committed first and STM last, with
    `control` in its final commit. A crash part way therefore leaves STM
    without those control values, which shows the caller that the load did
    not finish. Records go `_LOAD_CHUNK` per commit.
    """
    for name in ("im", "ltm", "stm"):
        records = snapshot.tiers.get(name, [])
        chunks = [records[start : start + _LOAD_CHUNK] for start in range(0, len(records), _LOAD_CHUNK)] or [[]]
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            extra = control if name == "stm" and last else None
            tiers[name].commit(TierWrites(puts=list(chunk)), snapshot.watermark, extra)
