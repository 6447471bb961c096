"""`tiermem check --target endpoint` against a router that requires CURVE."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bus.auth import AuthSettings, ClientGrant, generate_keypair, load_keys
from bus.router import RouterSettings

pytestmark = pytest.mark.integration

RANDOM_PORTS = {"high": 0, "normal": 0, "low": 0, "pub": 0}
CHECK_TIMEOUT_S = 120


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


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `tiermem check` in a child process, as a user would.

    Not in this process: the command configures structlog for itself,
    which would silence the log captures of later tests.
    """
    return subprocess.run(
        [
            sys.executable, "-c",
            "import sys; from tiermem.cli import main; sys.exit(main())",
            "check", *args,
        ],
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
    )  # fmt: skip


def test_check_endpoint_with_client_key(secured):
    data_dir, files = secured
    result = run_check(
        "--target", "endpoint",
        "--data-dir", str(data_dir),
        "--client-key", str(files["checker"][1]),
        "--server-key", str(files["server"][0]),
        "--examples", "4",
        "--steps", "12",
        "--seed", "11",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
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
def test_check_rejects_bad_keys(secured, client_file, server_args, message):
    data_dir, files = secured
    paths = {"server": str(files["server"][0]), "missing": str(data_dir / "none.key")}
    server = [paths.get(arg, arg) for arg in server_args]

    result = run_check(
        "--target", "endpoint",
        "--data-dir", str(data_dir),
        "--client-key", str(files["checker"][client_file]),
        *server,
    )  # fmt: skip

    assert result.returncode == 1
    assert message in result.stderr


def test_check_rejects_client_key_for_stack():
    result = run_check("--target", "stack", "--client-key", "keys/me.key_secret")

    assert result.returncode == 1
    assert "--client-key is for --target endpoint" in result.stderr
