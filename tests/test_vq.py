"""Direction-aware vector quantisation (embviz.compressors.vq): budget, lengths, variable rate, decoding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from embviz.artifacts import compress_cached
from embviz.compressors import RowWeights, UnreachableBudget, get_method
from embviz.compressors.vq import DirectionVQ, decode_direction_vq, plan, stored_bytes
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


@pytest.mark.parametrize("bits", [4.0, 2.0, 1.0])
def test_the_plan_fills_the_budget_without_passing_it(bits: float) -> None:
    m, nbits, stage2 = plan(VOCAB, HIDDEN, 32 / bits)
    assert HIDDEN % m == 0 and nbits == 8
    used = stored_bytes(VOCAB, HIDDEN, m, nbits, stage2)
    assert 8 * used <= bits * VOCAB * HIDDEN
    bigger = [d for d in range(m + 1, HIDDEN + 1) if HIDDEN % d == 0]
    if bigger:  # the next divisor would not fit
        assert 8 * stored_bytes(VOCAB, HIDDEN, bigger[0], nbits, 0) > bits * VOCAB * HIDDEN


def test_a_budget_below_one_byte_per_row_is_one_clear_error() -> None:
    with pytest.raises(BadInputError, match="bits per weight"):
        plan(VOCAB, HIDDEN, 32 / 0.5)


def test_lengths_are_kept_to_8_bits_and_directions_are_unit(
    matrix: torch.Tensor, weights: RowWeights
) -> None:
    result = DirectionVQ(32 / 2.0, weights).fit(matrix)
    assert result.bits_per_weight <= 2.0 and result.stored_bytes == result.bytes
    dense = result.reconstruct()
    lengths, original = dense.norm(dim=1), matrix.norm(dim=1)
    span = float(original.log().max() - original.log().min())
    assert torch.allclose(lengths.log(), original.log(), atol=span / 255 / 2 + 2e-3)
    cosine = torch.nn.functional.cosine_similarity(dense, matrix, dim=1)
    assert float(cosine.mean()) > 0.5


def test_the_heaviest_rows_get_the_second_stage_and_come_out_closer(
    matrix: torch.Tensor, weights: RowWeights
) -> None:
    result = DirectionVQ(32 / 2.5, weights).fit(matrix)  # 8 bytes of direction per row, then stage 2
    stage2 = plan(VOCAB, HIDDEN, 32 / 2.5)[2]
    assert 0 < stage2 < VOCAB
    cosine = torch.nn.functional.cosine_similarity(result.reconstruct(), matrix, dim=1)
    assert float(cosine[:stage2].mean()) > float(cosine[stage2:].mean()) + 0.05


def test_fits_are_deterministic_and_decoding_checks_its_inputs(
    matrix: torch.Tensor, weights: RowWeights
) -> None:
    first = DirectionVQ(32 / 2.5, weights, seed=3).fit(matrix)
    again = DirectionVQ(32 / 2.5, weights, seed=3).fit(matrix)
    assert plan(VOCAB, HIDDEN, 32 / 2.5)[2] > 0
    assert first.qcodes is not None and again.qcodes is not None
    assert torch.equal(first.qcodes, again.qcodes) and torch.equal(first.reconstruct(), again.reconstruct())
    stored = {"qcodes": first.qcodes, "qscales": first.qscales}
    decoded = decode_direction_vq(first.config, stored, (VOCAB, HIDDEN), None)["dense"]
    assert torch.equal(decoded, first.reconstruct())
    with pytest.raises(ValueError, match="codes"):
        decode_direction_vq(first.config, {**stored, "qcodes": first.qcodes[:-1]}, (VOCAB, HIDDEN), None)
    with pytest.raises(ValueError, match="codebooks"):
        decode_direction_vq(first.config, {**stored, "qscales": first.qscales[:-1]}, (VOCAB, HIDDEN), None)


def test_it_is_sized_by_bits_and_needs_row_weights() -> None:
    spec = get_method("vq-direction")
    size = spec.size(49152, 576, bits=0.5)  # SmolLM2's shape
    assert size.ratio == pytest.approx(64) and size.target_bits == 0.5
    assert spec.needs_row_weights and not math.isnan(size.ratio)
    plan(49152, 576, size.ratio)
    # The reach is the plan's: on a small matrix the codebooks alone are most of half a bit per weight.
    with pytest.raises(UnreachableBudget, match="8192 x 64"):
        spec.size(VOCAB, HIDDEN, bits=0.5)
    assert spec.max_byte_ratio is not None
    least = 32 / spec.max_byte_ratio(VOCAB, HIDDEN)
    plan(VOCAB, HIDDEN, spec.size(VOCAB, HIDDEN, bits=least).ratio or 0)  # the least budget builds
    with pytest.raises(BadInputError):
        plan(VOCAB, HIDDEN, 32 / (least * 0.99))
    with pytest.raises(BadInputError, match="row weights"):
        DirectionVQ(8.0, None)  # type: ignore[arg-type]


def test_a_second_compression_is_served_from_the_artifact_cache(
    matrix: torch.Tensor, weights: RowWeights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path))
    first = compress_cached("test-matrix", matrix, DirectionVQ(32 / 1.0, weights))
    again = compress_cached("test-matrix", matrix, DirectionVQ(32 / 1.0, weights))
    assert not first.cached and again.cached
    assert torch.equal(first.compressed.reconstruct(), again.compressed.reconstruct())
