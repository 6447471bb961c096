"""Tests of the canonical record digest."""

from __future__ import annotations

import hashlib
import random

import msgspec
import pytest

from tiers.base import Meta, Record
from tiers.digest import digest_records, digest_sorted_records

_META = Meta(
    importance=0.5,
    tags=("a", "b"),
    created_ts=1_000,
    updated_ts=2_000,
    accessed_ts=3_000,
    access_count=4,
    version=5,
    tier_since_ts=6_000,
    expires_ts=7_000,
    cache_touch=8,
    size=9,
)


def _records(count: int = 50) -> list[Record]:
    return [
        Record(f"agent-{i % 3}", f"key-{i:03d}", {"text": f"memory {i}", "n": i}, _META)
        for i in range(count)
    ]


def test_digest_of_no_records_is_empty_sha256():
    assert digest_records([]) == (hashlib.sha256().hexdigest(), 0)


def test_digest_counts_records():
    _, count = digest_records(_records(50))

    assert count == 50


def test_digest_pins_encoding():
    # A change here changes every stored digest: snapshots compare against
    # digests taken by earlier releases, so change the format only on purpose.
    record = Record("ns", "k", {"b": [1, 2.5, None], "a": "x"}, _META)
    expected_bytes = msgspec.msgpack.encode(
        [
            "ns",
            "k",
            {"a": "x", "b": [1, 2.5, None]},
            list(msgspec.structs.astuple(_META)),
        ]
    )

    digest, count = digest_records([record])

    assert digest == hashlib.sha256(expected_bytes).hexdigest()
    assert count == 1


def test_digest_ignores_input_order():
    records = _records()
    shuffled = list(records)
    random.Random(3).shuffle(shuffled)

    assert digest_records(shuffled) == digest_records(records)


def test_digest_ignores_dict_insertion_order():
    forward = Record("ns", "k", {"a": 1, "b": {"x": 1, "y": 2}}, _META)
    backward = Record("ns", "k", {"b": {"y": 2, "x": 1}, "a": 1}, _META)

    assert digest_records([forward]) == digest_records([backward])


def test_digest_treats_tuple_and_list_alike():
    as_tuple = Record("ns", "k", (1, (2, 3)), _META)
    as_list = Record("ns", "k", [1, [2, 3]], _META)

    assert digest_records([as_tuple]) == digest_records([as_list])


def test_digest_changes_with_one_byte_of_value():
    records = _records()
    changed = list(records)
    changed[10] = msgspec.structs.replace(
        records[10], value={"text": "memory 1O", "n": 10}
    )

    assert digest_records(changed)[0] != digest_records(records)[0]


@pytest.mark.parametrize("field", msgspec.structs.fields(Meta), ids=lambda f: f.name)
def test_digest_changes_with_one_meta_field(field):
    original = getattr(_META, field.name)
    if field.name == "tags":
        different = ("a", "c")
    else:
        different = original + 1
    records = _records()
    changed = list(records)
    changed[7] = msgspec.structs.replace(
        records[7], meta=msgspec.structs.replace(_META, **{field.name: different})
    )

    assert digest_records(changed)[0] != digest_records(records)[0]


def test_digest_changes_with_value_type():
    as_int = Record("ns", "k", 1, _META)
    as_float = Record("ns", "k", 1.0, _META)

    assert digest_records([as_int])[0] != digest_records([as_float])[0]


def test_digest_separates_namespace_from_key():
    split_late = Record("a", "bc", 1, _META)
    split_early = Record("ab", "c", 1, _META)

    assert digest_records([split_late])[0] != digest_records([split_early])[0]


def test_digest_changes_when_record_missing():
    records = _records()

    assert digest_records(records[1:])[0] != digest_records(records)[0]


def test_digest_rejects_repeated_key():
    record = Record("ns", "k", 1, _META)

    with pytest.raises(ValueError, match=r"record \('ns', 'k'\) follows \('ns', 'k'\)"):
        digest_records([record, msgspec.structs.replace(record, value=2)])


def test_sorted_digest_rejects_unsorted_input():
    records = _records(3)

    with pytest.raises(ValueError, match="must be sorted by"):
        digest_sorted_records([records[1], records[0]])


def test_sorted_digest_equals_digest_of_sorted_input():
    records = sorted(_records(), key=lambda record: (record.namespace, record.key))

    assert digest_sorted_records(iter(records)) == digest_records(reversed(records))
