from __future__ import annotations

import json
from pathlib import Path

import pytest

from embviz.cli import main


def test_info_json_on_a_local_folder(tiny_causal_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tiny_causal_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "causal" and info["hidden_size"] == 32 and info["tied"] is True
    assert info["embedding_params"] == info["vocab_size"] * 32


def test_unknown_model_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "no/such/model"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("embviz: error:")
    assert "Traceback" not in captured.err


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["info"])
    assert exit_info.value.code == 2
