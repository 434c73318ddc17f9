"""Security: no code runs that was not asked for, and nothing leaves its folder.

Weights load only from safetensors; nothing from the cache or from users is unpickled; a model's own code
runs only with ``--trust-remote-code`` (the app never offers it); cache paths stay under ``EMBVIZ_HOME``;
the app's server listens on localhost only.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from embviz import cli, sources
from embviz.artifacts import artifact_path
from embviz.backbones import Backbone
from embviz.cache import cache_dir, embviz_home, resolve_inside
from embviz.compressors import SVDCompressor
from embviz.errors import BadInputError, EmbvizError
from embviz.metrics import file_safe_name, neighbour_table_cached

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "embviz").rglob("*.py"), *(ROOT / "pages").glob("*.py"), ROOT / "app.py"])
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


class _Evil:
    """Unpickling this creates ``marker``: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for an ``Attribute(Name('torch'), 'load')`` node; '' for anything else."""
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return node.id if isinstance(node, ast.Name) else ""


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Calls and imports in ``tree`` that can unpickle or evaluate data."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            found += [f"import {name}" for name in names if name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {kw.arg: kw.value for kw in node.keywords}
            if name in ("torch.load", "eval", "exec", "yaml.load", "yaml.unsafe_load"):
                found.append(name)
            elif name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy"):
                allow = keywords.get("allow_pickle")
                if not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"{name} without allow_pickle=False")
            elif name.endswith("from_pretrained") and "trust_remote_code" in keywords:
                value = keywords["trust_remote_code"]
                if isinstance(value, ast.Constant) and value.value is True:
                    found.append(f"{name}(trust_remote_code=True)")
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = "import pickle\nimport numpy as np\ntorch.load(f)\nnp.load(f)\nnp.load(f, allow_pickle=True)\neval(s)\n"
    assert len(_unsafe_calls(ast.parse(bad))) == 5
    assert _unsafe_calls(ast.parse("np.load(f, allow_pickle=False)\njson.load(f)\n")) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_source_file_unpickles_or_evaluates_data(path: Path) -> None:
    assert _unsafe_calls(ast.parse(path.read_text(encoding="utf-8"))) == []


def test_the_app_never_enables_remote_code() -> None:
    for path in [ROOT / "app.py", *(ROOT / "pages").glob("*.py")]:
        assert "trust_remote_code" not in path.read_text(encoding="utf-8"), path


# -- model weights -------------------------------------------------------------------------------------
def test_pickle_only_weights_are_refused_unread(tiny_causal_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled-model"
    shutil.copytree(tiny_causal_path, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(BadInputError, match=r"only in pickle files \(pytorch_model.bin\).*safetensors"):
        Backbone.from_pretrained(str(folder))
    assert not marker.exists()


def test_a_config_cannot_point_the_loader_at_a_pickle(tiny_causal_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "redirected"
    shutil.copytree(tiny_causal_path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(BadInputError, match="only safetensors"):
        Backbone.from_pretrained(str(folder))


def test_a_models_own_code_does_not_run_without_the_option(tiny_causal_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "custom-code"
    shutil.copytree(tiny_causal_path, folder)
    marker = tmp_path / "custom-code-ran"
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    try:
        backbone = Backbone.from_pretrained(str(folder))
    except EmbvizError:
        pass  # refusing is fine too; running the code is not
    else:
        assert type(backbone.model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


def test_trust_remote_code_is_off_by_default_and_warns_when_on(
    tiny_causal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="embviz.backbones"):
        Backbone.from_pretrained(str(tiny_causal_path))
        assert "trust_remote_code" not in caplog.text
        Backbone.from_pretrained(str(tiny_causal_path), trust_remote_code=True)
    assert "trust_remote_code is on" in caplog.text


MODEL_COMMANDS = {
    "info": ["info", "m"],
    "corpora": ["corpora", "--model", "m"],
    "compress": ["compress", "m"],
    "evaluate": ["evaluate", "m", "--artifact", "a"],
    "sweep": ["sweep", "m"],
    "predict": ["predict", "m", "a ___ b"],
    "export": ["export", "m", "--artifact", "a", "--out", "o"],
    "fit-mlm-head": ["fit-mlm-head", "m"],
}


ALWAYS_OFF = {"bench": ["bench"], "generate-text": ["generate-text"]}
"""Commands that load a model but never with remote code (packaged models only)."""
NO_MODEL = {"methods": ["methods"]}
"""Commands that load no model at all."""


def test_every_command_that_loads_a_model_has_the_option() -> None:
    known = set(MODEL_COMMANDS) | set(ALWAYS_OFF) | set(NO_MODEL)
    assert known >= set(cli._COMMANDS), "a new command: add it here (does it load a model?)"
    parser = cli.build_parser()
    for argv in MODEL_COMMANDS.values():
        assert parser.parse_args(argv).trust_remote_code is False
        assert parser.parse_args([*argv, "--trust-remote-code"]).trust_remote_code is True
    for argv in [*ALWAYS_OFF.values(), *NO_MODEL.values()]:
        assert getattr(parser.parse_args(argv), "trust_remote_code", False) is False


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_the_option_reaches_the_loader(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[bool] = []

    def load(name: str, *, trust_remote_code: bool = False) -> Backbone:
        seen.append(trust_remote_code)
        raise EmbvizError("stop here")

    monkeypatch.setattr(sources, "load_model", load)
    argv = MODEL_COMMANDS[command]
    assert cli.main(argv) == 2 and cli.main([*argv, "--trust-remote-code"]) == 2
    assert seen == [False, True]
    assert capsys.readouterr().err.count("stop here") == 2


# -- the cache -----------------------------------------------------------------------------------------
def test_a_pickled_cache_entry_is_never_unpickled() -> None:
    matrix = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    indices = neighbour_table_cached("m", "fp", matrix, 3).indices
    (path,) = cache_dir("neighbours").glob("*.npz")
    marker = embviz_home() / "unpickled"
    buffer = io.BytesIO()
    np.savez(buffer, indices=np.array([_Evil(marker)], dtype=object), scores=np.zeros(1))
    path.write_bytes(buffer.getvalue())
    again = neighbour_table_cached("m", "fp", matrix, 3).indices
    np.testing.assert_array_equal(again, indices)
    assert not marker.exists()


NAMES = ["../../etc", "/etc/passwd", "..", ".", "", "a/../../b", "org/model", "C:\\evil", "x\x00y", "~root"]


def _assert_inside(path: Path) -> None:
    home = embviz_home()
    assert resolve_inside(home, str(path.relative_to(home))) == path.resolve()


@pytest.mark.parametrize("name", NAMES)
def test_backbone_names_cannot_steer_cache_paths_out(name: str) -> None:
    _assert_inside(artifact_path(name, "0" * 64, SVDCompressor(2)))
    _assert_inside(cache_dir("neighbours") / f"{file_safe_name(name)}-k10.npz")


@given(st.text(max_size=80))
def test_any_backbone_name_stays_inside_the_cache(name: str) -> None:
    _assert_inside(artifact_path(name, "0" * 64, SVDCompressor(2)))
    assert "/" not in file_safe_name(name) and file_safe_name(name) not in ("", ".", "..")


@pytest.mark.parametrize("part", ["..", ".", "", "a/b", "../x", "x\\y", "x\x00"])
def test_cache_folders_are_plain_names(part: str) -> None:
    with pytest.raises(EmbvizError, match="escapes"):
        cache_dir("artifacts", part)


# -- the server ----------------------------------------------------------------------------------------
def test_the_app_server_listens_on_localhost_only() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    server = config.get("server", {})
    assert server.get("address") in ("localhost", "127.0.0.1")
    assert server.get("enableXsrfProtection", True) is True and server.get("enableCORS", True) is True
    assert config.get("browser", {}).get("gatherUsageStats") is False
