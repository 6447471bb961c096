"""Point-in-time views: `--to-seq` and `--as-of` return what live returned at each point."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import msgspec
import pytest

from events.types import NotFound, Store, Value
from handlers.policy import Policy
from replay.engine import ViewNotFoundError, discard_view, view_get, view_search
from tiermem.commands.replay import print_view_get, run
from tiermem.config import StackConfig, write_stack_config

pytestmark = pytest.mark.integration

SMALL = Policy(cache_capacity=8, stm_capacity=3, im_capacity=4, ltm_capacity=6)
SHARDS = 2
NAMESPACE = "agent-7"


def write_stack(data_dir: Path, servers, router) -> None:
    config = StackConfig(
        data_dir=str(data_dir),
        shards=SHARDS,
        policy=SMALL,
        log_url=servers.log.url,
        stm_url=servers.stm.url,
        im_url=servers.im.url,
    )
    write_stack_config(config, data_dir / "stack.json")
    (data_dir / "endpoints.json").write_text(json.dumps(router.endpoints))


def wait_past(ts: int) -> None:
    """Wait until the wall clock is past `ts`, so the router stamps the next event later."""
    deadline = time.monotonic() + 5
    while int(time.time() * 1000) <= ts:
        assert time.monotonic() < deadline, f"the clock did not pass {ts} within 5 s"


class History:
    """The points of one key's history: (label, seq, ts) of each change, and what a `Get` returned after it."""

    def __init__(self) -> None:
        self.points: list[tuple[str, int, int, Value | NotFound]] = []


def record_history(start_router, servers, tmp_path, *, forget: bool) -> History:
    """Store and overwrite one key, and forget it if `forget`, reading it back after each step."""
    router = start_router(shards=SHARDS, policy=SMALL)
    event_log = servers.event_log()
    recorded = History()
    steps = [
        ("stored", Store(namespace=NAMESPACE, key="plan", value={"text": "buy red apples"}, importance=0.7, tags=["shopping"])),
        ("overwritten", Store(namespace=NAMESPACE, key="plan", value={"text": "buy green pears"}, importance=0.4)),
    ]
    if forget:
        steps.append(("forgotten", None))
    with router.client() as client:
        client.pipeline([Store(namespace=f"other-{n}", key=f"k{n}", value=n) for n in range(20)])
        for label, event in steps:
            wait_past(event_log.read(event_log.last_seq() - 1, 1)[0].ts)
            ack = client.request(event) if event is not None else client.forget("plan", namespace=NAMESPACE)
            (logged,) = event_log.read(ack.seq - 1, 1)
            wait_past(logged.ts)
            # Another key's write after each change, so a point is never the log's end.
            client.pipeline([Store(namespace=NAMESPACE, key=f"noise-{label}", value=f"{label} noise")])
            wait_past(event_log.read(event_log.last_seq() - 1, 1)[0].ts)
            recorded.points.append((label, ack.seq, logged.ts, client.get("plan", namespace=NAMESPACE)))
    write_stack(tmp_path, servers, router)
    return recorded


@pytest.fixture
def history(start_router, servers, tmp_path) -> History:
    """Store, overwrite and forget the key."""
    return record_history(start_router, servers, tmp_path, forget=True)


@pytest.fixture
def kept(start_router, servers, tmp_path) -> History:
    """Store and overwrite the key, which stays."""
    return record_history(start_router, servers, tmp_path, forget=False)


def same_answer(view: Value | NotFound, live: Value | NotFound) -> None:
    """A view answers like live did, apart from the seq of the reply and the request id."""
    assert type(view) is type(live)
    assert msgspec.structs.replace(view, seq=0, id=None) == msgspec.structs.replace(live, seq=0, id=None)


def test_to_seq_matches_live(kept, tmp_path, capsys):
    for label, seq, _, live in kept.points:
        status = run(["replay", "--to-seq", str(seq), "--local", "--view", label, "--data-dir", str(tmp_path)])
        capsys.readouterr()

        answer = view_get(tmp_path, label, NAMESPACE, "plan")

        assert status == 0
        assert answer.seq == seq
        same_answer(answer, live)
    assert isinstance(kept.points[0][3], Value)
    assert kept.points[0][3].value == {"text": "buy red apples"}


def test_to_seq_before_forget_erased(history, tmp_path, capsys):
    """A later Forget erased the values: the points before it read as placeholders."""
    for label, seq, _, live in history.points:
        run(["replay", "--to-seq", str(seq), "--local", "--view", label, "--data-dir", str(tmp_path)])
        capsys.readouterr()

        answer = view_get(tmp_path, label, NAMESPACE, "plan")

        if isinstance(live, Value):
            same_answer(answer, msgspec.structs.replace(live, value=None, tags=[]))
        else:
            same_answer(answer, live)
    assert [type(point[3]) for point in history.points] == [Value, Value, NotFound]


@pytest.mark.parametrize("form", ["ms", "iso"])
def test_as_of_matches_live(kept, tmp_path, capsys, form):
    for label, seq, ts, live in kept.points:
        text = str(ts) if form == "ms" else datetime.datetime.fromtimestamp(ts / 1000, datetime.timezone.utc).isoformat(timespec="milliseconds")
        status = run(["replay", "--as-of", text, "--local", "--view", label, "--json", "--data-dir", str(tmp_path)])
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

        assert status == 0
        assert summary["seq"] == seq
        assert summary["as_of"] == ts
        same_answer(view_get(tmp_path, label, NAMESPACE, "plan"), live)


