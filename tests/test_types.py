"""Types: `mypy` (configured in pyproject.toml, run by `make lint`) finds nothing in the core package.

A warm run takes seconds (mypy's cache, .mypy_cache, lives in the repository root); the first run on a
fresh checkout analyses torch and transformers and takes one to two minutes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
STRICTNESS = (
    "warn_unused_ignores",
    "warn_redundant_casts",
    "no_implicit_optional",
    "check_untyped_defs",
    "disallow_incomplete_defs",
)


def test_the_mypy_configuration_checks_the_core_package() -> None:
    """The checks stay on: switching them off would make the test below pass by silencing."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    assert config["files"] == ["embviz"]
    assert all(config.get(option) is True for option in STRICTNESS), config
    assert "ignore_missing_imports" not in config, "ignore missing imports per third-party module only"


def test_mypy_finds_nothing_in_the_core_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from mypy import api

    monkeypatch.chdir(ROOT)  # `files` and the cache are relative to the repository root
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml")])
    assert status == 0, stdout + stderr
    assert stdout.startswith("Success: no issues found"), stdout
