"""Direction-aware vector quantisation (embviz.compressors.vq): budget, lengths, the model's metric, variable
rate, decoding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from embviz.artifacts import compress_cached
from embviz.compressors import DirectionMetric, RowWeights, UnreachableBudget, get_method
from embviz.compressors.vq import (
    METRIC_SHRINK,
    STAGE1_SHARE,
    DirectionVQ,
    Layout,
    decode_direction_vq,
    metric_factors,
    metric_transform,
    plan,
    stored_bytes,
)
from embviz.errors import BadInputError

VOCAB, HIDDEN = 8192, 64


@pytest.fixture(scope="module")
def matrix() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(VOCAB, HIDDEN, generator=generator)
    lengths = torch.exp(torch.randn(VOCAB, 1, generator=generator) * 0.3)
    return directions / directions.norm(dim=1, keepdim=True) * lengths


@pytest.fixture(scope="module")
def weights() -> RowWeights:
    return RowWeights(torch.linspace(3.0, 0.1, VOCAB), source="test ramp")  # the first rows matter most


@pytest.fixture(scope="module")
def euclidean() -> DirectionMetric:
    return DirectionMetric.euclidean(HIDDEN)


COSTLY = [0, 17, 34, 51]
"""Coordinates a test metric makes costly, one in each quarter (so in different sub-vectors)."""


def costly_first(weight: float) -> DirectionMetric:
    """A metric in which an error along the :data:`COSTLY` coordinates costs ``weight`` times more."""
    diagonal = torch.ones(HIDDEN, dtype=torch.float64)
    diagonal[COSTLY] = weight
    return DirectionMetric(torch.diag(diagonal), source=f"coordinates {COSTLY} x{weight}")


@pytest.mark.parametrize("bits", [4.0, 2.0, 1.0, 0.85])
def test_the_plan_fills_the_budget_without_passing_it(bits: float) -> None:
    layout = plan(VOCAB, HIDDEN, 32 / bits)
    assert HIDDEN % layout.m == 0 and layout.nbits == 8 and layout.directions == 16
    used = stored_bytes(VOCAB, HIDDEN, layout)
    assert 8 * used <= bits * VOCAB * HIDDEN
    if layout.stage2 and layout.stage2 < VOCAB:  # one more stage-2 row would not fit
        more = layout._replace(stage2=layout.stage2 + 1)
        assert 8 * stored_bytes(VOCAB, HIDDEN, more) > bits * VOCAB * HIDDEN


def test_stage_one_takes_at_most_its_share_when_a_second_stage_is_bought() -> None:
    layout = plan(VOCAB, HIDDEN, 32 / 2.0)  # 16 bytes of codes per row
    assert layout.stage2 >= 256
    one_stage = stored_bytes(VOCAB, HIDDEN, Layout(0, 8, 0, layout.directions))
    per_row = (VOCAB * HIDDEN * 2.0 / 8 - one_stage - 2 * 256 * HIDDEN) / VOCAB
    assert layout.m <= STAGE1_SHARE * per_row
    bigger = [d for d in range(layout.m + 1, HIDDEN + 1) if HIDDEN % d == 0]
    assert not bigger or bigger[0] > STAGE1_SHARE * per_row


def test_a_budget_below_one_byte_per_row_is_one_clear_error() -> None:
    with pytest.raises(BadInputError, match="bits per weight"):
        plan(VOCAB, HIDDEN, 32 / 0.5)


def test_the_metric_transform_is_undone_exactly_and_the_identity_does_nothing() -> None:
    scales, basis = metric_factors(costly_first(25.0), HIDDEN, 16)
    assert scales.dtype == torch.float16 and basis.shape == (16, HIDDEN)
    # eigenvalues to mean 1: the costly 25 -> 10, the others 1 -> 0.4 (the tail's mean)
    shrink = METRIC_SHRINK
    assert float(scales.float().max()) == pytest.approx(math.sqrt((10 + shrink) / (0.4 + shrink)), rel=1e-3)
    transform, inverse = metric_transform(scales, basis)
    assert torch.allclose(transform @ inverse, torch.eye(HIDDEN), atol=1e-5)
    scales, basis = metric_factors(DirectionMetric.euclidean(HIDDEN), HIDDEN, 16)
    transform, _ = metric_transform(scales, basis)
    assert torch.allclose(transform, torch.eye(HIDDEN), atol=1e-3)


def test_a_costly_direction_is_kept_more_accurately_than_without_the_metric(
    matrix: torch.Tensor, weights: RowWeights, euclidean: DirectionMetric
) -> None:
    """The metric moves the direction's error out of the directions it says are costly, at a rate where the
    codes resolve them (8 sub-vectors of 8 numbers here; with far coarser codes the shrinkage of what the codes
    miss tilts every direction towards what they keep, and that error dominates)."""
    plain = DirectionVQ(32 / 3.0, weights, euclidean).fit(matrix).reconstruct()
    aware = DirectionVQ(32 / 3.0, weights, costly_first(25.0)).fit(matrix).reconstruct()

    def errors(dense: torch.Tensor) -> tuple[float, float]:
        """The direction's error (the part of the unit row found orthogonal to the true one), squared."""
        units = matrix / matrix.norm(dim=1, keepdim=True)
        found = dense / dense.norm(dim=1, keepdim=True)
        squared = (found - (found * units).sum(dim=1, keepdim=True) * units).pow(2)
        cheap = [i for i in range(HIDDEN) if i not in COSTLY]
        return float(squared[:, COSTLY].mean()), float(squared[:, cheap].mean())

    (costly, cheap), (costly_plain, cheap_plain) = errors(aware), errors(plain)
    assert costly < 0.5 * costly_plain and cheap > cheap_plain  # measured: 0.38x and 1.12x


