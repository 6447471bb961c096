"""A client built from docs/protocol.md alone: pyzmq and JSON, none of our packages.

The fixture starts the stack with our code; the client half of each test
uses only `zmq` and `json`, so it shows what a client in another language
has to do.
"""

from __future__ import annotations

import json
import uuid

import pytest
import zmq

pytestmark = pytest.mark.integration


class RawClient:
    """DEALER socket, one JSON frame per request, replies matched by id."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def call(self, request: dict, timeout_ms: int = 10_000) -> dict:
        request.setdefault("id", uuid.uuid4().hex)
        self.sock.send(json.dumps(request).encode("utf-8"))
        while True:
            if not self.sock.poll(timeout_ms):
                raise TimeoutError(f"no reply to {request['id']}")
            reply = json.loads(self.sock.recv())
            if reply.get("id") == request["id"]:
                return reply

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw(start_router):
    router = start_router(shards=2)
    client = RawClient(router.endpoints["normal"])
    yield client
    client.close()


def test_raw_store_get_forget(raw):
    stored = raw.call({"type": "Store", "namespace": "bot", "key": "name", "value": {"first": "Ada"}, "importance": 0.7, "tags": ["profile"]})
    read = raw.call({"type": "Get", "namespace": "bot", "key": "name"})
    forgot = raw.call({"type": "Forget", "namespace": "bot", "key": "name"})
    gone = raw.call({"type": "Get", "namespace": "bot", "key": "name"})
    assert stored["type"] == "Ack"
    assert isinstance(stored["seq"], int)
    assert read["type"] == "Value"
    assert read["value"] == {"first": "Ada"}
    assert read["tier"] == "cache"
    assert read["tags"] == ["profile"]
    assert forgot["type"] == "Ack"
    assert gone["type"] == "NotFound"
    assert gone["seq"] > forgot["seq"] > read["seq"] > stored["seq"]


def test_raw_pipelined_requests(raw):
    ids = [f"p-{n}" for n in range(50)]
    for n, request_id in enumerate(ids):
        raw.sock.send(json.dumps({"type": "Store", "id": request_id, "key": f"k{n}", "value": n}).encode())
    replies = {}
    while len(replies) < len(ids):
        assert raw.sock.poll(10_000)
        reply = json.loads(raw.sock.recv())
        replies[reply["id"]] = reply
    seqs = [replies[request_id]["seq"] for request_id in ids]
    assert all(replies[request_id]["type"] == "Ack" for request_id in ids)
    assert sorted(seqs) == list(range(seqs[0], seqs[0] + 50))


def test_raw_retry_same_id(raw):
    first = raw.call({"type": "Store", "id": "retry-1", "key": "r", "value": 1})
    second = raw.call({"type": "Store", "id": "retry-1", "key": "r", "value": 1})
    assert second["seq"] == first["seq"]
    assert second["duplicate"] is True


def test_raw_status(raw):
    status = raw.call({"type": "Status"})
    assert status["type"] == "StatusReply"
    assert [shard["shard"] for shard in status["shards"]] == [0, 1]
