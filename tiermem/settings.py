"""Settings of a stack from one TOML file and `TIERMEM_*` environment variables.

Precedence, lowest first: the defaults in the Struct definitions
(`tiermem.config.StackConfig` and the settings it contains), the TOML file,
the environment, and command-line options. Each value is checked against
its field's type and allowed values before `msgspec.convert` builds the
`StackConfig`, and every problem found is reported at once, each with the
setting's full name, the value and what is allowed.

A variable names a setting by its dotted name in upper case, with `__`
between the parts: `policy.stm_capacity` is
`TIERMEM_POLICY__STM_CAPACITY`, `router.ports.high` is
`TIERMEM_ROUTER__PORTS__HIGH`. `docs/configuration.md` lists every setting;
its table is the output of `python -m tiermem.settings`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tomllib
import types
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import msgspec

from events.errors import TiermemError
from tiermem.config import StackConfig
from tiers.base import TIER_NAMES
from tiers.redis_tier import CLUSTER_SCHEMES, is_cluster_url, parse_cluster_url

__all__ = [
    "COMMAND_LINE",
    "DEFAULT",
    "ENVIRONMENT",
    "ENV_PREFIX",
    "FILE",
    "OTHER_ENV",
    "TABLE_END",
    "TABLE_START",
    "LoadedSettings",
    "Setting",
    "SettingInfo",
    "SettingsError",
    "describe_settings",
    "env_name",
    "load_config",
    "load_settings",
    "mask_secrets",
    "masked",
    "replace_table",
    "setting_names",
    "settings_table",
    "unused_descriptions",
]

ENV_PREFIX = "TIERMEM_"
ENV_SEPARATOR = "__"

# Variables with the prefix that are not settings, because other parts of
# tiermem read them. Any other TIERMEM_ variable must name a setting.
# Variables that belong to tiermem's processes and tests, not to settings.
OTHER_ENV = (
    "TIERMEM_CONFIG",
    "TIERMEM_LOG_JSON",
    "TIERMEM_LOG_LEVEL",
    "TIERMEM_WORKER_METRICS_HOST",
    "TIERMEM_WORKER_METRICS_PORT",
    "TIERMEM_FUZZ_CASES",
    "TIERMEM_FUZZ_SEED",
    "TIERMEM_CONSOLE_SCREENSHOT",
)

DEFAULT = "default"
FILE = "file"
ENVIRONMENT = "environment"
COMMAND_LINE = "command line"

TABLE_START = "<!-- settings-table:start -->"
TABLE_END = "<!-- settings-table:end -->"

MASK = "***"


class SettingsError(TiermemError):
    """The settings could not be loaded; `problems` lists each invalid value."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = [mask_secrets(problem) for problem in problems]
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            lines = "".join(f"\n  - {problem}" for problem in self.problems)
            text = f"{len(self.problems)} settings are invalid:{lines}"
        super().__init__(text)


class Setting(msgspec.Struct, frozen=True, kw_only=True):
    """The effective value of one setting and where it came from.

    `source` is DEFAULT, FILE, ENVIRONMENT or COMMAND_LINE, and `origin`
    is the file's path or the variable's name (None for the other two).
    """

    name: str
    value: Any
    source: str
    origin: str | None = None


class LoadedSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A checked `StackConfig` and the value and source of each of its settings."""

    config: StackConfig
    settings: list[Setting]


# ----------------------------------------------------------------- secrets

# The password in `scheme://user:password@host`, and a `password=` query
# parameter, as Redis URLs can carry them.
_URL_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@]*:)(?P<secret>[^\s@/?#]+)(?=@)"
)
_QUERY_PASSWORD = re.compile(
    r"(?P<head>[?&]password=)(?P<secret>[^\s&#]+)", re.IGNORECASE
)


def mask_secrets(text: str) -> str:
    """Replace the passwords of URLs in `text` with `***`."""
    text = _URL_PASSWORD.sub(lambda match: match["head"] + MASK, text)
    return _QUERY_PASSWORD.sub(lambda match: match["head"] + MASK, text)


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {key: _mask_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_mask_value(item) for item in value]
    return value


# ----------------------------------------------------------------- rules


class _Rule:
    """A constraint on a setting beyond its type; `allowed` is how the docs state it."""

    allowed = "any"

    def expected(self, type_phrase: str) -> str:
        return type_phrase

    def accepts(self, value: Any) -> bool:
        return True


class _Range(_Rule):
    def __init__(
        self,
        *,
        ge: float | None = None,
        gt: float | None = None,
        le: float | None = None,
    ) -> None:
        self.ge, self.gt, self.le = ge, gt, le
        if ge is not None and le is not None:
            self.allowed = f"{ge} to {le}"
        elif ge is not None:
            self.allowed = f">= {ge}"
        else:
            self.allowed = f"> {gt}"

    def expected(self, type_phrase: str) -> str:
        if self.ge is not None and self.le is not None:
            return f"{type_phrase} from {self.ge} to {self.le}"
        return f"{type_phrase} {self.allowed}"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.ge is not None and value < self.ge:
            return False
        if self.gt is not None and value <= self.gt:
            return False
        return self.le is None or value <= self.le


class _NonEmpty(_Rule):
    allowed = "not empty"

    def expected(self, type_phrase: str) -> str:
        return "a non-empty string"

    def accepts(self, value: Any) -> bool:
        return bool(value.strip())


class _Url(_Rule):
    """A URL; with `schemes`, one of those schemes."""

    def __init__(self, schemes: tuple[str, ...] | None, what: str) -> None:
        self.schemes = schemes
        self.what = what
        if schemes is None:
            self.allowed = "a URL (SCHEME://...)"
        else:
            self.allowed = " or ".join(f"{scheme}://" for scheme in schemes) + " URL"

    def expected(self, type_phrase: str) -> str:
        if self.schemes is None:
            return f"{self.what} (SCHEME://...)"
        return f"{self.what} ({', '.join(f'{scheme}://' for scheme in self.schemes)})"

    def accepts(self, value: Any) -> bool:
        scheme, separator, rest = value.partition("://")
        if not separator or not rest:
            return False
        return self.schemes is None or scheme.lower() in self.schemes


_Z85_ALPHABET = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)


class _Names(_Rule):
    allowed = "names not empty"

    def expected(self, type_phrase: str) -> str:
        return "an array of non-empty names"

    def accepts(self, value: Any) -> bool:
        return all(item.strip() for item in value)


class _ClientKeys(_Rule):
    allowed = "keys are 40-character Z85 public keys"

    def expected(self, type_phrase: str) -> str:
        return "a table of client grants keyed by 40-character Z85 public keys (from `tiermem keygen`)"

    def accepts(self, value: Any) -> bool:
        return all(len(key) == 40 and set(key) <= _Z85_ALPHABET for key in value)


_AT_LEAST_1 = _Range(ge=1)
_POSITIVE = _Range(gt=0)
_REDIS_URL = _Url(("redis", "rediss", "unix"), "a Redis URL")


class _TierRedisUrl(_Url):
    """A Redis URL, or a Redis Cluster URL whose node list parses."""

    def __init__(self) -> None:
        super().__init__(
            ("redis", "rediss", "unix", *CLUSTER_SCHEMES), "a Redis or Redis Cluster URL"
        )

    def accepts(self, value: Any) -> bool:
        if not super().accepts(value):
            return False
        if not is_cluster_url(value):
            return True
        try:
            parse_cluster_url(value)
        except ValueError:
            return False
        return True


_TIER_REDIS_URL = _TierRedisUrl()

# Rules by setting name; `section.*` covers every setting of a section that
# has no rule of its own. Policy's own check requires >= 1 of every field.
_RULES: dict[str, _Rule] = {
    "data_dir": _NonEmpty(),
    "shards": _AT_LEAST_1,
    "router.host": _NonEmpty(),
    "router.ports.*": _Range(ge=0, le=65535),
    "router.limits.*": _AT_LEAST_1,
    "router.max_batch": _AT_LEAST_1,
    "router.low_lane_batch": _AT_LEAST_1,
    "router.low_lane_share": _AT_LEAST_1,
    "router.max_inflight_batches": _AT_LEAST_1,
    "router.client_window": _AT_LEAST_1,
    # ZeroMQ treats a high-water mark of 0 as no limit, and every queue
    # must be bounded.
    "router.receive_hwm": _AT_LEAST_1,
    "router.pub_hwm": _AT_LEAST_1,
    # ZeroMQ treats a heartbeat interval of 0 as heartbeats off.
    "router.heartbeat_ms": _Range(ge=0),
    "router.busy_retry_ms": _AT_LEAST_1,
    "router.auth.server_secret_file": _NonEmpty(),
    "router.auth.clients": _ClientKeys(),
    "router.search_threads": _AT_LEAST_1,
    "router.max_pending_searches": _AT_LEAST_1,
    "router.metrics_host": _NonEmpty(),
    "router.metrics_port": _Range(ge=0, le=65535),
    "policy.*": _AT_LEAST_1,
    **{f"pools.{tier}.min_workers": _Range(ge=0) for tier in TIER_NAMES},
    **{f"pools.{tier}.max_workers": _AT_LEAST_1 for tier in TIER_NAMES},
    **{f"pools.{tier}.queue_size": _AT_LEAST_1 for tier in TIER_NAMES},
    "pools.idle_timeout_s": _POSITIVE,
    "ray_address": _NonEmpty(),
    "shard_resources": _Names(),
    "log_url": _REDIS_URL,
    "stm_url": _TIER_REDIS_URL,
    "im_url": _TIER_REDIS_URL,
    "log_stream": _NonEmpty(),
    "broker_url": _Url(None, "a URL of the Celery broker"),
    "maintain_interval_s": _POSITIVE,
    "projection_interval_s": _POSITIVE,
    "snapshot_interval_s": _POSITIVE,
    "erase_interval_s": _POSITIVE,
    "erase_aof_interval_s": _POSITIVE,
    "ids_retention_s": _Range(ge=0),
    "ids_trim_interval_s": _POSITIVE,
    "celery_concurrency": _AT_LEAST_1,
    "broker_visibility_timeout_s": _AT_LEAST_1,
}

_LANE_DESCRIPTION = (
    "TCP port of the {lane} lane's ROUTER socket; 0 picks a free port at start."
)
_BYTES_DESCRIPTION = "Maximum length of {what}, in UTF-8 bytes."

# One line per setting, for `docs/configuration.md`.
_DESCRIPTIONS: dict[str, str] = {
    "data_dir": "Directory of the embedded stack's Redis data, LTM files, projection database, snapshots, logs and `endpoints.json`.",
    "shards": "Number of shard actors; a namespace's shard is `xxh64(namespace) % shards`. A change makes every shard rebuild from the log.",
    "router.host": "Address the router binds its lanes and its PUB socket to.",
    "router.ports.high": _LANE_DESCRIPTION.format(lane="high"),
    "router.ports.normal": _LANE_DESCRIPTION.format(lane="normal"),
    "router.ports.low": _LANE_DESCRIPTION.format(lane="low"),
    "router.ports.pub": "TCP port of the PUB socket of committed events; 0 picks a free port at start.",
    "router.limits.max_frame_bytes": "Maximum size of one request frame, in bytes.",
    "router.limits.max_value_bytes": "Maximum size of a `Store` value, measured as its MessagePack encoding, in bytes.",
    "router.limits.max_key_bytes": _BYTES_DESCRIPTION.format(what="a key"),
    "router.limits.max_namespace_bytes": _BYTES_DESCRIPTION.format(what="a namespace"),
    "router.limits.max_id_bytes": _BYTES_DESCRIPTION.format(what="an event id"),
    "router.limits.max_tags": "Maximum number of tags on one `Store`.",
    "router.limits.max_tag_bytes": _BYTES_DESCRIPTION.format(what="a tag"),
    "router.limits.max_depth": "Maximum nesting depth of lists and maps inside a value.",
    "router.max_batch": "Maximum number of messages the router takes from the lanes per loop; each loop appends to the log once.",
    "router.low_lane_batch": "Maximum number of low-lane messages per loop, so a high-lane request waits behind at most this many.",
    "router.low_lane_share": "Minimum number of low-lane messages per loop even when the lanes above fill the batch, so the low lane cannot starve.",
    "router.max_inflight_batches": "Number of unfinished shard calls above which normal- and low-lane requests get `Busy`; the high lane is still served.",
    "router.client_window": "Number of requests one client is expected to keep in flight; the lanes' send high-water mark is four times this.",
    "router.receive_hwm": "Receive high-water mark of each lane socket, in messages.",
    "router.pub_hwm": "Send high-water mark of the PUB socket, in messages per subscriber; a slower subscriber misses events and reads them back by seq.",
    "router.heartbeat_ms": "ZeroMQ heartbeat interval of the lane sockets, in ms; a peer that sends nothing for three intervals is disconnected. 0 turns heartbeats off.",
    "router.busy_retry_ms": "Retry hint sent with a `Busy` reply, in ms.",
    "router.auth.server_secret_file": "Path of the router's CurveZMQ secret key file (`NAME.key_secret` from `tiermem keygen`). When set, every socket requires CURVE and admits only the keys in `router.auth.clients`.",
    "router.auth.clients": 'Admitted client public keys, each with a grant `{name, read, write}`: the namespace patterns the client may read and write (default `["*"]`).',
    "router.search_threads": "Number of threads that serve `Search` requests from the search projection.",
    "router.max_pending_searches": "Number of waiting searches above which a new `Search` gets `Busy`.",
    "router.metrics_host": "Address of the router's Prometheus metrics endpoint.",
    "router.metrics_port": "TCP port of the Prometheus metrics endpoint; 0 picks a free port. Unset: no endpoint.",
    "policy.cache_capacity": "Records in the cache, per shard.",
    "policy.stm_capacity": "Records per namespace that STM keeps; maintenance moves the lowest-scored rest to IM.",
    "policy.stm_idle_ms": "Idle time after which maintenance moves an STM record to IM, in ms.",
    "policy.im_capacity": "Records per namespace that IM keeps; maintenance moves the lowest-scored rest to LTM.",
    "policy.im_idle_ms": "Idle time after which maintenance moves an IM record to LTM, in ms.",
    "policy.ltm_capacity": "Records per namespace that LTM keeps; maintenance evicts the lowest-scored rest.",
    "policy.half_life_ms": "Idle time that halves a record's importance in its retention score, in ms.",
    "policy.access_weight": "Retention score points per bit of a record's access count.",
    **{
        f"pools.{tier}.min_workers": f"Worker threads that each shard's {tier.upper()} pool keeps while idle."
        for tier in TIER_NAMES
    },
    **{
        f"pools.{tier}.max_workers": f"Maximum worker threads of each shard's {tier.upper()} pool. A shard submits at most one task to a pool at a time, so more than 1 stays unused."
        for tier in TIER_NAMES
    },
    **{
        f"pools.{tier}.queue_size": f"Maximum tasks waiting in each shard's {tier.upper()} pool. A submit to a full queue fails the commit, which the shard then finishes from its redo record."
        for tier in TIER_NAMES
    },
    "pools.idle_timeout_s": "Seconds a pool worker above `min_workers` waits for a task before it exits.",
    "ray_address": "Address of an existing Ray cluster (`HOST:PORT` of its head). Unset: the embedded stack starts a private Ray head.",
    "shard_resources": "Ray custom resources that place the shard actors: one name for every shard, or one name per shard. Each actor requires 0.001 of its resource, so it starts and restarts only on a node that offers it. Unset: Ray places the actors. The variable takes a JSON array or comma-separated names.",
    "log_url": "Redis URL of the event log. Unset: the embedded stack starts a Redis with `appendfsync always`.",
    "stm_url": "Redis URL of STM, or `redis+cluster://HOST:PORT[,HOST:PORT...]` for a Redis Cluster. Unset: the embedded stack starts one.",
    "im_url": "Redis URL of IM, or `redis+cluster://HOST:PORT[,HOST:PORT...]` for a Redis Cluster. Unset: the embedded stack starts one.",
    "allow_everysec": "Accept a log Redis with `appendfsync everysec`, which can lose up to one second of acknowledged events when its host crashes. The embedded log Redis then runs with `everysec`.",
    "log_stream": "Key of the Redis Stream that holds the log.",
    "broker_url": "URL of Celery's broker and result backend. Unset: the embedded stack starts a Redis for it.",
    "maintain_interval_s": "Seconds between the `Maintain` events that beat sends on the low lane.",
    "projection_interval_s": "Seconds between the beat runs that catch the projections up with the log.",
    "snapshot_interval_s": "Seconds between scheduled snapshots of each shard.",
    "erase_interval_s": "Seconds between erasure passes, which rewrite snapshots and views taken before a Forget and checkpoint SQLite files (see docs/semantics.md); a pass finds nothing to do in one Redis read when no Forget happened.",
    "erase_aof_interval_s": "Minimum seconds between the Redis AOF rewrites of scheduled erasure passes, which drop destroyed data keys and deleted values from the append-only files; `tiermem erase` rewrites at once.",
    "ids_retention_s": "Seconds for which the log's id index keeps an event id after its append. A retry with the same id within this time is answered as a duplicate. After it, the next trim removes the id (see `ids_trim_interval_s`), and a retry is logged as a new event. 0 keeps every id forever.",
    "ids_trim_interval_s": "Seconds between the beat runs that remove ids older than `ids_retention_s` from the log's id index.",
    "celery_concurrency": "Pool processes of the embedded Celery worker.",
    "broker_visibility_timeout_s": "Seconds after which the broker delivers an unacknowledged task again; must exceed the longest task.",
}


# ----------------------------------------------------------------- catalog


class _Leaf(msgspec.Struct, frozen=True):
    """One setting: its dotted name, its type and its default as builtins."""

    name: str
    path: tuple[str, ...]
    annotation: Any
    default: Any

    @property
    def optional(self) -> bool:
        return _is_optional(self.annotation)


class _Section(msgspec.Struct, frozen=True):
    """A table of settings: a Struct field, or a dict whose keys are fixed by its default."""

    name: str
    children: dict[str, Any]


def _is_optional(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(
        None
    ) in get_args(annotation)


def _base_type(annotation: Any) -> Any:
    if _is_optional(annotation):
        (base,) = [item for item in get_args(annotation) if item is not type(None)]
        return base
    return annotation


def _is_struct(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)


def _is_fixed_key_dict(annotation: Any, default: Any) -> bool:
    """Return whether a dict field is a section: scalar values, keys from a non-empty default.

    `router.ports` is one: a lane missing from it would break the router,
    so a file or variable sets single ports and the other lanes keep theirs.
    """
    if get_origin(annotation) is not dict or not default:
        return False
    return get_args(annotation)[1] in (int, float, str, bool)


def _section(
    cls: type[msgspec.Struct], defaults: msgspec.Struct, prefix: tuple[str, ...]
) -> _Section:
    children: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        path = (*prefix, field.name)
        default = getattr(defaults, field.name)
        if _is_struct(field.type):
            children[field.name] = _section(field.type, default, path)
        elif _is_fixed_key_dict(field.type, default):
            value_type = get_args(field.type)[1]
            children[field.name] = _Section(
                ".".join(path),
                {
                    key: _Leaf(".".join((*path, key)), (*path, key), value_type, value)
                    for key, value in default.items()
                },
            )
        else:
            children[field.name] = _Leaf(
                ".".join(path), path, field.type, msgspec.to_builtins(default)
            )
    return _Section(".".join(prefix), children)


@cache
def _catalog() -> _Section:
    return _section(StackConfig, StackConfig(), ())


def _leaves(section: _Section | None = None) -> Iterator[_Leaf]:
    for child in (section or _catalog()).children.values():
        if isinstance(child, _Section):
            yield from _leaves(child)
        else:
            yield child


def setting_names() -> list[str]:
    """Return the dotted name of every setting, in the order of the Struct fields."""
    return [leaf.name for leaf in _leaves()]


def env_name(name: str) -> str:
    """Return the environment variable of a setting: `policy.stm_capacity` -> `TIERMEM_POLICY__STM_CAPACITY`."""
    return ENV_PREFIX + ENV_SEPARATOR.join(part.upper() for part in name.split("."))


def _rule(name: str) -> _Rule | None:
    if name in _RULES:
        return _RULES[name]
    section, _, _ = name.rpartition(".")
    return _RULES.get(f"{section}.*") if section else None


def _type_phrase(annotation: Any) -> str:
    base = _base_type(annotation)
    if base is bool:
        return "true or false"
    if base is int:
        return "an integer"
    if base is float:
        return "a number"
    if base is str:
        return "a string"
    if get_origin(base) is list:
        return "an array"
    return "a table"


def _expected(leaf: _Leaf) -> str:
    phrase = _type_phrase(leaf.annotation)
    rule = _rule(leaf.name)
    return rule.expected(phrase) if rule is not None else phrase


def _render(value: Any) -> str:
    """Return a value as JSON, which writes scalars as TOML does, masked and cut to 80 characters."""
    try:
        text = json.dumps(_mask_value(msgspec.to_builtins(value)), ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _where(source: str, origin: str | None) -> str:
    if source == COMMAND_LINE:
        return " (from the command line)"
    return f" (from {origin})" if origin else ""


# ----------------------------------------------------------------- checking


class _Invalid(Exception):
    """One problem, already phrased for the operator."""


def _check_value(leaf: _Leaf, value: Any, source: str, origin: str | None) -> Any:
    """Return `value` converted to the setting's type, as builtins; raise `_Invalid` if not allowed."""
    if value == "" and leaf.optional:
        return None
    where = _where(source, origin)
    try:
        converted = msgspec.convert(value, leaf.annotation)
    except msgspec.ValidationError as error:
        inner = ""
        if isinstance(value, (dict, list)):
            # For a table or an array, msgspec's message names the part that is wrong.
            inner = "; " + str(error).replace("`$", f"`{leaf.name}")
        raise _Invalid(
            f"{leaf.name}: expected {_expected(leaf)}, got {_render(value)}{inner}{where}"
        ) from None
    rule = _rule(leaf.name)
    if converted is not None and rule is not None and not rule.accepts(converted):
        raise _Invalid(
            f"{leaf.name}: expected {_expected(leaf)}, got {_render(value)}{where}"
        )
    return msgspec.to_builtins(converted)