def test_lengths_are_kept_to_8_bits_and_directions_are_unit(
    matrix: torch.Tensor, weights: RowWeights, euclidean: DirectionMetric
) -> None:
    result = DirectionVQ(32 / 2.0, weights, euclidean).fit(matrix)
    assert result.bits_per_weight <= 2.0 and result.stored_bytes == result.bytes
    dense = result.reconstruct()
    lengths, original = dense.norm(dim=1), matrix.norm(dim=1)
    span = float(original.log().max() - original.log().min())
    assert torch.allclose(lengths.log(), original.log(), atol=span / 255 / 2 + 2e-3)
    cosine = torch.nn.functional.cosine_similarity(dense, matrix, dim=1)
    assert float(cosine.mean()) > 0.5


def test_the_heaviest_rows_get_the_second_stage_and_come_out_closer(
    matrix: torch.Tensor, weights: RowWeights, euclidean: DirectionMetric
) -> None:
    result = DirectionVQ(32 / 2.5, weights, euclidean).fit(matrix)
    stage2 = plan(VOCAB, HIDDEN, 32 / 2.5).stage2
    assert 0 < stage2 < VOCAB
    cosine = torch.nn.functional.cosine_similarity(result.reconstruct(), matrix, dim=1)
    assert float(cosine[:stage2].mean()) > float(cosine[stage2:].mean()) + 0.05


def test_fits_are_deterministic_and_decoding_checks_its_inputs(
    matrix: torch.Tensor, weights: RowWeights
) -> None:
    metric = costly_first(10.0)
    first = DirectionVQ(32 / 2.5, weights, metric, seed=3).fit(matrix)
    again = DirectionVQ(32 / 2.5, weights, metric, seed=3).fit(matrix)
    assert plan(VOCAB, HIDDEN, 32 / 2.5).stage2 > 0
    assert first.qcodes is not None and again.qcodes is not None
    assert torch.equal(first.qcodes, again.qcodes) and torch.equal(first.reconstruct(), again.reconstruct())
    stored = {"qcodes": first.qcodes, "qscales": first.qscales}
    decoded = decode_direction_vq(first.config, stored, (VOCAB, HIDDEN), None)["dense"]
    assert torch.equal(decoded, first.reconstruct())
    with pytest.raises(ValueError, match="codes"):
        decode_direction_vq(first.config, {**stored, "qcodes": first.qcodes[:-1]}, (VOCAB, HIDDEN), None)
    with pytest.raises(ValueError, match="codebooks"):
        decode_direction_vq(first.config, {**stored, "qscales": first.qscales[:-1]}, (VOCAB, HIDDEN), None)
    older = {key: value for key, value in first.config.items() if key != "layout"}
    with pytest.raises(ValueError, match="layout 1"):
        decode_direction_vq(older, stored, (VOCAB, HIDDEN), None)


def test_the_metric_keys_the_configuration(matrix: torch.Tensor, weights: RowWeights) -> None:
    one = DirectionVQ(32 / 2.0, weights, costly_first(10.0)).get_config()
    other = DirectionVQ(32 / 2.0, weights, costly_first(20.0)).get_config()
    assert one["direction_metric"] != other["direction_metric"] and one["layout"] == 2


def test_it_is_sized_by_bits_and_needs_row_weights_and_a_metric(euclidean: DirectionMetric) -> None:
    spec = get_method("vq-direction")
    size = spec.size(49152, 576, bits=0.5)  # SmolLM2's shape
    assert size.ratio == pytest.approx(64) and size.target_bits == 0.5
    assert spec.needs_row_weights and spec.needs_direction_metric and not math.isnan(size.ratio)
    assert plan(49152, 576, size.ratio).stage2 > 0
    # The reach is the plan's: on a small matrix the codebooks alone are most of half a bit per weight.
    with pytest.raises(UnreachableBudget, match="8192 x 64"):
        spec.size(VOCAB, HIDDEN, bits=0.5)
    assert spec.max_byte_ratio is not None
    least = 32 / spec.max_byte_ratio(VOCAB, HIDDEN)
    plan(VOCAB, HIDDEN, spec.size(VOCAB, HIDDEN, bits=least).ratio or 0)  # the least budget builds
    with pytest.raises(BadInputError):
        plan(VOCAB, HIDDEN, 32 / (least * 0.99))
    with pytest.raises(BadInputError, match="row weights"):
        DirectionVQ(8.0, None, euclidean)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="direction metric"):
        DirectionVQ(8.0, RowWeights(torch.ones(4), source="x"), None)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="direction metric"):
        spec.build(spec.size(VOCAB, HIDDEN, bits=2.0), row_weights=RowWeights(torch.ones(VOCAB), source="x"))


def test_a_metric_of_the_wrong_width_is_refused(matrix: torch.Tensor, weights: RowWeights) -> None:
    with pytest.raises(BadInputError, match="32-wide direction metric for 64-wide rows"):
        DirectionVQ(32 / 2.0, weights, DirectionMetric.euclidean(32)).fit(matrix)


def test_a_second_compression_is_served_from_the_artifact_cache(
    matrix: torch.Tensor, weights: RowWeights, euclidean: DirectionMetric, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path))
    first = compress_cached("test-matrix", matrix, DirectionVQ(32 / 1.0, weights, euclidean))
    again = compress_cached("test-matrix", matrix, DirectionVQ(32 / 1.0, weights, euclidean))
    assert not first.cached and again.cached
    assert torch.equal(first.compressed.reconstruct(), again.compressed.reconstruct())
