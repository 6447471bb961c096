"""`tiermem doctor` against a router that requires CURVE."""

from __future__ import annotations

import argparse
import json

import pytest

from bus.auth import AuthSettings, ClientGrant, generate_keypair, load_keys
from bus.router import RouterSettings
from tiermem.commands.doctor import add_doctor_parser

pytestmark = pytest.mark.integration

RANDOM_PORTS = {"high": 0, "normal": 0, "low": 0, "pub": 0}
ROUTER_CHECKS = ["bus.high", "bus.normal", "bus.low", "shards", "apply_lag"]


@pytest.fixture
def secured(start_router, servers, tmp_path):
    """A router with CURVE that admits the key `ops`, and the TOML that describes it.

    Returns the path of the TOML and the key files, by name.
    """
    files = {
        name: generate_keypair(tmp_path / "keys", name)
        for name in ("server", "ops", "stranger")
    }
    ops_public = load_keys(files["ops"][1]).public.decode()
    auth = AuthSettings(
        server_secret_file=str(files["server"][1]),
        clients={ops_public: ClientGrant(name="ops", read=["team-*"])},
    )
    router = start_router(
        shards=1, settings=RouterSettings(ports=dict(RANDOM_PORTS), auth=auth)
    )

    ports = "".join(
        f"{lane} = {url.rsplit(':', 1)[1]}\n" for lane, url in router.endpoints.items()
    )
    path = tmp_path / "tiermem.toml"
    path.write_text(
        f'data_dir = "{tmp_path / "data"}"\nshards = 1\n'
        f'log_url = "{servers.log.url}"\nstm_url = "{servers.stm.url}"\nim_url = "{servers.im.url}"\n'
        f"[router.ports]\n{ports}"
        f'[router.auth]\nserver_secret_file = "{files["server"][1]}"\n'
        f'[router.auth.clients.\'{ops_public}\']\nname = "ops"\nread = ["team-*"]\n'
    )
    return str(path), files


def doctor(capsys, *args: str) -> tuple[int, dict[str, dict]]:
    parser = argparse.ArgumentParser(prog="tiermem")
    add_doctor_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["doctor", "--json", "--timeout", "3", *args])
    capsys.readouterr()
    status = parsed.handler(parsed)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return status, {check["name"]: check for check in report["checks"]}


def test_doctor_with_client_key(secured, capsys):
    config, files = secured

    _, checks = doctor(capsys, "--config", config, "--client-key", str(files["ops"][1]))

    # The grant lacks read of every namespace, so ReadLog gets `forbidden`:
    # that is still a reply, and Status is allowed to any listed key.
    for name in ROUTER_CHECKS:
        assert checks[name]["ok"] is True, checks[name]
    assert "forbidden" in checks["bus.high"]["detail"]


def test_doctor_without_client_key(secured, capsys):
    config, _ = secured

    status, checks = doctor(capsys, "--config", config)

    assert status == 1
    for name in ROUTER_CHECKS[:4]:
        assert checks[name]["ok"] is False
        assert "--client-key" in checks[name]["fix"]


def test_doctor_with_unlisted_key(secured, capsys):
    config, files = secured

    status, checks = doctor(
        capsys, "--config", config, "--client-key", str(files["stranger"][1])
    )

    assert status == 1
    for name in ROUTER_CHECKS[:3]:
        assert "no reply" in checks[name]["detail"]
