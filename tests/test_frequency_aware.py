"""Frequency-aware compressors (issue 7): weighted SVD, the weighted AE, mixed-precision rows, and the
quantised low-rank wrappers around them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from embviz import frequency
from embviz.artifacts import load_artifact, save_artifact
from embviz.backbones import Backbone
from embviz.compressors import (
    AECompressor,
    DirectionMetric,
    MixedPrecisionRows,
    QuantizedLowRank,
    RowWeights,
    SVDCompressor,
    compressor_from_config,
    get_method,
    make_compressor,
    method_ids,
)
from embviz.compressors.quantize import (
    MIXED_BITS,
    allocate_bits,
    dequantize_mixed,
    mixed_rows_bytes,
    pack_subbyte,
    row_bytes,
    unpack_subbyte,
)
from embviz.corpora import load_texts
from embviz.errors import BadInputError
from embviz.evaluation import plan_sweep
from embviz.frequency import (
    DEFAULT_WEIGHT_SOURCE,
    WEIGHT_SOURCES,
    frequency_weights,
    generated_counts,
    spelled_word,
    train_counts,
    wordfreq_counts,
)
from embviz.frontier import frontier
from embviz.metrics import line_break_ids, token_frequencies
from embviz.vocab import find_token


def _matrix(rows: int = 200, cols: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator) * torch.linspace(2.0, 0.3, cols)


def _skewed_weights(rows: int = 200, heavy: int = 10) -> RowWeights:
    values = torch.ones(rows)
    values[:heavy] = 1000.0
    return RowWeights(values, source="test")


def _weighted_error(matrix: torch.Tensor, approx: torch.Tensor, weights: RowWeights) -> float:
    return float((weights.values * ((matrix - approx).double() ** 2).sum(dim=1)).sum())


# -- row weights -----------------------------------------------------------------------------------------
def test_row_weights_are_normalised_and_validated() -> None:
    weights = RowWeights(torch.tensor([1.0, 3.0]), source="x")
    assert torch.allclose(weights.values, torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert weights.describe() == {"source": "x", "power": 1.0, "sha256": weights.sha256}
    for bad in ([0.0, 0.0], [1.0, -1.0], [1.0, float("nan")], []):
        with pytest.raises(BadInputError):
            RowWeights(torch.tensor(bad), source="x")
    with pytest.raises(BadInputError):
        weights.check(3)


def test_frequency_weights_count_train_slices(tiny_causal: Backbone) -> None:
    counts = train_counts(tiny_causal)
    weights = frequency_weights(tiny_causal, source="corpora")
    assert counts.shape == (tiny_causal.vocab_size,) and counts.sum() > 0
    expected = torch.from_numpy(counts).double() + 1
    assert torch.allclose(weights.values, expected / expected.mean())
    assert "train slices" in weights.source


@pytest.mark.parametrize("tiny_backbone", ["causal", "masked"], indirect=True)
def test_train_counts_read_a_corpus_as_lines_joined_by_line_breaks(tiny_backbone: Backbone) -> None:
    """Each join of two units is one line break, as the model reads the text; BERT has no line-break token."""
    own = token_frequencies(tiny_backbone.tokenizer, load_texts("smollm", "train"), len(tiny_backbone.tokens))
    counts = train_counts(tiny_backbone, ("smollm",))
    line_break = line_break_ids(tiny_backbone.tokenizer, tiny_backbone.vocab_size)
    added = counts - own[: tiny_backbone.vocab_size]
    if tiny_backbone.kind == "causal":
        assert line_break and added[line_break].tolist() == [len(load_texts("smollm", "train")) - 1]
        assert added.sum() == added[line_break].sum()
        general = frequency_weights(tiny_backbone).values  # off the add-one floor wordfreq leaves it at
        assert general[line_break[0]] > 100 * general.min()
    else:
        assert line_break == [] and not added.any()


@pytest.mark.parametrize(
    ("tiny_backbone", "common", "rare"),
    [("causal", "that", "alter"), ("masked", "there", "alteration")],
    indirect=["tiny_backbone"],
)
def test_wordfreq_weights_never_see_the_corpora(
    tiny_backbone: Backbone, common: str, rare: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert set(WEIGHT_SOURCES) == {"general", "wordfreq", "corpora"}
    weights = frequency_weights(tiny_backbone, source="wordfreq")
    values = weights.check(tiny_backbone.vocab_size)
    assert values.shape == (tiny_backbone.vocab_size,) and bool((values > 0).all())
    assert "wordfreq" in weights.source and "train slices" not in weights.source
    # common words (and the pieces of " the") above rare ones, on the model's own tokenizer
    tokens = tiny_backbone.tokens
    assert values[find_token(tokens, common)] > 10 * values[find_token(tokens, rare)]
    the = tiny_backbone.tokenizer(" the", add_special_tokens=False)["input_ids"]
    assert all(values[i] > torch.quantile(values, 0.9) for i in the)
    # deterministic: from the memo, and computed afresh into another cache; unlike the corpora's counts
    assert frequency_weights(tiny_backbone, source="wordfreq").sha256 == weights.sha256
    small = wordfreq_counts(tiny_backbone, top_n=2000)  # (fewer words: fast)
    monkeypatch.setattr(frequency, "_WORDFREQ_MEMO", {})
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "other-home"))
    assert (wordfreq_counts(tiny_backbone, top_n=2000) == small).all() and (small >= 0).all()
    assert list((tmp_path / "other-home").rglob("wordfreq-en-*.npz"))  # cached per vocabulary
    corpora = frequency_weights(tiny_backbone, source="corpora")
    assert corpora.source != weights.source and corpora.describe() != weights.describe()
    with pytest.raises(BadInputError, match="weights source"):
        frequency_weights(tiny_backbone, source="bible")  # type: ignore[arg-type]


@pytest.mark.parametrize("tiny_backbone", ["causal", "masked"], indirect=True)
def test_the_default_weights_add_generated_text_for_what_wordfreq_does_not_list(
    tiny_backbone: Backbone,
) -> None:
    """``general`` = wordfreq's words + the generated text's tokens (per million each): line breaks and quotes,
    which wordfreq leaves at the add-one floor, count; the generated text is the only corpus it reads."""
    assert DEFAULT_WEIGHT_SOURCE == "general"
    general, words = frequency_weights(tiny_backbone), frequency_weights(tiny_backbone, source="wordfreq")
    counts = wordfreq_counts(tiny_backbone) + generated_counts(tiny_backbone)
    expected = torch.from_numpy(counts) + 1
    assert torch.allclose(general.values, expected / expected.mean())
    generated = train_counts(tiny_backbone, ("smollm",))
    assert generated_counts(tiny_backbone).sum() == pytest.approx(1e6)
    assert (generated_counts(tiny_backbone) > 0).sum() == (generated > 0).sum()
    assert "model-generated text" in general.source and "smollm:train" in general.source
    (mark,) = tiny_backbone.tokenizer("?", add_special_tokens=False)["input_ids"]
    assert float(words.values[mark]) == pytest.approx(float(words.values.min()))  # wordfreq lists no "?"
    assert float(general.values[mark]) > 100 * float(general.values.min())


def test_spelled_word_strips_word_boundary_markers() -> None:
    spelled = [spelled_word(token) for token in ("Ġthe", "▁King", "##ing", "THE", "Ċ")]
    assert spelled == ["the", "king", "ing", "the", "ċ"]


# -- weighted SVD ----------------------------------------------------------------------------------------
def test_uniform_weights_give_the_plain_svd() -> None:
    matrix = _matrix()
    plain = SVDCompressor(4).fit(matrix)
    uniform = SVDCompressor(4, row_weights=RowWeights(torch.full((200,), 7.0), source="u")).fit(matrix)
    torch.testing.assert_close(uniform.reconstruct(), plain.reconstruct(), atol=1e-5, rtol=0)
    assert uniform.method == "svd-freq" and "row_weights" in uniform.config


def test_weighted_svd_is_the_optimum_of_the_weighted_error() -> None:
    matrix, weights = _matrix(), _skewed_weights()
    weighted = SVDCompressor(3, row_weights=weights).fit(matrix)
    plain = SVDCompressor(3).fit(matrix)
    # The closed form: truncated SVD of sqrt(W) E, un-weighted (codes are each row's projection).
    scaled = matrix.double() * weights.values.sqrt().unsqueeze(1)
    _, _, vh = torch.linalg.svd(scaled, full_matrices=False)
    basis = vh[:3].T
    optimum = (matrix.double() @ basis @ basis.T).float()
    assert _weighted_error(matrix, weighted.reconstruct(), weights) == pytest.approx(
        _weighted_error(matrix, optimum, weights), rel=1e-5
    )
    assert _weighted_error(matrix, weighted.reconstruct(), weights) < _weighted_error(
        matrix, plain.reconstruct(), weights
    )
    # The heavy rows are reconstructed much better than by the plain SVD.
    heavy = slice(0, 10)
    assert (matrix[heavy] - weighted.reconstruct()[heavy]).norm() < (
        matrix[heavy] - plain.reconstruct()[heavy]
    ).norm()


def test_randomised_svd_refuses_weights() -> None:
    with pytest.raises(BadInputError):
        SVDCompressor(3, randomized=True, row_weights=_skewed_weights())


# -- weighted AE -----------------------------------------------------------------------------------------
def test_weighted_ae_favours_heavy_rows_and_is_deterministic() -> None:
    matrix, weights = _matrix(), _skewed_weights()
    options = {"epochs": 3, "batch_size": 32, "loss": "mse"}
    weighted = AECompressor(3, row_weights=weights, **options).fit(matrix)
    again = AECompressor(3, row_weights=weights, **options).fit(matrix)
    plain = AECompressor(3, **options).fit(matrix)
    assert torch.equal(weighted.codes, again.codes)
    assert weighted.method == "ae-mse-freq" and "frequency-weighted" in weighted.label
    heavy = slice(0, 10)
    assert (matrix[heavy] - weighted.reconstruct()[heavy]).norm() < (
        matrix[heavy] - plain.reconstruct()[heavy]
    ).norm()


def test_elu_ae_method_id_is_non_linear() -> None:
    compressor = make_compressor("ae-paper-elu", 3, epochs=1, batch_size=64)
    compressed = compressor.fit(_matrix())
    assert compressed.method == "ae-paper-elu" and compressed.decoder_activation == "elu"
    assert compressed.params == make_compressor("ae-paper", 3).fit(_matrix()).params  # same budget


# -- packing and mixed precision ---------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "columns"), [(2, 1), (2, 7), (2, 8), (4, 5)])
def test_subbyte_packing_round_trips(bits: int, columns: int) -> None:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    codes = torch.randint(low, high, (9, columns), generator=torch.Generator().manual_seed(2)).to(torch.int8)
    packed = pack_subbyte(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (9, row_bytes(columns, bits))
    assert torch.equal(unpack_subbyte(packed, bits, columns), codes)


def test_allocation_fits_the_budget_and_prefers_heavy_rows() -> None:
    errors = torch.tensor([[0.0, 1.0, 4.0]] * 6, dtype=torch.float64)
    weights = torch.tensor([100.0, 1, 1, 1, 1, 1])
    costs = torch.tensor([8.0, 4.0, 2.0])
    choice = allocate_bits(errors, weights, costs, budget=6 * 2 + 6)
    assert float(costs[choice].sum()) <= 18
    assert int(choice[0]) == 0  # the heavy row gets the widest codes
    assert torch.equal(allocate_bits(errors, weights, costs, budget=1e9), torch.zeros(6, dtype=torch.long))
    with pytest.raises(BadInputError):
        allocate_bits(errors, weights, costs, budget=11)


@pytest.mark.parametrize("ratio", [2.0, 4.0, 6.5])
def test_mixed_rows_meet_the_byte_budget_exactly_counted(ratio: float, tmp_path) -> None:
    matrix, weights = _matrix(300, 10), _skewed_weights(300, heavy=20)
    compressed = MixedPrecisionRows(ratio, weights).fit(matrix)
    assert compressed.bytes == mixed_rows_bytes(compressed.qbits, 10)
    assert compressed.bytes <= 4 * 300 * 10 / ratio and compressed.byte_ratio >= ratio
    assert compressed.qcodes.numel() + 300 * 3 == compressed.bytes  # the buffer is what is counted
    assert set(compressed.qbits.unique().tolist()) <= set(MIXED_BITS)
    heavy_bits = compressed.qbits[:20].float().mean()
    assert heavy_bits >= compressed.qbits[20:].float().mean()
    restored = dequantize_mixed(compressed.qcodes, compressed.qscales, compressed.qbits, 10)
    assert torch.equal(restored, compressed.dense)
    save_artifact(tmp_path / "m", compressed, "tiny", "f" * 64)
    loaded = load_artifact(tmp_path / "m", "f" * 64)
    assert torch.equal(loaded.reconstruct(), compressed.reconstruct()) and loaded.bytes == compressed.bytes
    assert torch.equal(loaded.qbits, compressed.qbits)


def test_mixed_rows_beat_uniform_int4_at_its_own_size() -> None:
    matrix, weights = _matrix(400, 16), _skewed_weights(400, heavy=40)
    int4 = make_compressor("quant-int4", None).fit(matrix)
    mixed = MixedPrecisionRows(int4.byte_ratio, weights).fit(matrix)
    assert mixed.bytes <= int4.bytes
    assert _weighted_error(matrix, mixed.dense, weights) < _weighted_error(matrix, int4.dense, weights)


def test_mixed_rows_refuse_impossible_budgets() -> None:
    with pytest.raises(BadInputError):
        MixedPrecisionRows(9.0, _skewed_weights()).fit(_matrix())  # 12 columns: at most 8x
    with pytest.raises(BadInputError):
        MixedPrecisionRows(1.0, _skewed_weights())
    with pytest.raises(ValueError):
        dequantize_mixed(
            torch.zeros(3, dtype=torch.uint8), torch.zeros(2).half(), torch.tensor([8, 4]).byte(), 4
        )


# -- registry and sweep plan -----------------------------------------------------------------------------
def test_registry_builds_every_frequency_method_and_rebuilds_it_from_config() -> None:
    weights = _skewed_weights()
    for method in method_ids(needs_row_weights=True):
        by_bytes = get_method(method).sizing == "bytes"
        options = {"ratio": 4.0} if by_bytes else {}
        if get_method(method).needs_direction_metric:
            options["direction_metric"] = DirectionMetric.euclidean(12)
        compressor = make_compressor(method, None if by_bytes else 3, row_weights=weights, **options)
        assert compressor.method == method and get_method(method).label
        metric = {key: value for key, value in options.items() if key == "direction_metric"}
        rebuilt = compressor_from_config(compressor.get_config(), row_weights=weights, **metric)
        assert rebuilt.get_config() == compressor.get_config()
        with pytest.raises(BadInputError):
            make_compressor(method, 3)  # no weights
    with pytest.raises(BadInputError):
        make_compressor("svd", 3, row_weights=weights)


@pytest.mark.parametrize("method", ["svd-freq-int8", "ae-paper-int8"])
def test_quantised_low_rank_wraps_any_low_rank_base(method: str) -> None:
    matrix = _matrix()
    options = {"row_weights": _skewed_weights()} if "freq" in method else {"epochs": 1, "batch_size": 64}
    compressed = make_compressor(method, 3, **options).fit(matrix)
    bias = compressed.decoder_bias is not None
    assert bias == method.startswith("ae")
    assert compressed.bytes == QuantizedLowRank.stored_bytes(200, 12, 3, 8, decoder_bias=bias)
    assert compressed.config["base"]["method"] == method.removesuffix("-int8")


def test_sweep_plan_sizes_mixed_rows_by_bytes_and_needs_ratios(tiny_causal: Backbone) -> None:
    jobs = plan_sweep(tiny_causal, ["quant-mixed", "svd-freq"], [4.0, 8.0], None, "fast")
    assert [(job.method, job.target_ratio) for job in jobs][:2] == [
        ("quant-mixed", 4.0),
        ("quant-mixed", 8.0),
    ]
    with pytest.raises(BadInputError):
        plan_sweep(tiny_causal, ["quant-mixed"], None, [3], "fast")
    with pytest.raises(BadInputError, match="at most"):
        plan_sweep(tiny_causal, ["quant-mixed", "svd"], [4.0, 20.0], None, "fast")  # refused before any fit
    with pytest.raises(BadInputError):
        plan_sweep(tiny_causal, ["svd"], [2.0], None, "fast", by="flops")


def test_sweep_plan_takes_the_weights_source(tiny_causal: Backbone) -> None:
    plans = {
        source: plan_sweep(tiny_causal, ["svd-freq"], None, [4], "fast", weights=source)
        for source in WEIGHT_SOURCES
    }
    sources = {
        source: plan[0].compressor.get_config()["row_weights"]["source"] for source, plan in plans.items()
    }
    assert "wordfreq" in sources["wordfreq"] and "train slices" in sources["corpora"]
    default = plan_sweep(tiny_causal, ["svd-freq"], None, [4], "fast")[0].compressor.get_config()
    assert default["row_weights"]["source"] == sources["general"]


def test_frontier_marks_pareto_optimal_rows() -> None:
    rows = [
        {"bytes": 100, "perplexity": 10.0},
        {"bytes": 50, "perplexity": 12.0},
        {"bytes": 60, "perplexity": 13.0},  # dominated by the 50-byte row
        {"bytes": 25, "perplexity": 40.0},
        {"bytes": 30, "perplexity": None},
    ]
    assert frontier(rows) == [True, True, False, True, False]
