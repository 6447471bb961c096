"""Tests that docs/protocol.md matches the code: examples, error codes, limits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from events.codec import JSON, decode_reply, decode_request, encode_reply
from events.errors import ErrorCode, ProtocolError
from events.limits import Limits
from events.types import REPLY_TYPES, REQUEST_TYPES, Error
from events.upcast import CURRENT_VERSIONS

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
LIMITS = Limits()

REQUEST_TAGS = {cls.__struct_config__.tag for cls in REQUEST_TYPES}
REPLY_TAGS = {cls.__struct_config__.tag for cls in REPLY_TYPES}


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def json_blocks() -> list[str]:
    return re.findall(r"```json\n(.*?)```", doc_text(), flags=re.DOTALL)


def message_blocks() -> list[str]:
    return [block for block in json_blocks() if '"type"' in block]


def table_rows(heading: str) -> list[list[str]]:
    """Return the body rows of the first table under `heading`, split into cells."""
    section = doc_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_protocol_doc_json_blocks_parse():
    blocks = json_blocks()

    assert len(blocks) > 10
    for block in blocks:
        json.loads(block)


def test_protocol_doc_every_message_shown():
    shown_types = {json.loads(block)["type"] for block in message_blocks()}

    assert REQUEST_TAGS <= shown_types
    assert REPLY_TAGS <= shown_types


def test_protocol_doc_requests_decode():
    blocks = message_blocks()
    rejected = 0

    for index, block in enumerate(blocks):
        if json.loads(block)["type"] not in REQUEST_TAGS:
            continue
        try:
            decode_request(block.strip().encode(), LIMITS)
        except ProtocolError as error:
            # A rejected example must be followed by the Error it gets.
            rejected += 1
            reply = decode_reply(blocks[index + 1].encode())
            assert isinstance(reply, Error), block
            assert reply.code == error.code
            assert reply.field == error.field
            assert reply.message == error.message

    # The worked exchange shows exactly one rejected request.
    assert rejected == 1


@pytest.mark.parametrize(
    "block",
    [block for block in message_blocks() if json.loads(block)["type"] in REPLY_TAGS],
    ids=lambda block: json.loads(block)["type"],
)
def test_protocol_doc_reply_lists_every_field(block):
    reply = decode_reply(block.strip().encode())

    assert set(json.loads(block)) == set(json.loads(encode_reply(reply, JSON)))


def test_protocol_doc_endpoints_example():
    endpoints = json.loads(json_blocks()[0])

    assert set(endpoints) == {"high", "normal", "low", "pub"}


def test_protocol_doc_error_codes_table():
    codes = [row[0].strip("`") for row in table_rows("Error codes")]

    assert sorted(codes) == sorted(ErrorCode.ALL)


def test_protocol_doc_retryable_codes():
    retry = {row[0].strip("`"): row[2] for row in table_rows("Error codes")}

    assert retry["unavailable"] == "yes"
    assert retry["internal"] == "yes"
    assert [code for code, answer in retry.items() if answer == "yes"] == [
        "unavailable",
        "internal",
    ]


def test_protocol_doc_limits_table():
    defaults = {row[0]: row[1] for row in table_rows("Limits")}

    assert f"{LIMITS.max_frame_bytes:,}" in defaults["frame"]
    assert f"{LIMITS.max_value_bytes:,}" in defaults["value"]
    assert defaults["key"] == str(LIMITS.max_key_bytes)
    assert defaults["namespace"] == str(LIMITS.max_namespace_bytes)
    assert defaults["id"] == str(LIMITS.max_id_bytes)
    assert defaults["tags"] == (
        f"{LIMITS.max_tags} tags of at most {LIMITS.max_tag_bytes} bytes each"
    )
    assert defaults["nesting depth"] == str(LIMITS.max_depth)


def test_protocol_doc_current_versions():
    listed = ", ".join(
        f"{name} {version}" for name, version in list(CURRENT_VERSIONS.items())[:-1]
    )
    last_name, last_version = list(CURRENT_VERSIONS.items())[-1]

    prose = " ".join(doc_text().split())

    assert f"{listed} and {last_name} {last_version}." in prose
