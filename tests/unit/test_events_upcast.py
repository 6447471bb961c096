"""Tests of schema versions, the upcasters and replay of old log entries."""

from __future__ import annotations

import msgspec
import pytest

from events.codec import decode_event, encode_event
from events.types import EVENT_TYPES, Forget, Get, Maintain, Store
from events.upcast import _UPCASTERS, CURRENT_VERSIONS, needs_upcast, register, upcast


def test_current_versions():
    assert CURRENT_VERSIONS == {"Store": 2, "Get": 1, "Forget": 2, "Maintain": 1, "Search": 1}


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_version_step_has_upcaster(event_type):
    type_name = event_type.__struct_config__.tag

    for version in range(1, CURRENT_VERSIONS[type_name]):
        assert (type_name, version) in _UPCASTERS


def test_needs_upcast_older_version():
    assert needs_upcast("Store", 1)


def test_needs_upcast_current_version():
    assert not needs_upcast("Store", 2)
    assert not needs_upcast("Get", 1)


def test_needs_upcast_newer_version():
    assert not needs_upcast("Store", 3)


def test_needs_upcast_unknown_type():
    assert not needs_upcast("Status", 1)


def test_store_v1_comma_tags_split():
    lifted = upcast({"type": "Store", "v": 1, "key": "k", "value": 1, "tags": "a,b"})

    assert lifted["v"] == 2
    assert lifted["tags"] == ["a", "b"]


def test_store_v1_tags_stripped_and_empty_dropped():
    lifted = upcast({"type": "Store", "v": 1, "tags": " a , ,b,, "})

    assert lifted["tags"] == ["a", "b"]


def test_store_v1_empty_tags_string():
    lifted = upcast({"type": "Store", "v": 1, "tags": ""})

    assert lifted["tags"] == []


def test_store_v1_without_tags():
    lifted = upcast({"type": "Store", "v": 1, "key": "k", "value": 1})

    assert lifted == {"type": "Store", "v": 2, "key": "k", "value": 1}


def test_store_v1_list_tags_kept():
    lifted = upcast({"type": "Store", "v": 1, "tags": ["a, b"]})

    assert lifted["tags"] == ["a, b"]


def test_store_without_version_read_as_v1():
    lifted = upcast({"type": "Store", "tags": "a,b"})

    assert lifted["v"] == 2
    assert lifted["tags"] == ["a", "b"]


def test_upcast_leaves_input_unchanged():
    original = {"type": "Store", "v": 1, "tags": "a,b"}

    upcast(original)

    assert original == {"type": "Store", "v": 1, "tags": "a,b"}


def test_upcast_current_version_unchanged():
    message = {"type": "Get", "v": 1, "key": "k"}

    assert upcast(message) == {"type": "Get", "v": 1, "key": "k"}


def test_upcast_missing_step_raises_key_error(monkeypatch):
    monkeypatch.setitem(CURRENT_VERSIONS, "Get", 2)

    with pytest.raises(KeyError):
        upcast({"type": "Get", "v": 1, "key": "k"})


def test_register_duplicate_rejected():
    before = dict(_UPCASTERS)

    with pytest.raises(ValueError, match="Store v1 exists"):
        register("Store", 1)(lambda message: message)

    assert _UPCASTERS == before


# Replay of log entries.


def test_replay_store_v1_log_entry():
    entry = msgspec.msgpack.encode(
        {
            "type": "Store",
            "v": 1,
            "id": "r1",
            "seq": 3,
            "ts": 1_700_000_000_000,
            "key": "k",
            "value": {"text": "hello"},
            "tags": "red,green",
        }
    )

    event = decode_event(entry)

    assert isinstance(event, Store)
    assert event.v == 2
    assert event.tags == ["red", "green"]
    assert event.seq == 3
    assert event.value == {"text": "hello"}


@pytest.mark.parametrize(
    "event",
    [
        Store(key="k", value=1, seq=1, ts=0),
        Get(key="k", seq=2, ts=0),
        Forget(key="k", seq=3, ts=0),
        Maintain(seq=4, ts=0),
    ],
)
def test_encoded_event_records_version(event):
    # A log entry without `v` would decode as whatever version is current
    # when it is read, so every entry must carry the version it was written in.
    entry = msgspec.msgpack.decode(encode_event(event))

    assert entry["v"] == CURRENT_VERSIONS[entry["type"]]


def test_logged_current_event_survives_version_bump(monkeypatch):
    # Simulate a release that makes Get v2. An entry logged as v1 must still
    # read as v1, so that the Get v1 upcaster lifts it.
    entry = encode_event(Get(key="k", seq=1, ts=0))
    monkeypatch.setitem(CURRENT_VERSIONS, "Get", 2)

    assert needs_upcast("Get", msgspec.msgpack.decode(entry)["v"])
