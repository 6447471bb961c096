"""Loading settings: defaults, the TOML file, the environment, the command line."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from tiermem.config import StackConfig, load_stack_config, write_stack_config
from tiermem.settings import (
    COMMAND_LINE,
    DEFAULT,
    ENVIRONMENT,
    FILE,
    OTHER_ENV,
    describe_settings,
    env_name,
    load_config,
    load_settings,
    setting_names,
)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tiermem.toml"
    path.write_text(text)
    return path


def source_of(loaded, name: str) -> tuple[str, str | None]:
    (setting,) = [item for item in loaded.settings if item.name == name]
    return setting.source, setting.origin


def test_defaults_without_file_or_env():
    loaded = load_settings(environ={})

    assert msgspec.to_builtins(loaded.config) == msgspec.to_builtins(StackConfig())
    assert {item.source for item in loaded.settings} == {DEFAULT}
    assert [item.name for item in loaded.settings] == setting_names()


def test_file_overrides_defaults(tmp_path):
    path = write_toml(
        tmp_path,
        'shards = 4\nlog_url = "redis://10.0.0.5:6390/0"\n'
        "[policy]\nstm_capacity = 32\n"
        "[router.ports]\nhigh = 7500\n",
    )

    loaded = load_settings(path, environ={})

    assert loaded.config.shards == 4
    assert loaded.config.log_url == "redis://10.0.0.5:6390/0"
    assert loaded.config.policy.stm_capacity == 32
    assert loaded.config.policy.im_capacity == StackConfig().policy.im_capacity
    assert loaded.config.router.ports == {
        "high": 7500,
        "normal": 7452,
        "low": 7453,
        "pub": 7454,
    }
    assert source_of(loaded, "policy.stm_capacity") == (FILE, str(path))
    assert source_of(loaded, "router.ports.high") == (FILE, str(path))
    assert source_of(loaded, "router.ports.normal") == (DEFAULT, None)


def test_environment_overrides_file(tmp_path):
    path = write_toml(tmp_path, "shards = 4\n[policy]\nstm_capacity = 32\n")

    loaded = load_settings(path, environ={"TIERMEM_SHARDS": "6"})

    assert loaded.config.shards == 6
    assert loaded.config.policy.stm_capacity == 32
    assert source_of(loaded, "shards") == (ENVIRONMENT, "TIERMEM_SHARDS")
    assert source_of(loaded, "policy.stm_capacity") == (FILE, str(path))


def test_command_line_overrides_environment(tmp_path):
    path = write_toml(tmp_path, 'data_dir = "/srv/file"\nshards = 4\n')

    loaded = load_settings(
        path,
        environ={"TIERMEM_SHARDS": "6", "TIERMEM_DATA_DIR": "/srv/env"},
        overrides={"shards": 8},
    )

    assert loaded.config.shards == 8
    assert loaded.config.data_dir == "/srv/env"
    assert source_of(loaded, "shards") == (COMMAND_LINE, None)
    assert source_of(loaded, "data_dir") == (ENVIRONMENT, "TIERMEM_DATA_DIR")


@pytest.mark.parametrize(
    ("variable", "text", "expected"),
    [
        ("TIERMEM_SHARDS", " 4 ", 4),
        ("TIERMEM_SHARDS", "1_000", 1000),
        ("TIERMEM_MAINTAIN_INTERVAL_S", "2.5", 2.5),
        ("TIERMEM_MAINTAIN_INTERVAL_S", "3", 3.0),
        ("TIERMEM_ALLOW_EVERYSEC", "true", True),
        ("TIERMEM_ALLOW_EVERYSEC", "Yes", True),
        ("TIERMEM_ALLOW_EVERYSEC", "1", True),
        ("TIERMEM_ALLOW_EVERYSEC", "off", False),
        ("TIERMEM_ALLOW_EVERYSEC", "FALSE", False),
        ("TIERMEM_LOG_URL", "redis://10.0.0.5:6390/0", "redis://10.0.0.5:6390/0"),
        ("TIERMEM_LOG_URL", "", None),
        ("TIERMEM_LOG_STREAM", "123", "123"),
        ("TIERMEM_ROUTER__METRICS_PORT", "9100", 9100),
        ("TIERMEM_ROUTER__METRICS_PORT", "", None),
        ("TIERMEM_SHARD_RESOURCES", "zone-a, zone-b", ["zone-a", "zone-b"]),
        ("TIERMEM_SHARD_RESOURCES", '["zone-a", "zone-b"]', ["zone-a", "zone-b"]),
    ],
)
def test_environment_text_parsed_to_field_type(variable, text, expected):
    environ = {variable: text}
    if variable == "TIERMEM_SHARD_RESOURCES":
        environ["TIERMEM_SHARDS"] = "2"
    name = variable.removeprefix("TIERMEM_").lower().replace("__", ".")

    loaded = load_settings(environ=environ)

    (setting,) = [item for item in loaded.settings if item.name == name]
    assert setting.value == expected
    assert type(setting.value) is type(expected)


def test_environment_sets_one_port(tmp_path):
    loaded = load_settings(environ={"TIERMEM_ROUTER__PORTS__HIGH": "7500"})

    assert loaded.config.router.ports == {
        "high": 7500,
        "normal": 7452,
        "low": 7453,
        "pub": 7454,
    }


def test_environment_sets_client_grants_as_json():
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    text = '{"' + key + '": {"name": "ops", "read": ["team-*"]}}'

    config = load_config(environ={"TIERMEM_ROUTER__AUTH__CLIENTS": text})

    grant = config.router.auth.clients[key]
    assert grant.name == "ops"
    assert grant.read == ["team-*"]
    assert grant.write == ["*"]


def test_toml_client_grants(tmp_path):
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    path = write_toml(
        tmp_path,
        f'[router.auth]\nserver_secret_file = "/etc/tiermem/server.key_secret"\n'
        f"[router.auth.clients.'{key}']\nname = \"ops\"\nwrite = []\n",
    )

    config = load_config(path, environ={})

    assert config.router.auth.server_secret_file == "/etc/tiermem/server.key_secret"
    assert config.router.auth.clients[key].write == []


def test_toml_integer_accepted_for_number(tmp_path):
    path = write_toml(tmp_path, "maintain_interval_s = 5\n")

    config = load_config(path, environ={})

    assert config.maintain_interval_s == 5.0
    assert isinstance(config.maintain_interval_s, float)


def test_empty_string_in_file_unsets_optional(tmp_path):
    path = write_toml(tmp_path, 'log_url = ""\n')

    config = load_config(path, environ={"TIERMEM_STM_URL": "redis://10.0.0.5:6391/0"})

    assert config.log_url is None
    assert config.stm_url == "redis://10.0.0.5:6391/0"


@pytest.mark.parametrize(
    ("name", "variable"),
    [
        ("shards", "TIERMEM_SHARDS"),
        ("log_url", "TIERMEM_LOG_URL"),
        ("policy.stm_capacity", "TIERMEM_POLICY__STM_CAPACITY"),
        ("router.ports.high", "TIERMEM_ROUTER__PORTS__HIGH"),
        ("router.limits.max_tags", "TIERMEM_ROUTER__LIMITS__MAX_TAGS"),
        ("router.auth.server_secret_file", "TIERMEM_ROUTER__AUTH__SERVER_SECRET_FILE"),
    ],
)
def test_env_name(name, variable):
    assert env_name(name) == variable


def env_text(value) -> str:
    """Write a value as its variable takes it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def test_every_setting_has_a_variable():
    for info in describe_settings():
        loaded = load_settings(environ={info.env: env_text(info.default)})

        (setting,) = [item for item in loaded.settings if item.name == info.name]
        assert (setting.source, setting.origin) == (ENVIRONMENT, info.env)
        assert setting.value == info.default


def test_other_variables_are_not_settings():
    environ = {variable: "1" for variable in OTHER_ENV}
    environ["OTHER_PROGRAM_SETTING"] = "x"

    loaded = load_settings(environ=environ)

    assert {item.source for item in loaded.settings} == {DEFAULT}


def test_loaded_config_survives_stack_json(tmp_path):
    path = write_toml(
        tmp_path, "shards = 3\n[policy]\nstm_capacity = 8\n[router.ports]\nhigh = 0\n"
    )
    config = load_config(path, environ={"TIERMEM_LOG_URL": "redis://127.0.0.1:6390/0"})

    write_stack_config(config, tmp_path / "stack.json")
    reloaded = load_stack_config(tmp_path / "stack.json")

    assert msgspec.to_builtins(reloaded) == msgspec.to_builtins(config)
