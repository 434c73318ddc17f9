"""Synthetic matrices of today's shapes, the memory each stage predicts, growth fits and the scale stage."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from embviz import bench, scaling
from embviz.cli import main
from embviz.errors import BadInputError
from embviz.metrics import use_exact_search


def _profile(seed: int = 0) -> scaling.SpectrumProfile:
    """A profile from a matrix with a decaying spectrum and spread-out row norms, like a real embedding."""
    rng = np.random.default_rng(seed)
    decay = np.exp(-np.arange(48) / 8.0)
    rows = rng.standard_normal((3000, 48)) * decay
    rows[:, 0] += 3.0  # a shared offset: a dominant first direction, as real embedding matrices have
    rows *= rng.lognormal(0.0, 0.25, size=(3000, 1))
    return scaling.SpectrumProfile.from_matrix(torch.from_numpy(rows), "test")


def test_a_synthetic_matrix_copies_the_profile_spectrum_norms_and_scale() -> None:
    profile = _profile()
    matrix = scaling.synthetic_embedding(6000, 96, profile, seed=3)
    assert matrix.shape == (6000, 96) and matrix.dtype == torch.float32
    again = scaling.synthetic_embedding(6000, 96, profile, seed=3)
    assert torch.equal(matrix, again)  # deterministic for a seed
    assert not torch.equal(matrix, scaling.synthetic_embedding(6000, 96, profile, seed=4))
    copied = scaling.SpectrumProfile.from_matrix(matrix, "synthetic")
    assert copied.entry_rms == pytest.approx(profile.entry_rms, rel=1e-3)
    for q in (5, 50, 95):
        assert np.percentile(copied.relative_norms, q) == pytest.approx(
            np.percentile(profile.relative_norms, q), rel=0.05
        )
    # The spectrum's shape, at twice the width: the log singular values follow the interpolated profile.
    wanted = np.log(profile.spectrum(96))
    found = np.log(copied.singular_values)
    assert np.corrcoef(wanted, found)[0, 1] > 0.95
    assert found[0] - found[-1] == pytest.approx(wanted[0] - wanted[-1], rel=0.35)


def test_a_synthetic_matrix_refuses_a_degenerate_shape() -> None:
    with pytest.raises(BadInputError, match="at least 2 x 2"):
        scaling.synthetic_embedding(1, 64, _profile())


def test_every_stage_predicts_its_memory_and_the_largest_shape_is_judged_against_16_gb() -> None:
    vocab, hidden = 256_000, 4096
    matrix = 4 * vocab * hidden
    predicted = {stage: scaling.stage_memory(stage, vocab, hidden) for stage in scaling.SCALE_STAGES}
    assert all(value > 0 for value in predicted.values())
    # The neighbour table is far beyond an affordable exact search there: the index's copy is counted.
    assert not use_exact_search(vocab, vocab, hidden)
    assert predicted["neighbours"] > 2 * matrix
    # The closed-form stages hold little beyond the matrix itself (no float64 copy of every row).
    assert predicted["svd"] < matrix and predicted["pca"] < matrix
    fits = {stage: 2**30 + matrix + value <= scaling.MEMORY_BUDGET for stage, value in predicted.items()}
    assert fits["svd"] and fits["pca"] and fits["neighbours"]
    # The AE gathers its training batches from the matrix (no copy of the rows): it fits there too.
    assert predicted["ae"] < matrix and fits["ae"]
    with pytest.raises(BadInputError, match="unknown scale stage 'tsne'"):
        scaling.stage_memory("tsne", 10, 10)


def test_growth_exponents_recover_a_known_power_law() -> None:
    points = [
        {"stage": "neighbours", "vocab": v, "hidden": d, "seconds": 1e-12 * v**2 * d}
        for v in (30_000, 64_000, 128_000)
        for d in (576, 2048)
    ]
    points.append({"stage": "svd", "vocab": 30_000, "hidden": 576, "seconds": 1.0})  # one shape: no fit
    growth = scaling.growth_exponents(points)
    assert growth["neighbours"] == {"points": 6, "vocab_exponent": 2.0, "hidden_exponent": 1.0}
    assert "svd" not in growth
    expected = 1e-12 * 256_000**2 * 2048
    assert scaling.predict_seconds(points, "neighbours", 256_000, 2048) == pytest.approx(expected)
    assert scaling.predict_seconds(points, "neighbours", 256_000, 4096) is None  # nothing measured at 4096


def test_every_stage_runs_on_a_small_synthetic_matrix(tmp_path: Path) -> None:
    matrix = scaling.synthetic_embedding(6000, 64, _profile())
    results = {stage: scaling.run_stage(stage, matrix, tmp_path) for stage in scaling.SCALE_STAGES}
    assert all(result["seconds"] > 0 for result in results.values())
    assert results["svd"]["rank"] == 8 == results["ae"]["rank"]
    assert results["vq"]["bits_per_weight"] <= 1.0
    assert results["neighbours"]["search"] == "exact" == results["recall"]["search"]
    assert 0.0 < results["recall"]["recall_at_k"] < 1.0
    table = np.load(tmp_path / "original_neighbours.npy")
    assert table.shape == (6000, scaling.TABLE_K)
    with pytest.raises(BadInputError, match="unknown scale stage"):
        scaling.run_stage("tsne", matrix, tmp_path)


class _Context:
    """What :func:`bench.stage_scale` reads from a bench context: settings, the backbone's matrix, ``say``."""

    def __init__(self, settings: bench.BenchSettings, embedding: torch.Tensor) -> None:
        self.settings = settings
        self.backbone = SimpleNamespace(embedding=embedding)
        self.messages: list[str] = []

    def say(self, message: str) -> None:
        self.messages.append(message)


