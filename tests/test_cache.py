from __future__ import annotations

from pathlib import Path

import pytest

from embviz.cache import (
    atomic_directory,
    atomic_write_bytes,
    cache_dir,
    config_key,
    embviz_home,
    resolve_inside,
)
from embviz.errors import EmbvizError


def test_home_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "h"))
    assert embviz_home() == tmp_path / "h"
    assert cache_dir("a", "b").is_dir()


def test_config_key_ignores_key_order_and_sees_values() -> None:
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"hello")
    atomic_write_bytes(target, b"world")
    assert target.read_bytes() == b"world"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_atomic_directory_is_all_or_nothing(tmp_path: Path) -> None:
    final = tmp_path / "folder"
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("crash mid-write")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(final) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (final / "done.txt").read_text() == "ok"


def test_unusable_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("EMBVIZ_HOME", str(blocker))
    with pytest.raises(EmbvizError, match="not usable"):
        cache_dir("artifacts")


def test_paths_cannot_escape(tmp_path: Path) -> None:
    assert resolve_inside(tmp_path, "a/b.json") == (tmp_path / "a" / "b.json").resolve()
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(EmbvizError, match="escapes"):
            resolve_inside(tmp_path, bad)
