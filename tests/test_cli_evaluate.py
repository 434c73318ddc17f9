"""The evaluation commands: ``embviz evaluate``, ``sweep`` and ``predict`` on tiny models."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from embviz.artifacts import WEIGHTS_FILE, compress_cached
from embviz.backbones import Backbone
from embviz.cli import main
from embviz.compressors import make_compressor
from embviz.evaluation import SWEEP_COLUMNS
from embviz.testing import SENTENCES

EVALUATE_KEYS = {
    "perplexity",
    "recall_at_k",
    "mean_angle_deg",
    "median_angle_deg",
    "mean_norm_ratio",
    "seconds",
    "rank",
    "ratio",
    "method",
    "protocol",
    "artifact",
}


@pytest.fixture
def text_file(tmp_path: Path) -> str:
    lines = [" ".join(SENTENCES[i : i + 3]) for i in range(len(SENTENCES) - 2)]
    path = tmp_path / "held-out.txt"
    path.write_text("\n".join(lines * 2), encoding="utf-8")
    return str(path)


def _artifact(backbone: Backbone, rank: int = 8) -> str:
    result = compress_cached(backbone.name, backbone.embedding, make_compressor("svd", rank))
    return str(result.path)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_evaluate_json(
    tiny_causal_path: Path, tiny_causal: Backbone, text_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = _artifact(tiny_causal)
    status, out, err = _run(
        capsys, "evaluate", str(tiny_causal_path), "--artifact", artifact, "--text", text_file, "--json"
    )
    assert status == 0
    result = json.loads(out)
    assert result.keys() >= EVALUATE_KEYS
    assert set(result["perplexity"]) == {"original", "compressed"}
    assert result["rank"] == 8 and result["artifact"] == artifact and 0 <= result["recall_at_k"] <= 1
    assert "evaluated" in err  # progress goes to stderr
    assert list(result)[-10:] == [
        "kl_nats",
        "top1_agreement",
        "perplexity_variant_directions",
        "perplexity_variant_lengths",
        "bits_per_weight",
        "bytes_vs_bf16",
        "source_format",
        "source_bits_per_weight",
        "bytes_vs_source",
        "neighbour_search",
    ]
    assert result["bits_per_weight"] == pytest.approx(8 * result["bytes"] / tiny_causal.embedding.numel())
    assert (result["source_format"], result["source_bits_per_weight"]) == ("float32", 32.0)
    assert result["bytes_vs_source"] == pytest.approx(32.0 / result["bits_per_weight"], rel=1e-3)
    assert result["kl_nats"] > 0 and 0 <= result["top1_agreement"] <= 1
    assert result["perplexity_variant_directions"] > 1 and result["perplexity_variant_lengths"] > 1
    argv = ["evaluate", str(tiny_causal_path), "--artifact", artifact, "--text", text_file]
    status, out, _ = _run(capsys, *argv, "--no-ablation", "--json")
    quick = json.loads(out)
    assert status == 0 and quick["kl_nats"] == result["kl_nats"]
    assert quick["perplexity_variant_directions"] is None and quick["perplexity_variant_lengths"] is None


def test_evaluate_human_output(
    tiny_masked_path: Path, tiny_masked: Backbone, text_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = _artifact(tiny_masked)
    argv = ["evaluate", str(tiny_masked_path), "--artifact", artifact, "--text", text_file, "--k", "5"]
    status, out, _ = _run(capsys, *argv, "--mode", "tied", "--max-tokens", "300")
    assert status == 0
    assert "perplexity (original)" in out and "recall_at_k" in out and "masked LM" in out
    assert "KL(original || compressed), nats/token" in out and "top-1 agreement" in out
    assert "perplexity (compressed directions, original lengths)" in out
    status, out, _ = _run(capsys, *argv, "--max-tokens", "300", "--no-ablation")
    assert status == 0 and "top-1 agreement" in out and "directions" not in out


SWEEP = ["--methods", "svd,ae-mse", "--ratios", "2,4", "--max-tokens", "256"]


def test_sweep_json(tiny_causal_path: Path, text_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _run(capsys, "sweep", str(tiny_causal_path), *SWEEP, "--text", text_file, "--json")
    assert status == 0
    rows = json.loads(out)
    assert [(row["method"], row["target_ratio"]) for row in rows] == [
        ("uncompressed", 1.0),
        ("svd", 2.0),
        ("svd", 4.0),
        ("ae-mse", 2.0),
        ("ae-mse", 4.0),
    ]
    assert all(row.keys() >= set(SWEEP_COLUMNS) | {"original_perplexity", "protocol"} for row in rows)
    assert "sweep done" in err
    assert (rows[0]["kl_nats"], rows[0]["top1_agreement"]) == (0.0, 1.0)
    assert all(row["kl_nats"] > 0 for row in rows[1:])
    assert all(row["perplexity_variant_directions"] is None for row in rows)


def test_sweep_ablation_flag(
    tiny_causal_path: Path, text_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sweep", str(tiny_causal_path), "--methods", "svd", "--ranks", "4", "--max-tokens", "256"]
    status, out, _ = _run(capsys, *argv, "--text", text_file, "--ablation", "--json")
    assert status == 0
    rows = json.loads(out)
    assert all(
        row["perplexity_variant_directions"] > 1 and row["perplexity_variant_lengths"] > 1 for row in rows
    )
    status, out, _ = _run(capsys, *argv, "--text", text_file, "--ablation")
    assert status == 0
    assert out.splitlines()[0].split()[-2:] == ["perplexity_variant_directions", "perplexity_variant_lengths"]


def test_sweep_by_bytes_marks_the_frontier(
    tiny_causal_path: Path, text_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--methods", "svd,svd-int8,quant-mixed", "--ratios", "4", "--max-tokens", "256", "--by", "bytes"]
    status, out, _ = _run(capsys, "sweep", str(tiny_causal_path), *argv, "--text", text_file, "--json")
    assert status == 0
    rows = {row["method"]: row for row in json.loads(out)}
    assert rows["svd-int8"]["rank"] > rows["svd"]["rank"]  # more rank in the same bytes
    assert all(rows[name]["byte_ratio"] >= 4 for name in ("svd", "svd-int8", "quant-mixed"))
    assert any(row["frontier"] for row in rows.values())


def test_sweep_csv_and_table(
    tiny_causal_path: Path, text_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run(capsys, "sweep", str(tiny_causal_path), *SWEEP, "--text", text_file, "--csv")
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 5 and list(rows[0])[: len(SWEEP_COLUMNS)] == list(SWEEP_COLUMNS)
    assert rows[0]["method"] == "uncompressed" and float(rows[1]["perplexity"]) > 1

    status, out, _ = _run(capsys, "sweep", str(tiny_causal_path), *SWEEP, "--text", text_file)
    assert status == 0
    header, *lines = out.split("\n\n")[0].splitlines()
    assert header.split() == [
        "method",
        "rank",
        "ratio",
        "byte_ratio",
        "perplexity",
        "vs_original",
        "frontier",
        "recall_at_k",
        "mean_angle_deg",
        "kl_nats",
        "top1_agreement",
    ]
    assert len(lines) == 5 and lines[0].split()[0] == "uncompressed"


@pytest.mark.parametrize("kind", ["masked", "causal"])
def test_predict_json(kind: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> None:
    path, backbone = request.getfixturevalue(f"tiny_{kind}_path"), request.getfixturevalue(f"tiny_{kind}")
    low, high = _artifact(backbone, 4), _artifact(backbone, 16)
    argv = ["predict", str(path), "The king of ___ lived in a great palace.", "--k", "3"]
    status, out, _ = _run(capsys, *argv, "--artifact", low, "--artifact", high, "--artifact", low, "--json")
    assert status == 0
    result = json.loads(out)
    assert list(result["variants"]) == ["original", "svd r=4", "svd r=16", "svd r=4 #3"]
    for variant in result["variants"].values():
        assert len(variant["predictions"]) == 3
        assert all(0 <= p["probability"] <= 1 for p in variant["predictions"])
    assert [row["variant"] for row in result["changes"]] == list(result["variants"])
    assert result["artifacts"]["svd r=16"] == high
    assert result["model_note"] is None  # a plain folder: nothing to label

    status, out, _ = _run(capsys, *argv[:-2], "--artifact", low)
    assert status == 0 and "rank" in out and "svd r=4: top-1" in out


def test_predict_labels_a_head_fitted_by_embviz(
    tiny_masked: Backbone, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    note = "predictions come from a masked-LM head fitted by embviz on public-domain text"
    labelled = Backbone(tiny_masked.name, tiny_masked.model, tiny_masked.tokenizer, "masked", note=note)
    monkeypatch.setattr("embviz.cli._load_backbone", lambda args: labelled)
    status, out, _ = _run(capsys, "predict", "m", "The king of ___ lived here.", "--k", "3")
    assert status == 0 and note in out
    status, out, _ = _run(capsys, "predict", "m", "The king of ___ lived here.", "--json")
    assert json.loads(out)["model_note"] == note


def _corrupt(path: str) -> str:
    weights = Path(path) / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "{causal}", "--methods", "svd,nope", "--ratios", "2"], "unknown method"),
        (["sweep", "{causal}", "--ratios", "1"], "ratio must be above 1"),
        (["sweep", "{causal}", "--ratios", "2,x"], "comma-separated list of numbers"),
        (["sweep", "{causal}", "--ratios", "2,,4"], "comma-separated list of numbers"),
        (["sweep", "{causal}", "--ranks", "4.5"], "comma-separated list of integers"),
        (["sweep", "{causal}", "--ranks", "99"], "rank must be"),
        (["sweep", "{causal}", "--text", "nosuchcorpus:test"], "unknown corpus"),
        (["evaluate", "{causal}", "--artifact", "{artifact}", "--text", "bible:nosplit"], "unknown split"),
        (
            ["evaluate", "{causal}", "--artifact", "{artifact}", "--text", "no/such/file.txt"],
            "no such text file",
        ),
        (["evaluate", "{causal}", "--artifact", "{tmp}/missing"], "no artifact"),
        (["evaluate", "{causal}", "--artifact", "{corrupt}"], "do not match"),
        (["evaluate", "{masked}", "--artifact", "{artifact}"], "belongs to"),
        (["predict", "{causal}", "no blank in this sentence"], "no blank"),
        (["predict", "{causal}", "two ___ blanks ___", "--artifact", "{artifact}"], "2 blanks"),
        (["predict", "{masked}", "The [MASK] sat.", "--artifact", "{artifact}"], "belongs to"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str],
    message: str,
    tiny_causal_path: Path,
    tiny_masked_path: Path,
    tiny_causal: Backbone,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    places = {"causal": str(tiny_causal_path), "masked": str(tiny_masked_path), "tmp": str(tmp_path)}
    if any("{artifact}" in arg for arg in argv):
        places["artifact"] = _artifact(tiny_causal)
    if any("{corrupt}" in arg for arg in argv):
        places["corrupt"] = _corrupt(_artifact(tiny_causal, 5))
    status, out, err = _run(capsys, *(arg.format(**places) for arg in argv))
    assert status == 2 and out == ""
    assert err.startswith("embviz: error:") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


def test_output_flags_are_exclusive(tiny_causal_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(tiny_causal_path), "--json", "--csv"])
    assert exit_info.value.code == 2
