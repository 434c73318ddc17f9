from __future__ import annotations

import json
from pathlib import Path

import pytest

from embviz.artifacts import load_artifact
from embviz.backbones import Backbone
from embviz.cli import main
from embviz.compressors import low_rank_params, ratio_for_rank

KEYS = {"artifact", "method", "rank", "ratio", "params", "bytes", "train_seconds", "mean_cosine"}
KEYS |= {"relative_error", "cached"}


def _compress(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["compress", *args, "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1
    return json.loads(captured.out)


def test_compress_svd_json_then_cached(tiny_causal_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _compress(capsys, str(tiny_causal_path), "--method", "svd", "--rank", "8")
    assert set(first) >= KEYS
    assert (first["method"], first["rank"], first["cached"]) == ("svd", 8, False)
    assert 0 < first["relative_error"] < 1 and 0 < first["mean_cosine"] <= 1
    assert load_artifact(Path(first["artifact"])).rank == 8
    second = _compress(capsys, str(tiny_causal_path), "--method", "svd", "--rank", "8")
    assert second["cached"] is True and second["artifact"] == first["artifact"]


def test_compress_ae_by_ratio(
    tiny_masked_path: Path, tiny_masked: Backbone, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _compress(capsys, str(tiny_masked_path), "--method", "ae", "--ratio", "4", "--loss", "cosine")
    vocab, rank = tiny_masked.vocab_size, result["rank"]
    assert result["method"] == "ae-cosine" and result["ratio"] >= 4
    assert result["params"] == low_rank_params(vocab, 32, rank, decoder_bias=True)
    assert ratio_for_rank(vocab, 32, rank + 1, decoder_bias=True) < 4


def test_compress_ae_progress_goes_to_stderr(
    tiny_causal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compress", str(tiny_causal_path), "--rank", "4", "--epochs", "2", "--recipe", "paper"]) == 0
    captured = capsys.readouterr()
    assert "epoch 2/2" in captured.err and "\r" in captured.err
    assert "mean_cosine" in captured.out


def test_compress_every_method_family(tiny_causal_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weighted = _compress(capsys, str(tiny_causal_path), "--method", "svd-freq", "--rank", "6")
    assert weighted["method"] == "svd-freq" and weighted["rank"] == 6
    mixed = _compress(capsys, str(tiny_causal_path), "--method", "quant-mixed", "--ratio", "6")
    assert mixed["method"] == "quant-mixed" and mixed["rank"] is None and mixed["byte_ratio"] >= 6
    int8 = _compress(capsys, str(tiny_causal_path), "--method", "svd-int8", "--rank", "6")
    assert int8["bytes"] < weighted["bytes"] and load_artifact(Path(int8["artifact"])).qcodes is not None


def test_compress_weights_source_keys_the_artifact(
    tiny_causal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from embviz.cli import _WEIGHT_SOURCES
    from embviz.frequency import WEIGHT_SOURCES

    assert _WEIGHT_SOURCES == WEIGHT_SOURCES
    runs = {
        source: _compress(
            capsys, str(tiny_causal_path), "--method", "svd-freq", "--rank", "6", "--weights", source
        )
        for source in WEIGHT_SOURCES
    }
    default = _compress(capsys, str(tiny_causal_path), "--method", "svd-freq", "--rank", "6")
    assert len({run["artifact"] for run in runs.values()}) == len(WEIGHT_SOURCES)
    assert default["artifact"] == runs["general"]["artifact"] and default["cached"] is True
    sources = {
        source: load_artifact(Path(run["artifact"])).config["row_weights"]["source"]
        for source, run in runs.items()
    }
    assert "wordfreq" in sources["wordfreq"] and "train slices" in sources["corpora"]
    assert "wordfreq" in sources["general"] and "model-generated text" in sources["general"]


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "quant-int8", "--rank", "4"],
        ["--method", "quant-mixed"],
        ["--method", "quant-mixed", "--ratio", "100"],
        ["--method", "ae-paper-freq", "--loss", "mse"],
        ["--rank", "0"],
        ["--rank", "32"],
        ["--rank", "-3"],
        ["--ratio", "1"],
        ["--ratio", "0.5"],
        ["--method", "svd", "--loss", "paper"],
        ["--method", "svd-randomized", "--epochs", "3"],
        ["--epochs", "0"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    tiny_causal_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    assert main(["compress", str(tiny_causal_path), *args, "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("embviz: error:")