def _known(section: _Section) -> str:
    names = ", ".join(sorted(section.children))
    if section.name:
        return f"known settings in {section.name}: {names}"
    return f"known top-level settings and sections: {names}"


def _file_values(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Read the TOML file; return each setting it sets (raw), and the problems found."""
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError([f"configuration file {path} does not exist"]) from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(
            [f"configuration file {path} is not valid TOML: {error}"]
        ) from None
    except OSError as error:
        raise SettingsError(
            [f"configuration file {path} cannot be read: {error}"]
        ) from None
    values: dict[str, Any] = {}
    problems: list[str] = []
    _walk_table(document, _catalog(), str(path), values, problems)
    return values, problems


def _walk_table(
    table: dict[str, Any],
    section: _Section,
    origin: str,
    values: dict[str, Any],
    problems: list[str],
) -> None:
    for key, value in table.items():
        name = f"{section.name}.{key}" if section.name else key
        child = section.children.get(key)
        if child is None:
            problems.append(
                f"{name}: unknown setting (from {origin}); {_known(section)}"
            )
        elif isinstance(child, _Section):
            if isinstance(value, dict):
                _walk_table(value, child, origin, values, problems)
            else:
                problems.append(
                    f"{name}: expected a table of settings, got {_render(value)} (from {origin}); {_known(child)}"
                )
        else:
            values[child.name] = value


def _env_values(
    environ: Mapping[str, str],
) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Return, per setting, (variable, raw text) from the environment, and the problems found."""
    values: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable in OTHER_ENV:
            continue
        try:
            leaf = _resolve_variable(variable)
        except _Invalid as problem:
            problems.append(str(problem))
            continue
        values[leaf.name] = (variable, environ[variable])
    return values, problems


def _resolve_variable(variable: str) -> _Leaf:
    """Return the setting that a `TIERMEM_` variable names; raise `_Invalid` if it names none."""
    parts = variable[len(ENV_PREFIX) :].lower().split(ENV_SEPARATOR)
    node: _Leaf | _Section = _catalog()
    for depth, part in enumerate(parts):
        if isinstance(node, _Leaf):
            as_json = _type_phrase(node.annotation) in ("a table", "an array")
            raise _Invalid(
                f"{variable}: {node.name} is a single setting, not a section; "
                f"set it with {env_name(node.name)}{' as JSON' if as_json else ''}"
            )
        child = node.children.get(part)
        if child is None:
            name = ".".join(parts[: depth + 1])
            other = ""
            if depth == 0:
                other = f"; other variables tiermem reads: {', '.join(OTHER_ENV)}"
            raise _Invalid(f"{variable}: no setting {name}; {_known(node)}{other}")
        node = child
    if isinstance(node, _Section):
        first = env_name(next(_leaves(node)).name)
        raise _Invalid(
            f"{variable}: {node.name} is a section, not a setting; "
            f"set its settings one by one, such as {first}"
        )
    return node


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _parse_env(leaf: _Leaf, text: str) -> Any:
    """Parse a variable's text as the setting's type; text that does not parse is returned as is.

    `_check_value` then rejects the unparsed text with the usual message.
    """
    base = _base_type(leaf.annotation)
    stripped = text.strip()
    if not stripped and leaf.optional:
        return None
    try:
        if base is bool:
            lowered = stripped.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            return text
        if base is int:
            return int(stripped)
        if base is float:
            return float(stripped)
        if base is str:
            return text
        if (
            get_origin(base) is list
            and get_args(base) == (str,)
            and not stripped.startswith("[")
        ):
            return [item.strip() for item in stripped.split(",")]
        return msgspec.json.decode(text)
    except (ValueError, msgspec.DecodeError):
        return text


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def _check_together(values: dict[str, Any]) -> list[str]:
    """Check the settings that constrain each other."""
    problems = []
    seen: dict[int, str] = {}
    for leaf in _leaves(_catalog().children["router"].children["ports"]):
        port = values[leaf.name]
        socket_name = leaf.path[-1]
        if port and port in seen:
            problems.append(
                f"router.ports: {seen[port]} and {socket_name} both use port {port}; "
                "give each socket its own port, or 0 for a free one"
            )
        seen.setdefault(port, socket_name)
    for tier in TIER_NAMES:
        least, most = values[f"pools.{tier}.min_workers"], values[f"pools.{tier}.max_workers"]
        if least > most:
            problems.append(
                f"pools.{tier}: min_workers {least} exceeds max_workers {most}; "
                f"lower pools.{tier}.min_workers or raise pools.{tier}.max_workers"
            )
    retention, interval = values["ids_retention_s"], values["maintain_interval_s"]
    if 0 < retention < 2 * interval:
        # `tiermem doctor` finds beat's last two Maintain events by their ids.
        problems.append(
            f"ids_retention_s: {retention:g} is below twice maintain_interval_s ({interval:g}), "
            "so the id index would drop the ids by which `tiermem doctor` checks beat; "
            f"raise ids_retention_s to at least {2 * interval:g}, or set it to 0 to keep every id"
        )
    return problems


def load_settings(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedSettings:
    """Load the settings from the TOML file at `path` (if any), `environ` and `overrides`.

    `environ` defaults to `os.environ`. `overrides` maps setting names to
    values given on the command line. Raises `SettingsError` listing every
    invalid value, unknown key and unknown variable.
    """
    environ = os.environ if environ is None else environ
    leaves = {leaf.name: leaf for leaf in _leaves()}
    values = {name: leaf.default for name, leaf in leaves.items()}
    sources: dict[str, tuple[str, str | None]] = {
        name: (DEFAULT, None) for name in leaves
    }
    problems: list[str] = []

    layers: list[tuple[str, dict[str, tuple[str | None, Any]]]] = []
    if path is not None:
        file_values, file_problems = _file_values(Path(path))
        problems += file_problems
        layers.append(
            (FILE, {name: (str(path), value) for name, value in file_values.items()})
        )
    env_values, env_problems = _env_values(environ)
    problems += env_problems
    layers.append(
        (
            ENVIRONMENT,
            {
                name: (variable, _parse_env(leaves[name], text))
                for name, (variable, text) in env_values.items()
            },
        )
    )
    for name in overrides or {}:
        if name not in leaves:
            raise ValueError(
                f"override {name!r} is not a setting; known: {', '.join(leaves)}"
            )
    layers.append(
        (
            COMMAND_LINE,
            {name: (None, value) for name, value in (overrides or {}).items()},
        )
    )

    for source, layer in layers:
        for name, (origin, raw) in layer.items():
            try:
                values[name] = _check_value(leaves[name], raw, source, origin)
            except _Invalid as problem:
                problems.append(str(problem))
                continue
            sources[name] = (source, origin)
    if not problems:
        problems += _check_together(values)
    if problems:
        raise SettingsError(problems)

    data: dict[str, Any] = {}
    for name, leaf in leaves.items():
        _set_path(data, leaf.path, values[name])
    try:
        config = msgspec.convert(data, StackConfig)
    except msgspec.ValidationError as error:
        # A check of a Struct's own __post_init__ that the rules above lack.
        message, separator, location = str(error).rpartition(" - at `")
        name = (
            location.rstrip("`").removeprefix("$").removeprefix(".")
            if separator
            else ""
        )
        text = message if separator else str(error)
        raise SettingsError([f"{name}: {text}" if name else text]) from None
    settings = [
        Setting(
            name=name,
            value=values[name],
            source=sources[name][0],
            origin=sources[name][1],
        )
        for name in leaves
    ]
    return LoadedSettings(config=config, settings=settings)


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> StackConfig:
    """Return the `StackConfig` of `load_settings`."""
    return load_settings(path, environ=environ, overrides=overrides).config


def masked(settings: Sequence[Setting]) -> list[Setting]:
    """Return the settings with the passwords in their values replaced by `***`."""
    return [
        msgspec.structs.replace(item, value=_mask_value(item.value))
        for item in settings
    ]


# ----------------------------------------------------------------- docs


def _doc_type(annotation: Any) -> str:
    base = _base_type(annotation)
    words = {bool: "boolean", int: "integer", float: "number", str: "string"}
    text = words.get(base, "array" if get_origin(base) is list else "table")
    return f"{text} or unset" if _is_optional(annotation) else text


def _doc_default(value: Any) -> str:
    if value is None:
        return "unset"
    return f"`{json.dumps(value)}`"


class SettingInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The documentation of one setting: type, default, allowed values, variable, meaning."""

    name: str
    type: str
    default: Any
    allowed: str
    env: str
    description: str


def describe_settings() -> list[SettingInfo]:
    """Return the documentation of every setting, in the order of the Struct fields."""
    described = []
    for leaf in _leaves():
        rule = _rule(leaf.name)
        described.append(
            SettingInfo(
                name=leaf.name,
                type=_doc_type(leaf.annotation),
                default=leaf.default,
                allowed=rule.allowed if rule is not None else "any",
                env=env_name(leaf.name),
                description=_DESCRIPTIONS.get(leaf.name, ""),
            )
        )
    return described


def settings_table() -> str:
    """Return the Markdown table of every setting, as `docs/configuration.md` contains it."""
    lines = [
        "| setting | type | default | allowed | environment variable | description |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for info in describe_settings():
        lines.append(
            f"| `{info.name}` | {info.type} | {_doc_default(info.default)} | {info.allowed} | "
            f"`{info.env}` | {info.description} |"
        )
    return "\n".join(lines) + "\n"


def unused_descriptions() -> list[str]:
    """Return the described names that are no longer settings."""
    names = set(setting_names())
    return sorted(name for name in _DESCRIPTIONS if name not in names)


def replace_table(document: str) -> str:
    """Return `document` with the text between the table markers replaced by `settings_table()`."""
    head, start, rest = document.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        raise ValueError(
            f"the document lacks the markers {TABLE_START} and {TABLE_END}"
        )
    return f"{head}{TABLE_START}\n{settings_table()}{TABLE_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tiermem.settings",
        description="Print the Markdown table of every setting.",
    )
    parser.add_argument(
        "--write",
        metavar="FILE",
        help="replace the table between the markers in FILE instead of printing it",
    )
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(settings_table())
        return 0
    target = Path(args.write)
    target.write_text(
        replace_table(target.read_text(encoding="utf-8")), encoding="utf-8"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
