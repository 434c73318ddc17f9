from __future__ import annotations

import math
from pathlib import Path

import pytest

from embviz.artifacts import ArtifactError, compress_cached
from embviz.backbones import Backbone
from embviz.compressors import (
    AECompressor,
    CompressedEmbedding,
    SVDCompressor,
    make_compressor,
    rank_for_ratio,
)
from embviz.errors import BadInputError
from embviz.evaluation import (
    SWEEP_COLUMNS,
    UNCOMPRESSED,
    evaluate_variant,
    load_variant,
    sweep,
    variant_key,
    variant_name,
)
from embviz.testing import SENTENCES

MAX_TOKENS = 256
KEYS = {
    "perplexity",
    "recall_at_k",
    "mean_angle_deg",
    "median_angle_deg",
    "mean_norm_ratio",
    "mean_cosine",
    "relative_error",
    "rank",
    "ratio",
    "params",
    "bytes",
    "method",
    "label",
    "seconds",
    "protocol",
}


@pytest.fixture
def text_file(tmp_path: Path) -> str:
    """A few hundred words of held-out lines, each long enough for the masked protocol's 20-token rule."""
    lines = [" ".join(SENTENCES[i : i + 3]) for i in range(len(SENTENCES) - 2)]
    path = tmp_path / "held-out.txt"
    path.write_text("\n".join(lines * 2), encoding="utf-8")
    return str(path)


def _svd(backbone: Backbone, rank: int = 8) -> CompressedEmbedding:
    return compress_cached(backbone.name, backbone.embedding, make_compressor("svd", rank)).compressed


def _identity(backbone: Backbone) -> CompressedEmbedding:
    return CompressedEmbedding(
        method="identity", config={"label": "identity copy"}, dense=backbone.embedding.clone()
    )


def test_evaluate_variant_reports_every_figure(tiny_backbone: Backbone, text_file: str) -> None:
    compressed = _svd(tiny_backbone)
    steps: list[tuple[float, int, str]] = []
    result = evaluate_variant(
        tiny_backbone,
        compressed,
        text=text_file,
        max_tokens=MAX_TOKENS,
        progress=lambda *step: steps.append(step),
    )
    assert result.keys() >= KEYS
    perplexity = result["perplexity"]
    assert set(perplexity) == {"original", "compressed"}
    assert all(1 < value < 10 * tiny_backbone.vocab_size for value in perplexity.values())
    assert perplexity["compressed"] != perplexity["original"]
    assert 0 <= result["recall_at_k"] < 1
    assert 0 < result["median_angle_deg"] < 90 and 0 < result["mean_angle_deg"] < 90
    assert 0 < result["mean_norm_ratio"] <= 1  # an orthogonal projection never lengthens a row
    assert 0 < result["mean_cosine"] < 1 and 0 < result["relative_error"] < 1
    assert (result["rank"], result["method"], result["params"]) == (8, "svd", compressed.params)
    assert result["ratio"] == pytest.approx(compressed.ratio, rel=1e-4)
    assert result["bytes"] == 4 * compressed.params
    assert result["k"] == 10 and result["mode"] == "input"
    assert "recall@10" in result["protocol"] and "input embedding" in result["protocol"]
    assert steps and steps[-1][0] == steps[-1][1]
    assert [step[0] for step in steps] == sorted(step[0] for step in steps)


def test_repeated_evaluation_is_cached_and_identical(tiny_causal: Backbone, text_file: str) -> None:
    compressed = _svd(tiny_causal)
    first = evaluate_variant(tiny_causal, compressed, text=text_file, max_tokens=MAX_TOKENS)
    again = evaluate_variant(tiny_causal, compressed, text=text_file, max_tokens=MAX_TOKENS)
    assert first["perplexity_cached"] is False and again["perplexity_cached"] is True
    drop = {"seconds", "perplexity_cached"}
    assert {k: v for k, v in first.items() if k not in drop} == {
        k: v for k, v in again.items() if k not in drop
    }


@pytest.mark.parametrize("mode", ["input", "tied"])
def test_an_exact_copy_changes_nothing(tiny_backbone: Backbone, text_file: str, mode: str) -> None:
    result = evaluate_variant(
        tiny_backbone, _identity(tiny_backbone), text=text_file, mode=mode, max_tokens=MAX_TOKENS
    )
    assert result["perplexity"]["compressed"] == pytest.approx(result["perplexity"]["original"], rel=1e-9)
    assert result["recall_at_k"] == 1.0
    assert result["mean_angle_deg"] == pytest.approx(0, abs=1e-3)
    assert result["mean_norm_ratio"] == pytest.approx(1)
    assert result["relative_error"] == 0
    assert result["rank"] is None and result["ratio"] == 1