def _run_scale(settings: bench.BenchSettings) -> tuple[bench.Report, dict[str, Any]]:
    rng = np.random.default_rng(0)
    embedding = torch.from_numpy(
        (rng.standard_normal((2000, 32)) * np.exp(-np.arange(32) / 6)).astype(np.float32)
    )
    report = bench.Report()
    bench.stage_scale(_Context(settings, embedding), report)  # type: ignore[arg-type]
    return report, report.details["scale"]


def test_the_scale_stage_measures_refuses_and_skips_with_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = bench.BenchSettings(
        scale_vocabs=(3000, 6000), scale_hiddens=(48,), scale_stages=("svd", "neighbours", "recall", "vq")
    )
    report, details = _run_scale(settings)
    points = {(p["stage"], p["vocab"]): p for p in details["points"]}
    measured = points[("svd", 6000)]
    assert measured["status"] == "measured" and measured["seconds"] > 0
    assert measured["peak_rss_mb"] >= measured["loaded_rss_mb"] >= measured["baseline_rss_mb"] > 0
    assert report.figures["scale_svd_6000x48_s"] == pytest.approx(measured["seconds"], rel=1e-3)
    assert points[("recall", 6000)]["status"] == "measured"
    assert points[("vq", 3000)]["status"] == "skipped" and "bits per weight" in points[("vq", 3000)]["reason"]
    assert set(details["growth"]) >= {"svd", "neighbours"}
    assert json.dumps(details)  # JSON-ready

    # A tiny budget: everything is refused before any work, with the numbers.
    monkeypatch.setattr(scaling, "MEMORY_BUDGET", 2**20)
    _, refused = _run_scale(
        bench.BenchSettings(scale_vocabs=(3000,), scale_hiddens=(48,), scale_stages=("svd",))
    )
    (point,) = refused["points"]
    assert point["status"] == "refused" and "over the 16 GB budget" in point["reason"]


def test_a_stage_predicted_past_the_limit_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scaling, "predict_seconds", lambda points, stage, vocab, hidden: 1e6)
    _, details = _run_scale(
        bench.BenchSettings(scale_vocabs=(3000,), scale_hiddens=(48,), scale_stages=("svd",))
    )
    (point,) = details["points"]
    assert point["status"] == "skipped" and "predicted 1,000,000 s" in point["reason"]


def test_an_interrupted_grid_resumes_from_its_points_file(tmp_path: Path) -> None:
    points_file = tmp_path / "grid.jsonl"
    settings = bench.BenchSettings(
        scale_vocabs=(3000,), scale_hiddens=(48,), scale_stages=("svd",), scale_points=points_file
    )
    first, details = _run_scale(settings)
    (written,) = [json.loads(line) for line in points_file.read_text().splitlines()]
    assert written == details["points"][0] and written["status"] == "measured"

    # A second shape joins; the finished one is reused, not re-run (its recorded seconds come back).
    points_file.write_text(points_file.read_text() + '{"stage": "svd", "vocab": 6000, "hid')  # a torn line
    resumed, again = _run_scale(replace(settings, scale_vocabs=(3000, 6000)))
    by_vocab = {p["vocab"]: p for p in again["points"]}
    assert by_vocab[3000] == written
    assert resumed.figures["scale_svd_3000x48_s"] == first.figures["scale_svd_3000x48_s"]
    assert by_vocab[6000]["status"] == "measured"
    assert set(bench.read_scale_points(points_file)) == {(3000, 48), (6000, 48)}

    # A stage not yet in the file re-runs the whole shape (later stages read the earlier ones' files).
    _, widened = _run_scale(replace(settings, scale_stages=("svd", "pca")))
    assert [p["stage"] for p in widened["points"]] == ["svd", "pca"]
    assert widened["points"][1]["status"] == "measured"
    assert set(bench.read_scale_points(points_file)[(3000, 48)]) == {"svd", "pca"}


def test_the_scale_targets_join_only_when_the_stage_runs() -> None:
    names = {target.figure for target in bench.targets_for({}, ["scale"])}
    assert {"scale_svd_128000x2048_s", "scale_256000x4096_bounded"} <= names
    assert "scale_svd_128000x2048_s" not in {target.figure for target in bench.targets_for({}, ["load"])}
    assert bench._recall_vs_limit({"seconds": 60.0, "search": "exact"}) == 0.5
    assert bench._recall_vs_limit({"seconds": 15.0, "search": "faiss PCA256", "search_recall": 0.995}) == 0.5
    assert math.isinf(
        bench._recall_vs_limit({"seconds": 15.0, "search": "faiss PCA256", "search_recall": 0.9})
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--scale-vocabs", "30000,abc"], "--scale-vocabs"),
        (["--scale-vocabs", "1"], "at least 2"),
        (["--scale-stages", "svd,tsne"], "unknown scale stage tsne"),
        (["--scale-limit", "0"], "--scale-limit must be above 0"),
    ],
)
def test_bad_scale_flags_are_one_clear_error(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--stages", "scale", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_exact_search_does_not_predict_an_approximate_one() -> None:
    points = [
        {"stage": "neighbours", "vocab": v, "hidden": 2048, "seconds": 1e-12 * v**2 * 2048, "search": "exact"}
        for v in (30_000, 64_000)
    ]
    assert scaling.search_is_exact("neighbours", 64_000, 2048) is True
    assert scaling.search_is_exact("neighbours", 128_000, 2048) is False
    assert scaling.search_is_exact("svd", 128_000, 2048) is None
    assert scaling.predict_seconds(points, "neighbours", 128_000, 2048) is None  # approximate there
    assert scaling.predict_seconds(points, "neighbours", 60_000, 2048) is not None
