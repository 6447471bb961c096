"""Bad input over real ZeroMQ sockets: each gets an `Error`, the router keeps serving."""

from __future__ import annotations

import json

import msgspec
import pytest
import zmq

from events.errors import ErrorCode
from events.limits import Limits, value_size
from events.types import Ack, Error, Value

pytestmark = pytest.mark.integration


@pytest.fixture
def router(start_router):
    return start_router(shards=2)


@pytest.fixture
def dealer(router):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(router.endpoints["normal"])
    yield sock
    sock.close(linger=0)


def exchange(sock: zmq.Socket, *frames: bytes) -> dict:
    sock.send_multipart(list(frames))
    (reply,) = sock.recv_multipart()
    return json.loads(reply) if reply[:1] == b"{" else msgspec.msgpack.decode(reply)


def assert_still_serving(sock: zmq.Socket, key: str) -> None:
    stored = exchange(sock, json.dumps({"type": "Store", "key": key, "value": key}).encode())
    assert stored["type"] == "Ack"
    read = exchange(sock, json.dumps({"type": "Get", "key": key}).encode())
    assert read["type"] == "Value"
    assert read["value"] == key


def deep_json(levels: int) -> bytes:
    return b'{"type":"Store","key":"deep","value":' + b"[" * levels + b"]" * levels + b"}"


BAD_INPUT = {
    "not_json_or_msgpack": ((b"\xc1\xc1 not a message",), ErrorCode.MALFORMED, None),
    "unknown_type": ((b'{"type":"Remember","key":"k"}',), ErrorCode.UNKNOWN_TYPE, "$.type"),
    "wrong_field_type": ((b'{"type":"Store","key":7,"value":1}',), ErrorCode.INVALID_FIELD, "$.key"),
    "int_65_bits_in_value": ((b'{"type":"Store","key":"k","value":36893488147419103232}',), ErrorCode.INVALID_FIELD, "$.value"),
    "int_65_bits_in_field": ((b'{"type":"Store","key":"k","value":1,"ttl_s":36893488147419103232}',), ErrorCode.INVALID_FIELD, "$.ttl_s"),
    "nan_importance_json": ((b'{"type":"Store","key":"k","value":1,"importance":NaN}',), ErrorCode.MALFORMED, None),
    "infinity_importance_json": ((b'{"type":"Store","key":"k","value":1,"importance":1e999}',), ErrorCode.INVALID_FIELD, "$.importance"),
    "nan_importance_msgpack": ((msgspec.msgpack.encode({"type": "Store", "key": "k", "value": 1, "importance": float("nan")}),), ErrorCode.INVALID_FIELD, "$.importance"),
    "infinity_importance_msgpack": ((msgspec.msgpack.encode({"type": "Store", "key": "k", "value": 1, "importance": float("inf")}),), ErrorCode.INVALID_FIELD, "$.importance"),
    "nested_10000_levels": ((deep_json(10_000),), ErrorCode.TOO_DEEP, "$.value"),
    "empty_frame": ((b"",), ErrorCode.EMPTY_FRAME, None),
    "extra_frames": ((b'{"type":"Get","key":"k"}', b"second"), ErrorCode.EXTRA_FRAMES, None),
    "key_with_nul": ((b'{"type":"Store","key":"a\\u0000b","value":1}',), ErrorCode.INVALID_FIELD, "$.key"),
    "version_too_new": ((b'{"type":"Get","key":"k","v":99}',), ErrorCode.UNSUPPORTED_VERSION, "$.v"),
    "unknown_field": ((b'{"type":"Get","key":"k","colour":"red"}',), ErrorCode.INVALID_FIELD, "$.colour"),
    "missing_key": ((b'{"type":"Get"}',), ErrorCode.MISSING_FIELD, "$.key"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gets_error(dealer, case):
    frames, code, field = BAD_INPUT[case]
    reply = exchange(dealer, *frames)
    assert reply["type"] == "Error"
    assert reply["code"] == code
    assert reply.get("field") == field
    assert reply["message"]
    assert_still_serving(dealer, f"after-{case}")


def test_value_one_byte_over_limit(dealer):
    limit = Limits().max_value_bytes
    text = "x" * (limit - 5)
    while value_size(text) < limit:
        text += "x"
    assert value_size(text) == limit
    at_limit = exchange(dealer, json.dumps({"type": "Store", "key": "big", "value": text}).encode())
    over = exchange(dealer, json.dumps({"type": "Store", "key": "bigger", "value": text + "x"}).encode())
    assert at_limit["type"] == "Ack"
    assert over["type"] == "Error"
    assert over["code"] == ErrorCode.TOO_LARGE
    assert over["field"] == "$.value"
    assert_still_serving(dealer, "after-big")


def test_error_echoes_request_id(dealer):
    reply = exchange(dealer, b'{"type":"Store","id":"req-9","key":7,"value":1}')
    assert reply["id"] == "req-9"
    assert reply["code"] == ErrorCode.INVALID_FIELD


def test_req_socket_envelope(router):
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(router.endpoints["high"])
    try:
        sock.send(b'{"type":"Store","key":"via-req","value":[1,2]}')
        reply = json.loads(sock.recv())
        assert reply["type"] == "Ack"
        sock.send(b'{"type":"Get","key":"via-req"}')
        reply = json.loads(sock.recv())
        assert reply["value"] == [1, 2]
    finally:
        sock.close(linger=0)


def test_reply_codec_follows_request(dealer):
    reply_frames = []
    dealer.send(msgspec.msgpack.encode({"type": "Store", "key": "mp", "value": 1}))
    reply_frames.append(dealer.recv())
    dealer.send(b'{"type":"Get","key":"mp"}')
    reply_frames.append(dealer.recv())
    assert msgspec.msgpack.decode(reply_frames[0])["type"] == "Ack"
    assert json.loads(reply_frames[1])["type"] == "Value"


def test_client_library_round_trip(router):
    with router.client() as client:
        ack = client.store("k", {"a": [1, 2.5, None]}, namespace="ns", importance=0.9, tags=["x"])
        value = client.get("k", namespace="ns")
    assert isinstance(ack, Ack)
    assert isinstance(value, Value)
    assert value.value == {"a": [1, 2.5, None]}
    assert value.tags == ["x"]
    assert value.seq > ack.seq


def test_client_error_raises(router):
    from bus.client import ClientError
    from events.types import Store

    with router.client() as client, pytest.raises(ClientError) as raised:
        client.request(Store(key="a\x00b", value=1))
    assert isinstance(raised.value.reply, Error)
    assert raised.value.reply.code == ErrorCode.INVALID_FIELD
