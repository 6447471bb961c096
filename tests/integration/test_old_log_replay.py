"""A log written by an earlier release replays on this one to the digests that release computed.

The fixture in tests/fixtures was written by release 893890c with
tests/fixtures/make_old_log.py: plaintext Store v2 entries, Forget v1
entries, and one batch of Store v1 entries of a release before that. Its
JSON file holds the digests that release's own rebuild gave.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import redis

from events.log import RedisEventLog
from events.types import Forget, Store
from handlers.policy import Policy
from replay.rebuild import compare_digests, rebuild

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).parent.parent / "fixtures" / "log-893890c"


@pytest.fixture
def old_log(redis_factory) -> tuple[RedisEventLog, dict]:
    expected = json.loads(FIXTURE.with_suffix(".json").read_text())
    entries = msgspec.msgpack.decode(FIXTURE.with_suffix(".entries").read_bytes())
    client = redis.Redis.from_url(redis_factory("log").url)
    event_log = RedisEventLog(client)
    for entry_id, first, payload in entries:
        client.xadd(event_log.stream, {"f": first, "e": payload}, id=entry_id)
    return event_log, expected


def test_old_log_replays_to_its_release_digests(old_log):
    event_log, expected = old_log

    result = rebuild(
        event_log,
        shards=expected["shards"],
        policy=msgspec.convert(expected["policy"], Policy),
        until_seq=expected["last_seq"],
    )

    assert result.seq == expected["last_seq"] == event_log.last_seq()
    wanted = msgspec.convert(expected["digests"], list[type(result.digests[0])])
    assert compare_digests(wanted, result.digests) == []


def test_old_entries_are_upcast_on_read(old_log):
    event_log, _ = old_log

    events = event_log.read(0, 1000)

    forgets = [event for event in events if isinstance(event, Forget)]
    assert forgets and all(event.v == 2 and event.key for event in forgets)
    from_v1 = [event for event in events if isinstance(event, Store) and event.key.startswith("v1-")]
    assert [event.tags for event in from_v1] == [["old", "tags"]] * 3
    assert all(event.v == 2 for event in from_v1)


def test_new_appends_continue_an_old_log(old_log):
    """An upgraded router appends sealed entries after the old plaintext ones."""
    event_log, expected = old_log
    seq = expected["last_seq"] + 1

    event_log.append([Store(id="new-1", namespace="agent-0", key="note-0", value="after upgrade", seq=seq, ts=2_000_000_000_000)], [0])
    event_log.append([Forget(id="new-2", namespace="agent-0", key="note-0", seq=seq + 1, ts=2_000_000_000_001)], [0])

    after = event_log.read(seq - 1, 10)
    assert isinstance(after[0], Store) and after[0].value is None  # sealed, then shredded
    assert isinstance(after[1], Forget)