def test_as_of_before_first_event_is_empty(history, tmp_path, capsys):
    first_ts = history.points[0][2]

    status = run(["replay", "--as-of", "0", "--local", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out

    assert status == 0
    assert "view seq-0: the empty state before the first event" in out
    assert "1970" not in out
    assert isinstance(view_get(tmp_path, "seq-0", NAMESPACE, "plan"), NotFound)
    assert first_ts > 0


def test_view_search_at_point(kept, tmp_path, capsys):
    _, stored_seq, _, _ = kept.points[0]
    _, overwritten_seq, _, _ = kept.points[1]
    run(["replay", "--to-seq", str(stored_seq), "--local", "--view", "early", "--data-dir", str(tmp_path)])
    run(["replay", "--to-seq", str(overwritten_seq), "--local", "--view", "later", "--data-dir", str(tmp_path)])
    capsys.readouterr()

    early = view_search(tmp_path, "early", NAMESPACE, "RED apples", limit=5)
    later = view_search(tmp_path, "later", NAMESPACE, "red apples", limit=5)
    pears = view_search(tmp_path, "later", NAMESPACE, "pears", limit=5)

    assert [hit.key for hit in early.hits] == ["plan"]
    assert early.hits[0].snippet == "buy red apples"
    assert early.seq == stored_seq
    assert later.hits == []
    assert [hit.key for hit in pears.hits] == ["plan"]


def test_view_get_does_not_record_access(history, tmp_path, capsys):
    _, seq, _, _ = history.points[0]
    run(["replay", "--to-seq", str(seq), "--local", "--view", "fixed", "--data-dir", str(tmp_path)])
    capsys.readouterr()
    snapshot_files = sorted((tmp_path / "views" / "fixed").rglob("*.snap"))
    before = [path.read_bytes() for path in snapshot_files]

    first = view_get(tmp_path, "fixed", NAMESPACE, "plan")
    second = view_get(tmp_path, "fixed", NAMESPACE, "plan")

    assert first == second
    assert [path.read_bytes() for path in snapshot_files] == before


def test_print_view_get_exit_status(kept, tmp_path, capsys):
    _, seq, _, _ = kept.points[0]
    run(["replay", "--to-seq", str(seq), "--local", "--view", "cli", "--data-dir", str(tmp_path)])
    capsys.readouterr()

    found = print_view_get(str(tmp_path), "cli", NAMESPACE, "plan")
    found_line = capsys.readouterr().out
    missing = print_view_get(str(tmp_path), "cli", NAMESPACE, "never-stored")
    missing_line = capsys.readouterr().out

    assert found == 0
    assert json.loads(found_line)["value"] == {"text": "buy red apples"}
    assert missing == 1
    assert json.loads(missing_line)["type"] == "NotFound"


def test_discard_view(history, tmp_path, capsys):
    _, seq, _, _ = history.points[0]
    run(["replay", "--to-seq", str(seq), "--local", "--view", "gone", "--data-dir", str(tmp_path)])

    status = run(["replay", "--discard", "gone", "--local", "--data-dir", str(tmp_path)])
    again = run(["replay", "--discard", "gone", "--local", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out

    assert status == 0
    assert again == 1
    assert "view gone: discarded" in out
    assert "view gone: not found" in out
    assert not (tmp_path / "views" / "gone").exists()
    assert discard_view(tmp_path, "gone") is False
    with pytest.raises(ViewNotFoundError, match="view 'gone' does not exist"):
        view_get(tmp_path, "gone", NAMESPACE, "plan")


def test_to_seq_past_log_end_rejected(history, tmp_path, capsys):
    _, last_seq, _, _ = history.points[-1]

    status = run(["replay", "--to-seq", "999999", "--local", "--data-dir", str(tmp_path)])

    assert status == 1
    assert "--to-seq 999999 is past the end of the log, which ends at seq" in capsys.readouterr().err
    assert last_seq < 999999


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--as-of", "yesterday"], "time 'yesterday' is invalid: use ISO 8601"),
        (["--to-seq", "-4"], "sequence number '-4' is invalid"),
        (["--to-seq", "3", "--view", "../escape"], "view name '../escape' is invalid"),
    ],
    ids=["bad-time", "bad-seq", "bad-view-name"],
)
def test_replay_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as raised:
        run(["replay", *argv, "--local", "--data-dir", str(tmp_path)])

    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_view_rebuilt_at_other_seq(kept, tmp_path, capsys):
    (_, first_seq, _, first), (_, second_seq, _, second) = kept.points[:2]
    run(["replay", "--to-seq", str(first_seq), "--local", "--view", "moving", "--data-dir", str(tmp_path)])
    before = view_get(tmp_path, "moving", NAMESPACE, "plan")

    run(["replay", "--to-seq", str(second_seq), "--local", "--view", "moving", "--data-dir", str(tmp_path)])
    capsys.readouterr()
    after = view_get(tmp_path, "moving", NAMESPACE, "plan")

    same_answer(before, first)
    same_answer(after, second)
    files = sorted(path.name for path in (tmp_path / "views" / "moving").rglob("*.snap"))
    assert files == [f"{second_seq:020d}.snap"] * SHARDS


def test_view_with_verify_rejected(tmp_path, capsys):
    status = run(["replay", "--verify", "--view", "ignored", "--local", "--data-dir", str(tmp_path)])

    assert status == 1
    assert "--view names the view that --to-seq or --as-of builds" in capsys.readouterr().err
