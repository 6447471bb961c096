"""Invalid settings: each message names the setting, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiermem.settings import OTHER_ENV

from tiermem.settings import SettingsError, describe_settings, load_settings

VALID_KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


def problems_of(
    path: Path | None = None, environ: dict[str, str] | None = None, **kwargs
) -> list[str]:
    with pytest.raises(SettingsError) as raised:
        load_settings(path, environ=environ or {}, **kwargs)
    return raised.value.problems


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tiermem.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("variable", "text", "message"),
    [
        (
            "TIERMEM_POLICY__STM_CAPACITY",
            "0",
            "policy.stm_capacity: expected an integer >= 1, got 0",
        ),
        ("TIERMEM_SHARDS", "two", 'shards: expected an integer >= 1, got "two"'),
        ("TIERMEM_SHARDS", "1.5", 'shards: expected an integer >= 1, got "1.5"'),
        (
            "TIERMEM_MAINTAIN_INTERVAL_S",
            "0",
            "maintain_interval_s: expected a number > 0, got 0.0",
        ),
        (
            "TIERMEM_SNAPSHOT_INTERVAL_S",
            "-1",
            "snapshot_interval_s: expected a number > 0, got -1.0",
        ),
        (
            "TIERMEM_PROJECTION_INTERVAL_S",
            "inf",
            "projection_interval_s: expected a number > 0, got Infinity",
        ),
        (
            "TIERMEM_ROUTER__PORTS__HIGH",
            "70000",
            "router.ports.high: expected an integer from 0 to 65535, got 70000",
        ),
        (
            "TIERMEM_ROUTER__HEARTBEAT_MS",
            "-5",
            "router.heartbeat_ms: expected an integer >= 0, got -5",
        ),
        (
            "TIERMEM_ROUTER__RECEIVE_HWM",
            "0",
            "router.receive_hwm: expected an integer >= 1, got 0",
        ),
        (
            "TIERMEM_ROUTER__LIMITS__MAX_TAGS",
            "0",
            "router.limits.max_tags: expected an integer >= 1, got 0",
        ),
        (
            "TIERMEM_ROUTER__METRICS_PORT",
            "-1",
            "router.metrics_port: expected an integer from 0 to 65535, got -1",
        ),
        (
            "TIERMEM_ALLOW_EVERYSEC",
            "maybe",
            'allow_everysec: expected true or false, got "maybe"',
        ),
        ("TIERMEM_DATA_DIR", " ", 'data_dir: expected a non-empty string, got " "'),
        (
            "TIERMEM_LOG_URL",
            "localhost:6379",
            'log_url: expected a Redis URL (redis://, rediss://, unix://), got "localhost:6379"',
        ),
        (
            "TIERMEM_STM_URL",
            "http://cache:80",
            'stm_url: expected a Redis or Redis Cluster URL (redis://, rediss://, unix://, '
            'redis+cluster://, rediss+cluster://), got "http://cache:80"',
        ),
        (
            "TIERMEM_BROKER_URL",
            "broker",
            'broker_url: expected a URL of the Celery broker (SCHEME://...), got "broker"',
        ),
        (
            "TIERMEM_SHARD_RESOURCES",
            "zone-a,",
            'shard_resources: expected an array of non-empty names, got ["zone-a", ""]',
        ),
    ],
)
def test_invalid_variable_message(variable, text, message):
    assert problems_of(environ={variable: text}) == [f"{message} (from {variable})"]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("shards = 0", "shards: expected an integer >= 1, got 0"),
        ("shards = 2.0", "shards: expected an integer >= 1, got 2.0"),
        ("shards = true", "shards: expected an integer >= 1, got true"),
        ('shards = "2"', 'shards: expected an integer >= 1, got "2"'),
        ("log_stream = 5", "log_stream: expected a non-empty string, got 5"),
        ('allow_everysec = "yes"', 'allow_everysec: expected true or false, got "yes"'),
        (
            "[router]\nmax_batch = -1",
            "router.max_batch: expected an integer >= 1, got -1",
        ),
        (
            '[router.auth.clients.short]\nname = "ops"',
            (
                "router.auth.clients: expected a table of client grants keyed by 40-character "
                'Z85 public keys (from `tiermem keygen`), got {"short": {"name": "ops"}}'
            ),
        ),
        (
            f"[router.auth.clients.'{VALID_KEY}']\nread = []",
            (
                "router.auth.clients: expected a table of client grants keyed by 40-character "
                f'Z85 public keys (from `tiermem keygen`), got {{"{VALID_KEY}": {{"read": []}}}}; '
                "Object missing required field `name` - at `router.auth.clients[...]`"
            ),
        ),
        ("policy = 5", "policy: expected a table of settings, got 5"),
    ],
)
def test_invalid_file_value_message(tmp_path, toml, message):
    path = write_toml(tmp_path, toml + "\n")

    (problem,) = problems_of(path)
    assert problem.startswith(message)
    assert problem.endswith(f"(from {path})") or f"(from {path});" in problem


def test_unknown_key_lists_known(tmp_path):
    path = write_toml(tmp_path, "[policy]\nstm_capacty = 3\n")

    (problem,) = problems_of(path)

    assert problem == (
        f"policy.stm_capacty: unknown setting (from {path}); known settings in policy: "
        "access_weight, cache_capacity, half_life_ms, im_capacity, im_idle_ms, ltm_capacity, "
        "stm_capacity, stm_idle_ms"
    )


def test_unknown_top_level_key(tmp_path):
    path = write_toml(tmp_path, "shard = 3\n")

    (problem,) = problems_of(path)

    assert problem.startswith(
        f"shard: unknown setting (from {path}); known top-level settings and sections: "
    )
    assert "shards" in problem
    assert "policy" in problem


def test_unknown_lane_port(tmp_path):
    path = write_toml(tmp_path, "[router.ports]\nhgh = 7500\n")

    (problem,) = problems_of(path)

    assert (
        problem
        == f"router.ports.hgh: unknown setting (from {path}); known settings in router.ports: high, low, normal, pub"
    )


def test_unknown_variable_lists_known():
    (problem,) = problems_of(environ={"TIERMEM_POLICY__STM_CAPACTY": "3"})

    assert problem.startswith(
        "TIERMEM_POLICY__STM_CAPACTY: no setting policy.stm_capacty; known settings in policy: "
    )
    assert "stm_capacity" in problem


def test_unknown_top_level_variable_names_other_variables():
    (problem,) = problems_of(environ={"TIERMEM_SHARD": "3"})

    assert problem.startswith(
        "TIERMEM_SHARD: no setting shard; known top-level settings and sections: "
    )
    assert problem.endswith("other variables tiermem reads: " + ", ".join(OTHER_ENV))
    assert "TIERMEM_LOG_LEVEL" in problem


def test_variable_naming_a_section():
    (problem,) = problems_of(environ={"TIERMEM_POLICY": "3"})

    assert problem == (
        "TIERMEM_POLICY: policy is a section, not a setting; set its settings one by one, "
        "such as TIERMEM_POLICY__CACHE_CAPACITY"
    )


def test_variable_below_a_setting():
    (problem,) = problems_of(environ={"TIERMEM_ROUTER__AUTH__CLIENTS__OPS": "x"})

    assert problem == (
        "TIERMEM_ROUTER__AUTH__CLIENTS__OPS: router.auth.clients is a single setting, not a section; "
        "set it with TIERMEM_ROUTER__AUTH__CLIENTS as JSON"
    )


def test_invalid_json_variable():
    (problem,) = problems_of(environ={"TIERMEM_ROUTER__AUTH__CLIENTS": "{not json"})

    assert problem.startswith("router.auth.clients: expected a table of client grants")
    assert problem.endswith('got "{not json" (from TIERMEM_ROUTER__AUTH__CLIENTS)')


def test_duplicate_ports_rejected():
    (problem,) = problems_of(environ={"TIERMEM_ROUTER__PORTS__LOW": "7451"})

    assert (
        problem
        == "router.ports: high and low both use port 7451; give each socket its own port, or 0 for a free one"
    )


def test_random_ports_may_repeat():
    environ = {
        f"TIERMEM_ROUTER__PORTS__{lane}": "0"
        for lane in ("HIGH", "NORMAL", "LOW", "PUB")
    }

    ports = load_settings(environ=environ).config.router.ports

    assert ports == {"high": 0, "normal": 0, "low": 0, "pub": 0}


def test_struct_check_reported_with_its_message():
    # shard_resources must have one name or one per shard; StackConfig checks that itself.
    (problem,) = problems_of(
        environ={"TIERMEM_SHARD_RESOURCES": "a,b,c", "TIERMEM_SHARDS": "2"}
    )

    assert (
        problem
        == "shard_resources has 3 names for 2 shards: give one name for every shard, or one name per shard"
    )


def test_every_problem_reported_at_once(tmp_path):
    path = write_toml(tmp_path, "shards = 0\n[policy]\nstm_capacity = 0\n")

    with pytest.raises(SettingsError) as raised:
        load_settings(path, environ={"TIERMEM_ROUTER__MAX_BATCH": "0"})

    assert len(raised.value.problems) == 3
    assert str(raised.value).startswith("3 settings are invalid:\n  - ")


def test_command_line_value_checked():
    (problem,) = problems_of(overrides={"shards": 0})

    assert problem == "shards: expected an integer >= 1, got 0 (from the command line)"


def test_unknown_override_is_a_programming_error():
    with pytest.raises(ValueError, match="override 'shard' is not a setting"):
        load_settings(environ={}, overrides={"shard": 2})


def test_missing_file(tmp_path):
    assert problems_of(tmp_path / "absent.toml") == [
        f"configuration file {tmp_path / 'absent.toml'} does not exist"
    ]


def test_invalid_toml(tmp_path):
    path = write_toml(tmp_path, "shards = \n")

    (problem,) = problems_of(path)

    assert problem.startswith(f"configuration file {path} is not valid TOML: ")
    assert "line 1" in problem


def test_invalid_password_url_is_masked():
    (problem,) = problems_of(
        environ={"TIERMEM_LOG_URL": "http://admin:hunter2@cache:80"}
    )

    assert "hunter2" not in problem
    assert "admin:***@cache" in problem


def value_below(allowed: str) -> float | None:
    """Return a value just outside a range rule (">= 1", "> 0", "0 to 65535"), or None for other rules."""
    words = allowed.split()
    if words[0] == ">=":
        return float(words[1]) - 1
    if words[0] == ">":
        return float(words[1])
    if len(words) == 3 and words[1] == "to":
        return float(words[0]) - 1
    return None


def test_every_range_rejects_value_below_it():
    # Generated from the rules, so a new numeric setting gets its message checked too.
    for info in describe_settings():
        below = value_below(info.allowed)
        if below is None:
            continue
        text = str(int(below)) if info.type.startswith("integer") else str(below)

        problems = problems_of(environ={info.env: text})

        assert len(problems) == 1, info.name
        assert problems[0].startswith(f"{info.name}: expected "), problems[0]
        assert problems[0].endswith(f" (from {info.env})"), problems[0]
