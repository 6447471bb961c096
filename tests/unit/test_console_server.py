"""The console's web server without a stack: settings, access checks, plain-words errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tiermem.console.access import TOKEN_COOKIE
from tiermem.console.sampler import Sampler
from tiermem.console.server import create_app
from tiermem.console.settings import ConsoleSettings, SettingsError, is_loopback
from tiermem.console.sources import StackSources
from tiermem.servers import free_port

TOKEN = "a-test-token-of-enough-length"
LOCAL = "http://127.0.0.1:7460"


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


def client_for(settings: ConsoleSettings, base_url: str = LOCAL) -> TestClient:
    return TestClient(create_app(settings), base_url=base_url, follow_redirects=False)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


def test_settings_require_token_off_loopback(data_dir):
    with pytest.raises(SettingsError, match="--host 0.0.0.0 is not a loopback address"):
        ConsoleSettings(data_dir=data_dir, host="0.0.0.0")


def test_settings_accept_token_off_loopback(data_dir):
    settings = ConsoleSettings(data_dir=data_dir, host="0.0.0.0", token=TOKEN)

    assert settings.token == TOKEN


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"token": "short"}, "--token is 5 characters long"),
        ({"port": 70000}, "--port 70000 is invalid"),
        ({"sample_interval_s": 0}, "sample_interval_s 0 is invalid"),
        ({"samples": 1}, "samples 1 is invalid"),
    ],
)
def test_settings_reject(data_dir, options, message):
    with pytest.raises(SettingsError, match=message):
        ConsoleSettings(data_dir=data_dir, **options)


def test_page_and_static_files(data_dir):
    with client_for(ConsoleSettings(data_dir=data_dir)) as client:
        page = client.get("/")
        script = client.get("/static/app.js")

    assert page.status_code == 200
    assert "tiermem console" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert script.status_code == 200


def test_foreign_host_rejected(data_dir):
    with client_for(
        ConsoleSettings(data_dir=data_dir), base_url="http://attacker.example:7460"
    ) as client:
        reply = client.get("/api/info")

    assert reply.status_code == 400
    assert "Host header 'attacker.example:7460' is invalid" in reply.text


def test_foreign_origin_rejected_on_post(data_dir):
    with client_for(ConsoleSettings(data_dir=data_dir)) as client:
        reply = client.post(
            "/api/search",
            json={"namespace": "a", "query": "x"},
            headers={"origin": "http://attacker.example"},
        )

    assert reply.status_code == 403
    assert (
        "Origin 'http://attacker.example' is not this console's"
        in reply.json()["error"]
    )


def test_token_missing_rejected(data_dir):
    with client_for(ConsoleSettings(data_dir=data_dir, token=TOKEN)) as client:
        api = client.get("/api/info")
        page = client.get("/")

    assert api.status_code == 401
    assert "requires its token" in api.json()["error"]
    assert page.status_code == 401


def test_token_wrong_rejected(data_dir):
    with client_for(ConsoleSettings(data_dir=data_dir, token=TOKEN)) as client:
        reply = client.get(
            "/api/info", headers={"authorization": "Bearer wrong-token-wrong-token"}
        )

    assert reply.status_code == 401


def test_token_bearer_accepted(data_dir):
    with client_for(ConsoleSettings(data_dir=data_dir, token=TOKEN)) as client:
        reply = client.get("/api/info", headers={"authorization": f"Bearer {TOKEN}"})

    assert reply.status_code == 200
    assert reply.json()["allow_get"] is False


def test_token_query_sets_cookie(data_dir):
    with client_for(ConsoleSettings(data_dir=data_dir, token=TOKEN)) as client:
        first = client.get(f"/?token={TOKEN}")
        client.cookies.set(TOKEN_COOKIE, first.cookies[TOKEN_COOKIE])
        second = client.get("/api/info")

    assert first.status_code == 303
    assert first.headers["location"] == "/"
    assert "httponly" in first.headers["set-cookie"].lower()
    assert "samesite=strict" in first.headers["set-cookie"].lower()
    assert second.status_code == 200


def test_stack_down_is_explained(data_dir):
    with client_for(ConsoleSettings(data_dir=data_dir)) as client:
        namespaces = client.get("/api/namespaces")
        past = client.get("/api/past", params={"namespace": "a", "seq": "1"})
        search = client.post("/api/search", json={"namespace": "a", "query": "x"})

    assert namespaces.status_code == 503
    assert "there is no projection database" in namespaces.json()["error"]
    assert past.status_code == 503
    assert "stack.json does not exist" in past.json()["error"]
    assert search.status_code == 503
    assert "the stack is not running" in search.json()["error"]


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/api/keys", {}, "namespace is missing"),
        ("/api/keys", {"namespace": "a", "limit": "x"}, "limit 'x' is invalid"),
        ("/api/history", {"namespace": "a"}, "key is missing"),
        ("/api/past", {"namespace": "a", "seq": "-3"}, "seq '-3' is invalid"),
        (
            "/api/past",
            {"namespace": "a", "time": "yesterday"},
            "time 'yesterday' is invalid",
        ),
        ("/api/events", {"type": "Delete"}, "event type 'Delete' is invalid"),
    ],
)
def test_bad_parameters_are_named(data_dir, path, params, message):
    with client_for(ConsoleSettings(data_dir=data_dir)) as client:
        reply = client.get(path, params=params)

    assert reply.status_code == 400
    assert message in reply.json()["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"namespace": "a"}, "query is missing"),
        ({"namespace": "a", "query": "x" * 1025}, "use at most 1,024"),
        ({"namespace": "a", "query": "x", "limit": 0}, "limit 0 is invalid"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_search_rejected(data_dir, body, message):
    with client_for(ConsoleSettings(data_dir=data_dir)) as client:
        reply = client.post(
            "/api/search",
            content=json.dumps(body),
            headers={"content-type": "application/json"},
        )

    assert reply.status_code == 400
    assert message in reply.json()["error"]


def test_get_needs_allow_get(data_dir):
    with client_for(ConsoleSettings(data_dir=data_dir)) as client:
        reply = client.post("/api/get", json={"namespace": "a", "key": "k"})

    assert reply.status_code == 403
    assert "--allow-get" in reply.json()["error"]


def test_overview_reports_stack_down(data_dir):
    with client_for(
        ConsoleSettings(data_dir=data_dir, sample_interval_s=0.05)
    ) as client:
        app = client.app.app  # the Starlette app inside the access guard
        sample = app.state.console.sampler.take()
        reply = client.get("/api/overview")

    assert sample["last_seq"] is None
    assert any("the stack is not running" in problem for problem in sample["problems"])
    assert any(
        "there is no projection database" in problem for problem in sample["problems"]
    )
    assert reply.status_code == 200


def test_sampler_reports_silent_router(data_dir):
    data_dir.mkdir(parents=True)
    port = free_port("127.0.0.1")
    endpoints = {
        lane: f"tcp://127.0.0.1:{port}" for lane in ("high", "normal", "low", "pub")
    }
    (data_dir / "endpoints.json").write_text(json.dumps(endpoints))
    sampler = Sampler(
        StackSources(data_dir, bus_timeout_s=0.2), None, interval_s=1.0, samples=5
    )
    try:
        sample = sampler.take()
    finally:
        sampler.stop()

    assert sample["last_seq"] is None
    assert any(
        "did not reply to a Status request within 0.2 s" in problem
        for problem in sample["problems"]
    )
