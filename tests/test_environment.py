"""The installed environment is exactly the committed lock (``requirements.lock``, from ``scripts/lock.py``)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lock_module():
    spec = importlib.util.spec_from_file_location("prunelab_lock", ROOT / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_environment_matches_lock():
    lock = _lock_module()
    diff = lock.differences(lock.read_lock(), lock.installed())
    assert not diff, (
        "the environment differs from requirements.lock (re-run `bash scripts/setup.sh`, or after a dependency "
        "change `python scripts/lock.py` and commit the lock):\n" + "\n".join(diff)
    )


def test_differences_names_each_kind():
    lock = _lock_module()
    diff = lock.differences({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "2.1", "d": "4"})
    assert diff == ["b: locked 2, installed 2.1", "c: locked 3, not installed", "d: installed 4, not in the lock"]


def test_lock_lines_are_pins(tmp_path):
    lock = _lock_module()
    path = tmp_path / "x.lock"
    path.write_text("# comment\nFoo_Bar==1.0\n\nbaz==2.0+cpu  # trailing\n")
    assert lock.read_lock(path) == {"foo-bar": "1.0", "baz": "2.0+cpu"}
    path.write_text("foo>=1\n")
    with pytest.raises(ValueError, match=r"x\.lock:1: expected name==version"):
        lock.read_lock(path)
