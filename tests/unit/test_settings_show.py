"""`tiermem config show` and the masking of passwords in settings."""

from __future__ import annotations

import argparse
import json

import pytest

from tiermem.commands.config import add_config_parser
from tiermem.settings import SettingsError, mask_secrets


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:hunter2@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        (
            "redis://tiermem:hunter2@10.0.0.5:6379/0",
            "redis://tiermem:***@10.0.0.5:6379/0",
        ),
        (
            "rediss://default:s3cr%40t@cache.example:6380",
            "rediss://default:***@cache.example:6380",
        ),
        (
            "redis://10.0.0.5:6379/0?password=hunter2&db=1",
            "redis://10.0.0.5:6379/0?password=***&db=1",
        ),
        ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
        ("redis://tiermem@10.0.0.5:6379/0", "redis://tiermem@10.0.0.5:6379/0"),
        ("/etc/tiermem/server.key_secret", "/etc/tiermem/server.key_secret"),
        (
            "cannot reach redis://:pw@h:1/0: refused",
            "cannot reach redis://:***@h:1/0: refused",
        ),
    ],
)
def test_mask_secrets(text, expected):
    assert mask_secrets(text) == expected


@pytest.fixture
def clean_env(monkeypatch):
    """Remove every TIERMEM_ variable, so only the test's own apply."""
    import os

    for variable in [name for name in os.environ if name.startswith("TIERMEM_")]:
        monkeypatch.delenv(variable)
    return monkeypatch


def config_show(capsys, *args: str) -> str:
    parser = argparse.ArgumentParser(prog="tiermem")
    add_config_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["config", "show", *args])
    capsys.readouterr()
    assert parsed.handler(parsed) == 0
    return capsys.readouterr().out


def test_show_lists_value_and_source(clean_env, capsys, tmp_path):
    path = tmp_path / "tiermem.toml"
    path.write_text('shards = 4\nlog_url = "redis://:hunter2@10.0.0.5:6390/0"\n')
    clean_env.setenv("TIERMEM_POLICY__STM_CAPACITY", "32")

    lines = {
        line.split()[0]: line.split(None, 2)[1:]
        for line in config_show(capsys, "--config", str(path)).splitlines()
    }

    assert lines["shards"] == ["4", f"file {path}"]
    assert lines["policy.stm_capacity"] == [
        "32",
        "environment TIERMEM_POLICY__STM_CAPACITY",
    ]
    assert lines["policy.im_capacity"] == ["64", "default"]
    assert lines["log_url"] == ['"redis://:***@10.0.0.5:6390/0"', f"file {path}"]


def test_show_json(clean_env, capsys):
    clean_env.setenv("TIERMEM_BROKER_URL", "redis://celery:hunter2@10.0.0.6:6379/0")

    output = config_show(capsys, "--json")

    document = json.loads(output)
    settings = {item["name"]: item for item in document["settings"]}
    assert settings["broker_url"] == {
        "name": "broker_url",
        "value": "redis://celery:***@10.0.0.6:6379/0",
        "source": "environment",
        "origin": "TIERMEM_BROKER_URL",
    }
    assert settings["shards"] == {
        "name": "shards",
        "value": 2,
        "source": "default",
        "origin": None,
    }
    assert "hunter2" not in output


def test_show_rejects_invalid_settings(clean_env, capsys):
    clean_env.setenv("TIERMEM_SHARDS", "0")
    parser = argparse.ArgumentParser(prog="tiermem")
    add_config_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["config", "show"])

    with pytest.raises(
        SettingsError,
        match=r"shards: expected an integer >= 1, got 0 \(from TIERMEM_SHARDS\)",
    ):
        parsed.handler(parsed)


def test_show_takes_the_options_of_up(clean_env, capsys, tmp_path):
    """`--data-dir` and `--shards` override the file and the environment, as for `tiermem up`."""
    path = tmp_path / "tiermem.toml"
    path.write_text('shards = 4\ndata_dir = "/srv/tiermem"\n')
    clean_env.setenv("TIERMEM_SHARDS", "6")

    output = config_show(
        capsys, "--config", str(path), "--data-dir", str(tmp_path), "--shards", "3", "--json"
    )

    settings = {item["name"]: item for item in json.loads(output)["settings"]}
    assert settings["data_dir"]["value"] == str(tmp_path)
    assert settings["data_dir"]["source"] == "command line"
    assert settings["shards"]["value"] == 3
    assert settings["shards"]["source"] == "command line"


def test_unknown_option_reported_with_the_subcommand_usage(capsys):
    from tiermem.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["config", "show", "--data-dri", "/tmp"])

    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tiermem config show ")
    assert "tiermem config show: error: unrecognized arguments: --data-dri /tmp" in err


def test_closed_standard_output_ends_quietly(clean_env, tmp_path):
    """`tiermem config show | head -1`: no traceback when the reader has gone."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "tiermem.cli", "config", "show"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            cwd=tmp_path,
        )
    finally:
        os.close(write_end)
    assert completed.stderr == b""
    assert completed.returncode == 141
