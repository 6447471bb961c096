"""`tiermem check --target endpoint` against a router that requires CURVE."""

from __future__ import annotations

import argparse
import json

import pytest

from bus.auth import AuthSettings, ClientGrant, generate_keypair, load_keys
from bus.router import RouterSettings
from tiermem.commands.check import add_check_parser

pytestmark = pytest.mark.integration

RANDOM_PORTS = {"high": 0, "normal": 0, "low": 0, "pub": 0}


@pytest.fixture
def secured(start_router, tmp_path):
    """A CURVE router that admits the key `checker`; return its data directory and key files."""
    files = {
        name: generate_keypair(tmp_path / "keys", name) for name in ("server", "checker")
    }
    checker_public = load_keys(files["checker"][1]).public.decode()
    auth = AuthSettings(
        server_secret_file=str(files["server"][1]),
        clients={checker_public: ClientGrant(name="checker")},
    )
    router = start_router(
        shards=2, settings=RouterSettings(ports=dict(RANDOM_PORTS), auth=auth)
    )
    data_dir = tmp_path / "deployment"
    data_dir.mkdir()
    (data_dir / "endpoints.json").write_text(json.dumps(router.endpoints))
    return data_dir, files


def run_check(capsys, *args: str) -> int:
    parser = argparse.ArgumentParser(prog="tiermem")
    add_check_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["check", *args])
    capsys.readouterr()
    return parsed.handler(parsed)


def test_check_endpoint_with_client_key(secured, capsys):
    data_dir, files = secured
    status = run_check(
        capsys,
        "--target", "endpoint",
        "--data-dir", str(data_dir),
        "--client-key", str(files["checker"][1]),
        "--server-key", str(files["server"][0]),
        "--examples", "4",
        "--steps", "12",
        "--seed", "11",
        "--json",
    )  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 0, summary
    assert summary["passed"] is True
    assert summary["examples"] >= 4
    assert summary["seed"] == 11


@pytest.mark.parametrize(
    ("client_file", "server_args", "message"),
    [
        (0, ["--server-key", "server"], "contains no secret key"),
        (1, [], "pass --server-key FILE"),
        (1, ["--server-key", "missing"], "failed to read the key file"),
    ],
    ids=["public-file-as-client-key", "no-server-key", "server-key-not-found"],
)
def test_check_rejects_bad_keys(secured, capsys, client_file, server_args, message):
    data_dir, files = secured
    paths = {"server": str(files["server"][0]), "missing": str(data_dir / "none.key")}
    server = [paths.get(arg, arg) for arg in server_args]
    with pytest.raises(SystemExit, match=message):
        run_check(
            capsys,
            "--target", "endpoint",
            "--data-dir", str(data_dir),
            "--client-key", str(files["checker"][client_file]),
            *server,
        )  # fmt: skip


def test_check_rejects_client_key_for_stack(capsys):
    with pytest.raises(SystemExit, match="--client-key is for --target endpoint"):
        run_check(capsys, "--target", "stack", "--client-key", "keys/me.key_secret")
