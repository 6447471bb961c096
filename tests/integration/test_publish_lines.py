"""`tiermem publish`'s line handling against a real router: order, line numbers, slow input."""

from __future__ import annotations

import io
import os
import threading

import pytest

from events.types import Ack, Error, Message, NotFound, Value
from tiermem.commands.publish import publish_lines

pytestmark = pytest.mark.integration

REPLY_TIMEOUT_S = 30


def test_replies_follow_input_order(start_router):
    router = start_router(shards=2)
    source = io.BytesIO(
        b'{"type":"Store","namespace":"p","key":"a","value":"alpha"}\n'
        b"not json at all\n"
        b"\n"
        b'{"type":"Get","namespace":"p","key":"a"}\n'
        b'{"type":"Bogus"}\n'
        b"null\n"
        b'{"type":"Get","namespace":"p","key":"missing"}\n'
        b"\xff\xfe\n"
    )
    replies: list[Message] = []

    with router.client() as client:
        rejected, failed = publish_lines(client, source, lane="normal", emit=replies.append)

    assert [type(reply) for reply in replies] == [
        Ack, Error, Value, Error, Error, NotFound, Error,
    ]  # fmt: skip
    errors = [reply for reply in replies if isinstance(reply, Error)]
    assert [error.message.split(":")[0] for error in errors] == [
        "line 2", "line 5", "line 6", "line 8",
    ]  # fmt: skip
    assert errors[0].message == "line 2: expected a JSON object, got 'not json at all'"
    assert errors[1].code == "unknown_type"
    assert replies[2].value == "alpha"
    assert rejected == 4
    assert failed == 0


def test_reply_sent_before_next_line(start_router):
    """A reply is emitted before the producer writes the next line."""
    router = start_router(shards=1)
    read_end, write_end = os.pipe()
    first_reply = threading.Event()
    replies: list[Message] = []

    def emit(reply: Message) -> None:
        replies.append(reply)
        first_reply.set()

    def producer() -> None:
        with open(write_end, "wb", buffering=0) as pipe:
            pipe.write(b'{"type":"Store","namespace":"slow","key":"k","value":1}\n')
            # The second line is written only once the first reply is out,
            # so a publish that waited for the end of input would hang here.
            if first_reply.wait(REPLY_TIMEOUT_S):
                pipe.write(b'{"type":"Get","namespace":"slow","key":"k"}\n')

    writer = threading.Thread(target=producer, name="slow-producer")
    writer.start()
    with router.client() as client, open(read_end, "rb") as source:
        publish_lines(client, source, lane="normal", emit=emit)
    writer.join(REPLY_TIMEOUT_S)

    assert [type(reply) for reply in replies] == [Ack, Value]
    assert replies[1].value == 1
