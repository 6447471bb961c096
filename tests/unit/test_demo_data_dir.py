"""The demo's data directory: it clears only a directory an earlier demo made."""

from __future__ import annotations

import fcntl

import pytest

from tiermem.demo import DEMO_MARKER, _prepare_dir


def test_new_directory_created_with_marker(tmp_path):
    data_dir = tmp_path / "demo"

    _prepare_dir(data_dir)

    assert sorted(path.name for path in data_dir.iterdir()) == [DEMO_MARKER]


def test_earlier_demo_directory_cleared(tmp_path):
    data_dir = tmp_path / "demo"
    _prepare_dir(data_dir)
    (data_dir / "stack.json").write_text("{}")
    (data_dir / "redis-log").mkdir()

    _prepare_dir(data_dir)

    assert sorted(path.name for path in data_dir.iterdir()) == [DEMO_MARKER]


def test_stack_directory_kept(tmp_path):
    """A directory of `tiermem up` has stack.json but no demo marker: it must survive."""
    data_dir = tmp_path / "memories"
    data_dir.mkdir()
    (data_dir / "stack.json").write_text("{}")

    with pytest.raises(SystemExit, match="is not an earlier demo's directory"):
        _prepare_dir(data_dir)

    assert (data_dir / "stack.json").exists()


def test_locked_demo_directory_kept(tmp_path):
    data_dir = tmp_path / "demo"
    _prepare_dir(data_dir)
    (data_dir / "stack.json").write_text("{}")
    with open(data_dir / "stack.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

        with pytest.raises(SystemExit, match="its stack.lock is held"):
            _prepare_dir(data_dir)

    assert (data_dir / "stack.json").exists()


def test_file_as_data_dir_rejected(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a directory")

    with pytest.raises(SystemExit, match="is not a directory"):
        _prepare_dir(path)
