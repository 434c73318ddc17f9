"""Architecture: imports point one way (the import-linter contracts in pyproject.toml) and modules meet only
through public names."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("embviz", "pages")
SOURCES = sorted([*(ROOT / "embviz").rglob("*.py"), *(ROOT / "pages").glob("*.py"), ROOT / "app.py"])


def _lint_imports() -> Path:
    script = Path(sys.executable).with_name("lint-imports")
    if not script.exists():
        pytest.fail(f"{script} is missing: install the test extra (pip install -e '.[test]')")
    return script


def test_the_import_contracts_are_kept() -> None:
    result = subprocess.run(
        [str(_lint_imports()), "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in the layers contract, or nothing checks what it imports."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    [layers] = [c["layers"] for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    placed = {name.strip() for layer in layers for name in re.split(r"[|:]", layer)}
    modules = {
        f"embviz.{path.stem if path.suffix else path.name}"
        for path in (ROOT / "embviz").iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").is_file()
    }
    assert modules - placed == set()
    assert placed - modules == set(), "the contract names a module that does not exist"


def _private_imports(path: Path) -> list[str]:
    """``from embviz.x import _name`` (or a relative import of one) in the file at ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        internal = node.level > 0 or (node.module or "").split(".")[0] in PACKAGES
        for alias in node.names if internal else []:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(f"{path.name}:{node.lineno} imports {alias.name} from {node.module}")
    return found


def test_the_checker_finds_private_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from embviz.backbones import _hidden, Backbone\nfrom .cache import _lock\n"
        "from embviz import __version__\nfrom os import _exit\n"
    )
    assert _private_imports(sample) == [
        "sample.py:1 imports _hidden from embviz.backbones",
        "sample.py:2 imports _lock from cache",
    ]


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_module_imports_a_private_name(path: Path) -> None:
    """ruff's PLC2701 checks ``pages/``; within the ``embviz`` package it lets private imports pass."""
    assert _private_imports(path) == []
