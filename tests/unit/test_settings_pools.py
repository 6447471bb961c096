"""The `pools` settings: loading, invalid values, and the route to the shard actors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiermem.config import StackConfig
from tiermem.router_process import shard_settings
from tiermem.settings import SettingsError, load_config
from tiers.pools import PoolSettings, TierPoolSettings


def problems_of(path: Path | None = None, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(SettingsError) as raised:
        load_config(path, environ=environ or {})
    return raised.value.problems


def test_pool_defaults():
    config = load_config(environ={})

    assert config.pools == TierPoolSettings()
    assert config.pools.ltm == PoolSettings(min_workers=0, max_workers=1, queue_size=8)


def test_pool_sizes_from_file_and_environment(tmp_path):
    path = tmp_path / "tiermem.toml"
    path.write_text("[pools]\nidle_timeout_s = 5\n[pools.ltm]\nmin_workers = 1\nmax_workers = 3\n")

    config = load_config(path, environ={"TIERMEM_POOLS__IM__QUEUE_SIZE": "32"})

    assert config.pools.ltm == PoolSettings(min_workers=1, max_workers=3, queue_size=8)
    assert config.pools.im.queue_size == 32
    assert config.pools.stm == PoolSettings()
    assert config.pools.idle_timeout_s == 5.0


@pytest.mark.parametrize(
    ("variable", "text", "message"),
    [
        ("TIERMEM_POOLS__STM__MIN_WORKERS", "-1", "pools.stm.min_workers: expected an integer >= 0, got -1"),
        ("TIERMEM_POOLS__IM__MAX_WORKERS", "0", "pools.im.max_workers: expected an integer >= 1, got 0"),
        ("TIERMEM_POOLS__LTM__QUEUE_SIZE", "0", "pools.ltm.queue_size: expected an integer >= 1, got 0"),
        ("TIERMEM_POOLS__IDLE_TIMEOUT_S", "0", "pools.idle_timeout_s: expected a number > 0, got 0.0"),
    ],
)
def test_invalid_pool_setting_named(variable, text, message):
    problems = problems_of(environ={variable: text})

    assert len(problems) == 1
    assert problems[0].startswith(message)
    assert problems[0].endswith(f"(from {variable})")


def test_pool_min_above_max_named():
    problems = problems_of(
        environ={"TIERMEM_POOLS__LTM__MIN_WORKERS": "4", "TIERMEM_POOLS__LTM__MAX_WORKERS": "2"}
    )

    assert problems == [
        "pools.ltm: min_workers 4 exceeds max_workers 2; "
        "lower pools.ltm.min_workers or raise pools.ltm.max_workers"
    ]


def two_shard_config(pools: TierPoolSettings) -> StackConfig:
    """A two-shard stack's settings with `pools`; nothing listens at its Redis URLs."""
    return StackConfig(
        shards=2,
        log_url="redis://127.0.0.1:1",
        stm_url="redis://127.0.0.1:2",
        im_url="redis://127.0.0.1:3",
        pools=pools,
    )


def test_pool_sizes_reach_shard_settings():
    sizes = TierPoolSettings(ltm=PoolSettings(min_workers=1, max_workers=2))
    config = two_shard_config(sizes)

    assert [item.pools for item in shard_settings(config)] == [sizes, sizes]


def test_pool_sizes_reach_replay_shards():
    """Rebuilds, verifications and views run their scratch shards with the stack's pools."""
    from replay.engine import target_from_config

    sizes = TierPoolSettings(im=PoolSettings(min_workers=1, max_workers=3))

    target = target_from_config(two_shard_config(sizes))

    assert [target.shard_settings(shard).pools for shard in range(2)] == [sizes, sizes]