def test_the_variant_key_follows_the_content(tiny_causal: Backbone) -> None:
    compressed = _svd(tiny_causal)
    assert variant_key(compressed) == variant_key(_svd(tiny_causal))
    assert variant_key(compressed) != variant_key(_svd(tiny_causal, rank=7))
    assert variant_name(compressed) == "svd r=8" and variant_name(_identity(tiny_causal)) == "identity"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"text": "nosuchcorpus:test"}, "unknown corpus"),
        ({"text": "bible:nosplit"}, "unknown split"),
        ({"k": 0}, "k must be"),
        ({"mode": "both"}, "unknown substitution mode"),
    ],
)
def test_bad_evaluation_settings(tiny_causal: Backbone, options: dict, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        evaluate_variant(tiny_causal, _identity(tiny_causal), **options)


def test_load_variant_checks_the_matrix(tiny_causal: Backbone, tiny_masked: Backbone) -> None:
    path = compress_cached(tiny_causal.name, tiny_causal.embedding, make_compressor("svd", 4)).path
    assert load_variant(tiny_causal, path).rank == 4
    with pytest.raises(ArtifactError, match="belongs to"):
        load_variant(tiny_masked, path)
    with pytest.raises(ArtifactError, match="no artifact"):
        load_variant(tiny_causal, path.parent / "missing")


# -- sweep ---------------------------------------------------------------------------------------------
def test_sweep_rows_and_cache(tiny_causal: Backbone, text_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[tuple[float, int, str]] = []
    options = {"ratios": [2, 4], "text": text_file, "max_tokens": MAX_TOKENS}
    rows = sweep(tiny_causal, ["svd", "ae-paper"], progress=lambda *step: steps.append(step), **options)

    assert len(rows) == 1 + 2 * 2
    assert all(list(row)[: len(SWEEP_COLUMNS)] == list(SWEEP_COLUMNS) for row in rows)
    reference = rows[0]
    assert (reference["method"], reference["ratio"], reference["recall_at_k"]) == (UNCOMPRESSED, 1.0, 1.0)
    assert reference["perplexity"] == reference["original_perplexity"]
    vocab, hidden = tiny_causal.vocab_size, tiny_causal.hidden_size
    for row, (method, ratio) in zip(
        rows[1:], [("svd", 2), ("svd", 4), ("ae-paper", 2), ("ae-paper", 4)], strict=True
    ):
        assert (row["method"], row["target_ratio"], row["cached"]) == (method, ratio, False)
        assert row["rank"] == rank_for_ratio(vocab, hidden, ratio, decoder_bias=method != "svd")
        assert row["ratio"] >= ratio and row["original_perplexity"] == reference["perplexity"]
        assert math.isfinite(row["perplexity"]) and 0 < row["recall_at_k"] < 1
        assert Path(row["artifact"]).is_dir()
    assert steps[-1][0] == steps[-1][1] == 1 + 2 * 4
    assert [step[0] for step in steps] == sorted(step[0] for step in steps)

    def refit(*_: object, **__: object) -> None:
        raise AssertionError("a cached configuration was fitted again")

    monkeypatch.setattr(SVDCompressor, "fit", refit)
    monkeypatch.setattr(AECompressor, "fit", refit)
    again = sweep(tiny_causal, ["svd", "ae-paper"], **options)
    assert all(row["cached"] for row in again)
    volatile = {"seconds", "cached"}
    assert [{k: v for k, v in row.items() if k not in volatile} for row in again] == [
        {k: v for k, v in row.items() if k not in volatile} for row in rows
    ]


def test_sweep_by_rank_with_the_masked_protocol(tiny_masked: Backbone, text_file: str) -> None:
    rows = sweep(tiny_masked, ["svd"], ranks=[4, 16], text=text_file, max_tokens=MAX_TOKENS)
    assert [(row["method"], row["rank"], row["target_ratio"]) for row in rows] == [
        (UNCOMPRESSED, tiny_masked.hidden_size, 1.0),
        ("svd", 4, None),
        ("svd", 16, None),
    ]
    assert rows[2]["recall_at_k"] > rows[1]["recall_at_k"]
    assert "masked LM" in rows[0]["protocol"]


@pytest.mark.parametrize(
    ("methods", "options", "message"),
    [
        (["svd", "nope"], {"ratios": [2]}, "unknown method"),
        (["svd"], {"ratios": [1]}, "ratio must be above 1"),
        (["svd"], {"ranks": [0]}, "rank must be"),
        (["svd"], {"ranks": [32]}, "rank must be"),
        ([], {"ratios": [2]}, "no method"),
        (["ae-paper"], {"ratios": [2], "recipe": "slowest"}, "unknown recipe"),
        (["svd"], {"ratios": [2], "text": "nosuchcorpus"}, "no such text file"),
    ],
)
def test_sweep_checks_everything_before_running(
    tiny_causal: Backbone, methods: list[str], options: dict, message: str
) -> None:
    steps: list[tuple[float, int, str]] = []
    with pytest.raises(BadInputError, match=message):
        sweep(tiny_causal, methods, progress=lambda *step: steps.append(step), **options)
    assert steps == []
