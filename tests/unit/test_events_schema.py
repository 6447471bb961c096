"""Tests of the JSON Schema document that `tiermem schema` prints."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from events.codec import JSON, encode_reply, encode_request
from events.schema import SCHEMA_DIALECT, schema_document
from events.types import (
    REPLY_TYPES,
    REQUEST_TYPES,
    Ack,
    Busy,
    Digest,
    DigestReply,
    Error,
    Forget,
    Get,
    Maintain,
    NotFound,
    ShardStatus,
    Status,
    StatusReply,
    Store,
    TierDigest,
    Value,
)

REQUEST_EXAMPLES = [
    Store(id="r1", key="k", value={"text": "hi", "n": [1, 2.5]}, tags=["a"]),
    Store(key="k", value=None, importance=1.0, ttl_s=60, namespace="agent-7"),
    Get(id="r2", key="k"),
    Forget(key="k"),
    Maintain(),
    Maintain(namespace="agent-7"),
    Status(id="r3"),
    Digest(),
]

REPLY_EXAMPLES = [
    Ack(id="r1", seq=1),
    Ack(id="r1", seq=1, duplicate=True),
    Value(id="r2", seq=2, key="k", value=[1], tier="stm", tags=["a"]),
    NotFound(id="r2", seq=2, key="k", degraded=True),
    Busy(id="r4", lane="low", retry_after_ms=50),
    Error(id="r5", code="missing_field", message="m", field="$.key"),
    StatusReply(
        id="r3",
        last_seq=9,
        shards=[ShardStatus(shard=0, watermark=9, pid=10, node="n1", keys=3)],
        lanes={"high": 0},
    ),
    DigestReply(
        seq=9, tiers=[TierDigest(shard=0, tier="ltm", digest="ab", records=1)]
    ),
]


def tag_of(cls: type) -> str:
    return cls.__struct_config__.tag


def resolve(document: dict[str, Any], reference: dict[str, str]) -> dict[str, Any]:
    prefix = "#/$defs/"
    target = reference["$ref"]
    assert target.startswith(prefix)
    return document["$defs"][target.removeprefix(prefix)]


def validator_for(union: str):
    """Build a jsonschema validator for the `requests` or `replies` entry."""
    jsonschema = pytest.importorskip("jsonschema")
    document = schema_document()
    return jsonschema.Draft202012Validator({**document, **document[union]})


def test_schema_dialect():
    assert schema_document()["$schema"] == SCHEMA_DIALECT


def test_schema_is_json_serializable():
    document = schema_document()

    assert json.loads(json.dumps(document)) == document


def test_schema_requests_ref_resolves():
    document = schema_document()

    assert document["requests"] == {"$ref": "#/$defs/Request"}
    assert "anyOf" in resolve(document, document["requests"])


def test_schema_replies_ref_resolves():
    document = schema_document()

    assert document["replies"] == {"$ref": "#/$defs/Reply"}
    assert "anyOf" in resolve(document, document["replies"])


def test_schema_request_union_lists_every_request():
    document = schema_document()
    union = document["$defs"]["Request"]

    listed = {member["$ref"] for member in union["anyOf"]}

    assert listed == {f"#/$defs/{tag_of(cls)}" for cls in REQUEST_TYPES}
    assert set(union["discriminator"]["mapping"]) == {tag_of(c) for c in REQUEST_TYPES}


def test_schema_reply_union_lists_every_reply():
    document = schema_document()
    union = document["$defs"]["Reply"]

    listed = {member["$ref"] for member in union["anyOf"]}

    assert listed == {f"#/$defs/{tag_of(cls)}" for cls in REPLY_TYPES}
    assert set(union["discriminator"]["mapping"]) == {tag_of(c) for c in REPLY_TYPES}


def test_schema_store_definition():
    store = schema_document()["$defs"]["Store"]

    assert store["properties"]["type"] == {"enum": ["Store"]}
    assert set(store["required"]) == {"type", "key", "value"}
    assert store["additionalProperties"] is False
    assert store["properties"]["importance"]["minimum"] == 0.0
    assert store["properties"]["importance"]["maximum"] == 1.0
    assert store["properties"]["v"]["default"] == 2


def test_schema_nested_structs_defined():
    definitions = schema_document()["$defs"]

    assert "ShardStatus" in definitions
    assert "TierDigest" in definitions


def test_schema_fresh_document_each_call():
    first = schema_document()
    first["$defs"].clear()

    assert schema_document()["$defs"]


def test_schema_is_valid_2020_12():
    jsonschema = pytest.importorskip("jsonschema")

    jsonschema.Draft202012Validator.check_schema(schema_document())


@pytest.mark.parametrize("message", REQUEST_EXAMPLES, ids=lambda m: tag_of(type(m)))
def test_schema_accepts_encoded_request(message):
    instance = json.loads(encode_request(message, JSON))
    validator = validator_for("requests")

    errors = [error.message for error in validator.iter_errors(instance)]

    assert errors == []


@pytest.mark.parametrize("message", REPLY_EXAMPLES, ids=lambda m: tag_of(type(m)))
def test_schema_accepts_encoded_reply(message):
    instance = json.loads(encode_reply(message, JSON))
    validator = validator_for("replies")

    errors = [error.message for error in validator.iter_errors(instance)]

    assert errors == []


@pytest.mark.parametrize(
    "instance",
    [
        {"type": "Remember", "key": "k"},
        {"type": "Get"},
        {"type": "Get", "key": "k", "colour": "red"},
        {"type": "Get", "key": 5},
        {"type": "Store", "key": "k", "value": 1, "importance": 1.5},
        {"type": "Store", "key": "k", "value": 1, "ttl_s": 0},
        {"type": "Ack", "seq": 1},
    ],
    ids=[
        "unknown type",
        "missing key",
        "extra field",
        "key type",
        "importance",
        "ttl",
        "reply",
    ],
)
def test_schema_rejects_invalid_request(instance):
    assert not validator_for("requests").is_valid(instance)


def test_schema_rejects_request_as_reply():
    instance = msgspec.json.decode(encode_request(Get(key="k"), JSON))

    assert not validator_for("replies").is_valid(instance)
