"""Measure value compression per zstd level, alone and inside SQLite commits.

Run `python bench/tier_compression.py`. The values are chat text from the
chitchat-dataset package: 10,000 small records (one chat message each) and
100 records of 100 KiB (consecutive messages joined). For each level it
prints the encode time, the commit time through `SqliteTier` (1,000 small or
10 large records per commit), the decode time and the compressed size as a
fraction of the raw MessagePack size.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chitchat_dataset
import msgspec

from tiers.base import Meta, Record, TierWrites
from tiers.codec import Compression, ValueCodec
from tiers.sqlite_tier import SqliteTier

SMALL_COUNT = 10_000
LARGE_COUNT = 100
LARGE_SIZE = 100 * 1024

_META = Meta(
    importance=0.5,
    tags=("chat",),
    created_ts=1,
    updated_ts=1,
    accessed_ts=1,
    access_count=0,
    version=1,
    tier_since_ts=1,
)


def load_messages() -> list[str]:
    """Return the chat messages of the dataset, in file order."""
    dataset = chitchat_dataset.Dataset()
    messages = []
    for conversation in dataset.values():
        for turn in conversation["messages"]:
            messages.append(" ".join(utterance["text"] for utterance in turn))
    return messages


def build_values(messages: list[str]) -> tuple[list[Any], list[Any]]:
    """Return the small and the large values to encode."""
    small = [
        {"text": message, "speaker": "user", "turn": index}
        for index, message in zip(range(SMALL_COUNT), itertools.cycle(messages))
    ]
    text = " ".join(messages[:20_000])
    step = (len(text) - LARGE_SIZE) // LARGE_COUNT
    large = [
        {"text": text[index * step : index * step + LARGE_SIZE]}
        for index in range(LARGE_COUNT)
    ]
    return small, large


def seconds(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def commit_all(tier: SqliteTier, values: list[Any], per_commit: int) -> None:
    """Write `values` as records of `tier`, `per_commit` records per commit."""
    for start in range(0, len(values), per_commit):
        batch = values[start : start + per_commit]
        puts = [
            Record("bench", f"{start + offset:06d}", value, _META)
            for offset, value in enumerate(batch)
        ]
        tier.commit(TierWrites(puts=puts), watermark=start + len(batch))


def measure(
    level: int | None, values: list[Any], per_commit: int, folder: Path
) -> dict:
    codec = ValueCodec(Compression(level=level))
    raw_size = sum(len(msgspec.msgpack.encode(value)) for value in values)
    blobs: list[bytes] = []
    encode_time = seconds(lambda: blobs.extend(codec.encode(value) for value in values))
    decode_time = seconds(lambda: [codec.decode(blob) for blob in blobs])

    path = folder / f"level-{level}-{len(values)}.db"
    tier = SqliteTier("ltm", path, 0, compression=Compression(level=level))
    try:
        commit_time = seconds(lambda: commit_all(tier, values, per_commit))
    finally:
        tier.close()
    return {
        "encode_ms": encode_time * 1000,
        "commit_ms": commit_time * 1000,
        "decode_ms": decode_time * 1000,
        "size": sum(len(blob) for blob in blobs) / raw_size,
    }


def format_row(level: int | None, label: str, result: dict) -> str:
    return (
        f"{level or 'none':>5} | {label:>14} | {result['encode_ms']:6.0f} ms | "
        f"{result['commit_ms']:6.0f} ms | {result['decode_ms']:6.0f} ms | "
        f"{result['size']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--levels",
        type=int,
        nargs="+",
        default=[3, 12, 15, 19],
        help="zstd levels to measure (default: 3 12 15 19)",
    )
    arguments = parser.parse_args()
    small, large = build_values(load_messages())
    cases = (
        (f"{SMALL_COUNT:,} small", small, 1000),
        (f"{LARGE_COUNT} x 100 KiB", large, 10),
    )

    print("level |         values |    encode |    commit |    decode | size")
    with tempfile.TemporaryDirectory() as folder:
        for level in [None, *arguments.levels]:
            for label, values, per_commit in cases:
                result = measure(level, values, per_commit, Path(folder))
                print(format_row(level, label, result))


if __name__ == "__main__":
    main()
