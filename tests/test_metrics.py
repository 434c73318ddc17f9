from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from embviz import metrics
from embviz.backbones import Backbone, reserved_token_ids
from embviz.cache import cache_dir
from embviz.compressors.base import CompressedEmbedding
from embviz.errors import BadInputError
from embviz.metrics import (
    FREQUENCY_BANDS,
    TOKEN_CLASSES,
    detect_convention,
    factor_embedding,
    frequency_bands,
    frequency_thresholds,
    nearest_neighbours,
    neighbour_comparison,
    neighbour_table_cached,
    recall_at_k,
    reconstruction_angles,
    sampled_recall,
    summary,
    token_classes,
    token_frequencies,
)
from embviz.progress import Progress


def _random(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _low_rank(matrix: torch.Tensor, rank: int, bias: bool) -> CompressedEmbedding:
    """A truncated-SVD-like variant; with ``bias`` a random decoder bias is added."""
    _, eigenvectors = torch.linalg.eigh(matrix.double().T @ matrix.double())
    top = eigenvectors[:, -rank:].float()
    decoder_bias = _random(1, matrix.shape[1], seed=7)[0] * 0.3 if bias else None
    return CompressedEmbedding(
        "svd", {"rank": rank}, codes=matrix @ top, decoder=top.T.contiguous(), decoder_bias=decoder_bias
    )


def _brute_force(matrix: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    unit = torch.nn.functional.normalize(matrix.double(), dim=1)
    cosine = unit @ unit.T
    cosine.fill_diagonal_(-np.inf)
    top = cosine.topk(k, dim=1)
    return top.indices.numpy(), top.values.numpy()


def _same_sets(a: np.ndarray, b: np.ndarray) -> float:
    return recall_at_k(a, b).mean


# -- angles -------------------------------------------------------------------------------------------------
def test_angles_are_zero_for_identity_and_ninety_for_orthogonal_rows() -> None:
    matrix = _random(50, 8)
    angles, ratio = reconstruction_angles(matrix, matrix.clone())
    np.testing.assert_allclose(angles, 0, atol=1e-6)
    np.testing.assert_allclose(ratio, 1, atol=1e-12)

    eye = torch.eye(4)
    rotated = torch.roll(eye, 1, dims=1) * 3  # every row orthogonal to the original, three times as long
    angles, ratio = reconstruction_angles(eye, rotated)
    np.testing.assert_allclose(angles, 90, atol=1e-9)
    np.testing.assert_allclose(ratio, 3)


def test_angles_match_arccos_of_the_cosine_blockwise() -> None:
    matrix, variant = _random(300, 16), _random(300, 16, seed=1)
    compressed = CompressedEmbedding("dense", {}, dense=variant)
    angles, ratio = reconstruction_angles(matrix, compressed, block_rows=64)
    cosine = torch.nn.functional.cosine_similarity(matrix.double(), variant.double(), dim=1)
    np.testing.assert_allclose(angles, np.degrees(np.arccos(cosine.numpy())), atol=1e-6)
    np.testing.assert_allclose(ratio, (variant.norm(dim=1) / matrix.norm(dim=1)).numpy(), rtol=1e-5)


def test_zero_rows_give_nan_not_errors() -> None:
    matrix = torch.ones(3, 4)
    variant = matrix.clone()
    matrix[0] = 0
    variant[1] = 0
    angles, ratio = reconstruction_angles(matrix, variant)
    assert np.isnan(angles[0]) and np.isnan(angles[1]) and angles[2] == 0
    assert np.isnan(ratio[0]) and ratio[1] == 0 and ratio[2] == 1


def test_angles_refuse_mismatched_shapes() -> None:
    with pytest.raises(BadInputError, match="shapes differ"):
        reconstruction_angles(torch.ones(3, 4), torch.ones(3, 5))


# -- neighbours ---------------------------------------------------------------------------------------------
def test_neighbours_match_brute_force_reference() -> None:
    matrix = _random(500, 16)
    indices, scores = nearest_neighbours(matrix, 10, block_rows=96)
    reference_indices, reference_scores = _brute_force(matrix, 10)
    assert indices.shape == scores.shape == (500, 10)
    assert indices.dtype == np.int32 and scores.dtype == np.float32
    np.testing.assert_array_equal(indices, reference_indices)
    np.testing.assert_allclose(scores, reference_scores, atol=1e-5)
    assert not (indices == np.arange(500)[:, None]).any()  # never the token itself
    assert (np.diff(scores, axis=1) <= 0).all()


def test_neighbours_accept_numpy_and_report_progress() -> None:
    seen: list[Progress] = []
    indices, _ = nearest_neighbours(_random(100, 8).numpy(), 3, block_rows=30, progress=seen.append)
    assert indices.shape == (100, 3) and seen[-1].fraction == 1.0 and len(seen) == 4


@pytest.mark.parametrize("bias", [False, True])
def test_factor_scores_equal_dense_scores(bias: bool) -> None:
    matrix = _random(400, 24)
    variant = _low_rank(matrix, 6, bias)
    gram = factor_embedding(variant)
    reconstruction = variant.reconstruct().double()
    torch.testing.assert_close(gram @ gram.T, reconstruction @ reconstruction.T, atol=1e-3, rtol=1e-4)

    fast_indices, fast_scores = nearest_neighbours(variant, 10, method="factors")
    dense_indices, dense_scores = nearest_neighbours(variant, 10, method="dense")
    np.testing.assert_allclose(fast_scores, dense_scores, atol=1e-5)
    assert _same_sets(fast_indices, dense_indices) > 0.999  # equal up to exact ties
    assert _same_sets(fast_indices, _brute_force(variant.reconstruct(), 10)[0]) > 0.999


def test_factors_handle_a_bias_inside_the_decoder_row_space() -> None:
    matrix = _random(200, 12)
    variant = _low_rank(matrix, 4, bias=False)
    variant.decoder_bias = variant.decoder[0] * 2  # M M^T is singular: Cholesky would fail
    fast = nearest_neighbours(variant, 5, method="factors")
    dense = nearest_neighbours(variant, 5, method="dense")
    np.testing.assert_allclose(fast[1], dense[1], atol=1e-5)


def test_neighbour_method_errors() -> None:
    with pytest.raises(BadInputError, match="linear low-rank"):
        nearest_neighbours(_random(20, 4), 3, method="factors")
    with pytest.raises(BadInputError, match="linear low-rank"):
        nearest_neighbours(CompressedEmbedding("q", {}, dense=_random(20, 4)), 3, method="factors")
    with pytest.raises(BadInputError, match="k must be"):
        nearest_neighbours(_random(5, 4), 5)


def test_neighbours_of_some_rows_equal_those_rows_of_the_full_table() -> None:
    matrix = _random(300, 12)
    matrix[7] = matrix[3]  # an exact duplicate may outrank the row itself; the row is still dropped
    full_indices, full_scores = nearest_neighbours(matrix, 6)
    rows = np.array([0, 3, 7, 150, 299])
    indices, scores = nearest_neighbours(matrix, 6, rows=rows)
    np.testing.assert_allclose(scores, full_scores[rows], atol=1e-6)
    assert _same_sets(indices, full_indices[rows]) == 1.0
    assert not (indices == rows[:, None]).any()
    assert 7 in indices[1] and 3 in indices[2]
    with pytest.raises(BadInputError, match="rows must be token ids"):
        nearest_neighbours(matrix, 6, rows=np.array([300]))


def test_sampled_recall_estimates_the_full_recall_within_its_margin() -> None:
    matrix = _random(2000, 16)
    original, _ = nearest_neighbours(matrix, 10)
    variant = _low_rank(matrix, 6, bias=False)
    exact = recall_at_k(original, nearest_neighbours(variant, 10)[0])
    estimate = sampled_recall(original, variant, 400, seed=3)
    assert len(estimate.ids) == len(set(estimate.ids.tolist())) == 400
    np.testing.assert_allclose(estimate.per_token, exact.per_token[estimate.ids])
    assert 0 < estimate.standard_error < 0.05
    assert abs(estimate.mean - exact.mean) <= 3 * estimate.standard_error
    everything = sampled_recall(original, variant, 5000)
    assert everything.mean == pytest.approx(exact.mean) and everything.standard_error == 0.0
    with pytest.raises(BadInputError, match="rows"):
        sampled_recall(original, matrix[:10])


def test_recall_is_one_for_identical_matrix_and_matches_set_overlap() -> None:
    matrix = _random(300, 16)
    indices, _ = nearest_neighbours(matrix, 10)
    same, _ = nearest_neighbours(matrix.clone(), 10)
    result = recall_at_k(indices, same)
    assert result.mean == 1.0 and (result.per_token == 1).all()

    other, _ = nearest_neighbours(_low_rank(matrix, 4, bias=False), 10)
    expected = [len(set(a) & set(b)) / 10 for a, b in zip(indices, other, strict=True)]
    recall = recall_at_k(indices, other, block_rows=37)
    np.testing.assert_allclose(recall.per_token, expected)
    assert recall.mean == pytest.approx(np.mean(expected))
    with pytest.raises(BadInputError):
        recall_at_k(indices, other[:, :5])


def test_neighbour_comparison_marks_kept_lost_new() -> None:
    original_indices = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    original_scores = np.array([[0.9, 0.8, 0.7]] * 4, dtype=np.float32)
    variant_indices = np.array([[3, 2, 4], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    variant_scores = np.array([[0.95, 0.85, 0.5]] * 4, dtype=np.float32)
    rows = neighbour_comparison(
        original_indices, original_scores, variant_indices, variant_scores, 0, tokens=list("abcde")
    )
    assert [(r["token"], r["status"]) for r in rows] == [
        ("b", "lost"),
        ("c", "kept"),
        ("d", "kept"),
        ("e", "new"),
    ]
    assert rows[0]["variant_rank"] is None and rows[0]["original_rank"] == 1
    assert rows[2]["variant_rank"] == 1 and rows[2]["variant_score"] == pytest.approx(0.95)
    assert rows[3]["original_score"] is None and rows[3]["variant_rank"] == 3
    json.dumps(rows)


# -- cache --------------------------------------------------------------------------------------------------
def _cache_files() -> list[Path]:
    return sorted((cache_dir("neighbours")).glob("*.npz"))


def test_neighbour_table_is_cached_on_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = _random(120, 8)
    first = neighbour_table_cached("tiny/model", None, matrix, 5)
    assert len(_cache_files()) == 1 and _cache_files()[0].name.startswith("tiny_model-k5-")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed instead of loading the cache")

    monkeypatch.setattr(metrics, "neighbour_search", fail)
    second = neighbour_table_cached("tiny/model", None, matrix, 5)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    with pytest.raises(AssertionError, match="recomputed"):  # another k is another entry
        neighbour_table_cached("tiny/model", None, matrix, 6)


def test_variant_tables_are_cached_too() -> None:
    matrix = _random(150, 10)
    svd = _low_rank(matrix, 3, bias=True)
    indices = neighbour_table_cached("tiny-svd", None, svd, 4).indices
    np.testing.assert_array_equal(indices, nearest_neighbours(svd, 4)[0])
    neighbour_table_cached("tiny-svd", None, _low_rank(matrix, 2, bias=True), 4)
    assert len(_cache_files()) == 2


def test_variant_fingerprints_see_every_stored_part() -> None:
    matrix = _random(40, 6)
    svd = _low_rank(matrix, 3, bias=True)
    prints = {
        metrics.variant_fingerprint(svd),
        metrics.variant_fingerprint(_low_rank(matrix, 3, bias=False)),
        metrics.variant_fingerprint(CompressedEmbedding("svd", {}, codes=svd.codes, decoder=svd.decoder,
                                                        decoder_bias=svd.decoder_bias, decoder_activation="elu")),
        metrics.variant_fingerprint(matrix),
        metrics.variant_fingerprint(matrix * 2),
    }  # fmt: skip
    assert len(prints) == 5
    assert metrics.variant_fingerprint(svd) == metrics.variant_fingerprint(_low_rank(matrix, 3, bias=True))
    assert metrics.variant_fingerprint(matrix.numpy()) == metrics.variant_fingerprint(matrix)


@pytest.mark.parametrize("damage", ["garbage", "wrong_shape"])
def test_corrupt_neighbour_cache_is_recomputed(damage: str) -> None:
    matrix = _random(120, 8)
    first = neighbour_table_cached("m", "fp-1", matrix, 5)
    (path,) = _cache_files()
    if damage == "garbage":
        path.write_bytes(b"not a zip file")
    else:
        np.savez(path, indices=first[0][:, :3], scores=first[1][:, :3])
    again = neighbour_table_cached("m", "fp-1", matrix, 5)
    np.testing.assert_array_equal(first[0], again[0])
    with np.load(path, allow_pickle=False) as replaced:  # the bad file was replaced
        assert replaced["indices"].shape == (120, 5)


# -- token classes ------------------------------------------------------------------------------------------
def test_token_classes_wordpiece_convention() -> None:
    tokens = ["[PAD]", "[unused3]", "the", "##ing", "42", "##7", "1,200", ",", "##.", "привет", "日本", "x"]
    labels = token_classes(tokens, special_ids=[0])
    assert detect_convention(tokens * 10) == "wordpiece"
    expected = ["special", "special", "word", "subword", "digits", "digits", "digits", "punctuation"]
    expected += ["punctuation", "non-latin", "non-latin", "word"]
    assert labels.tolist() == expected


def test_token_classes_byte_level_bpe_convention() -> None:
    tokens = ["<|endoftext|>", "Ġthe", "ing", "Ġ", "ĠĠĠ", "Ċ", "Â", "ĠÐ¿", "Ġ2024", "!", "ĠðŁĺ", "Hello"]
    labels = token_classes(tokens, special_ids=[], convention="byte-bpe")
    # "ĠÐ¿" is " п" (Cyrillic); "ĠðŁĺ" is three bytes of a four-byte emoji.
    expected = ["special", "word", "subword", "byte", "byte", "byte", "byte", "non-latin", "digits"]
    expected += ["punctuation", "byte", "subword"]
    assert labels.tolist() == expected
    assert detect_convention(["Ġa", "b"] * 10) == "byte-bpe"


def test_token_classes_sentencepiece_and_plain() -> None:
    tokens = ["<0x0A>", "▁the", "ing", "▁", "▁über"]
    assert token_classes(tokens, convention="sentencepiece").tolist() == [
        "byte",
        "word",
        "subword",
        "byte",
        "word",
    ]
    assert detect_convention(["a", "b"]) == "plain"


def test_reserved_token_ids_include_added_special_tokens(tiny_causal: Backbone) -> None:
    reserved = reserved_token_ids(tiny_causal.tokenizer)
    assert reserved >= set(tiny_causal.special_ids)
    fake = types.SimpleNamespace(
        all_special_ids=[0],
        added_tokens_decoder={0: types.SimpleNamespace(special=True), 5: types.SimpleNamespace(special=True),
                              6: types.SimpleNamespace(special=False)},
    )  # fmt: skip
    assert reserved_token_ids(fake) == {0, 5}


def test_token_classes_on_tiny_tokenizers(tiny_masked: Backbone, tiny_causal: Backbone) -> None:
    for backbone, convention in ((tiny_masked, "wordpiece"), (tiny_causal, "byte-bpe")):
        tokens = backbone.tokens
        assert detect_convention(tokens) == convention
        labels = token_classes(tokens, backbone.special_ids)
        assert labels.shape == (len(tokens),) and set(labels) <= set(TOKEN_CLASSES)
        assert all(labels[i] == "special" for i in backbone.special_ids)
        by_token = dict(zip(tokens, labels, strict=True))
        assert {"word", "subword", "punctuation", "digits"} <= set(labels)
        if convention == "wordpiece":
            assert by_token["the"] == "word" and by_token["##ing"] == "subword"
        else:
            assert by_token["Ġthe"] == "word" and by_token["ing"] == "subword" and by_token["Ġ"] == "byte"


# -- frequencies --------------------------------------------------------------------------------------------
def test_token_frequencies_count_ids(tiny_causal: Backbone) -> None:
    texts = ["the king", "the queen the"]
    counts = token_frequencies(tiny_causal.tokenizer, texts, tiny_causal.vocab_size, batch_size=1)
    expected = np.zeros(tiny_causal.vocab_size, dtype=np.int64)
    for text in texts:
        for token_id in tiny_causal.tokenizer(text, add_special_tokens=False)["input_ids"]:
            expected[token_id] += 1
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() > 0


def test_frequency_bands_by_quantiles_of_seen_counts() -> None:
    counts = np.array([0, 0, *range(1, 11)])
    low, high = frequency_thresholds(counts)
    assert (low, high) == (5.5, 9.1)
    bands = frequency_bands(counts)
    assert bands.tolist() == ["unseen"] * 2 + ["rare"] * 5 + ["medium"] * 4 + ["frequent"]
    assert set(frequency_bands(np.zeros(4, dtype=int))) == {"unseen"}
    assert set(bands) <= set(FREQUENCY_BANDS)


def test_corpus_frequencies_are_cached(monkeypatch: pytest.MonkeyPatch, tiny_masked: Backbone) -> None:
    texts = ("the king of france", "the queen")
    monkeypatch.setattr("embviz.corpora.load_texts", lambda name, split: texts)
    first = metrics.corpus_frequencies(tiny_masked.tokenizer, tiny_masked.tokens, "bible", "train")
    assert first.sum() > 0

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("recounted")

    monkeypatch.setattr(metrics, "token_frequencies", fail)
    second = metrics.corpus_frequencies(tiny_masked.tokenizer, tiny_masked.tokens, "bible", "train")
    np.testing.assert_array_equal(first, second)


# -- summary ------------------------------------------------------------------------------------------------
def test_summary_is_json_ready_with_group_breakdown() -> None:
    angles = np.array([10.0, 20.0, np.nan, 40.0])
    ratio = np.array([1.0, 0.5, np.nan, 1.0])
    recall = np.array([1.0, 0.5, 0.0, 0.5])
    classes = np.array(["word", "word", "special", "digits"])
    result = summary(angles, ratio, recall, groups={"class": classes}, k=10, method="svd")
    assert result["k"] == 10 and result["count"] == 4
    assert result["mean_angle"] == pytest.approx(70 / 3) and result["median_angle"] == 20
    assert result["recall"] == 0.5
    assert result["by_class"]["word"] == {
        "count": 2,
        "mean_angle": 15.0,
        "median_angle": 15.0,
        "mean_norm_ratio": 0.75,
        "recall": 0.75,
    }
    assert result["by_class"]["special"]["mean_angle"] is None
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("bias", [False, True])
def test_cross_neighbours_factors_equal_dense_and_brute_force(bias: bool) -> None:
    matrix = _random(300, 20)
    variant = _low_rank(matrix, 5, bias)
    fast_indices, fast_scores = metrics.cross_neighbours(variant, matrix, 8, method="factors")
    dense_indices, dense_scores = metrics.cross_neighbours(variant, matrix, 8, method="dense", block_rows=70)
    unit_q = torch.nn.functional.normalize(variant.reconstruct().double(), dim=1)
    unit_k = torch.nn.functional.normalize(matrix.double(), dim=1)
    reference = (unit_q @ unit_k.T).topk(8, dim=1)
    np.testing.assert_allclose(fast_scores, reference.values.numpy(), atol=1e-5)
    np.testing.assert_allclose(dense_scores, reference.values.numpy(), atol=1e-5)
    assert _same_sets(fast_indices, reference.indices.numpy()) > 0.999
    assert _same_sets(dense_indices, reference.indices.numpy()) > 0.999
    # nothing is excluded: a row's nearest original row is itself when the variant equals the original
    own, _ = metrics.cross_neighbours(matrix, matrix, 1)
    np.testing.assert_array_equal(own[:, 0], np.arange(300))


def test_two_stage_topk_is_exact_on_wide_blocks_with_ties() -> None:
    matrix = _random(3000, 8)
    matrix[1000:1010] = matrix[5]  # exact ties: ten copies of row 5
    indices, scores = nearest_neighbours(matrix, 12, block_rows=512)
    reference_indices, reference_scores = _brute_force(matrix, 12)
    np.testing.assert_allclose(scores, reference_scores, atol=1e-5)
    untied = np.ones(3000, dtype=bool)
    untied[[5, *range(1000, 1010)]] = False
    assert recall_at_k(indices[untied], reference_indices[untied]).mean > 0.999
    assert set(indices[5, :10]) == set(range(1000, 1010))


def test_a_non_linear_decoder_is_searched_densely() -> None:
    matrix = _random(200, 12)
    linear = _low_rank(matrix, 4, bias=True)
    elu = CompressedEmbedding("ae", {"rank": 4}, codes=linear.codes, decoder=linear.decoder,
                              decoder_bias=linear.decoder_bias, decoder_activation="elu")  # fmt: skip
    assert metrics.is_linear_low_rank(linear) and not metrics.is_linear_low_rank(elu)
    _, scores = nearest_neighbours(elu, 5)  # auto -> dense, since factors would be wrong here
    np.testing.assert_allclose(scores, _brute_force(elu.reconstruct(), 5)[1], atol=1e-5)
    with pytest.raises(BadInputError, match="linear"):
        nearest_neighbours(elu, 5, method="factors")


def test_group_means_skip_missing_values_and_empty_groups() -> None:
    from embviz.metrics import group_means

    values = np.array([1.0, 3.0, np.nan, 4.0])
    groups = np.array(["word", "word", "digit", "digit"])
    assert group_means(values, groups, ["word", "digit", "special"]) == {
        "word": 2.0,
        "digit": 4.0,
        "special": None,
    }


# -- approximate search ------------------------------------------------------------------------------------
def _clustered(rows: int, cols: int, clusters: int, seed: int = 0) -> torch.Tensor:
    """Rows around ``clusters`` centres, as real embeddings group (random Gaussian rows have no structure
    an index can use, and no vocabulary looks like that)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, cols))
    rows_ = centres[rng.integers(0, clusters, rows)] + 0.6 * rng.standard_normal((rows, cols))
    return torch.from_numpy(rows_.astype(np.float32))


def test_auto_search_is_exact_while_affordable_and_approximate_beyond() -> None:
    assert metrics.use_exact_search(49_152, 49_152, 576)  # SmolLM2's dense table: 2.8e12 flops
    assert not metrics.use_exact_search(128_000, 128_000, 2048)  # 6.7e13
    assert metrics.use_exact_search(128_000, 128_000, 2048, "exact")
    assert not metrics.use_exact_search(10, 10, 2, "approximate")
    assert metrics.use_exact_search(2048, 256_000, 4096)  # a sampled check stays exact at any size
    with pytest.raises(BadInputError, match="unknown neighbour search 'fast'"):
        metrics.use_exact_search(10, 10, 2, "fast")  # type: ignore[arg-type]


def test_an_approximate_table_reports_its_recall_against_exact_search() -> None:
    matrix = _clustered(6000, 64, 60)
    exact = metrics.neighbour_search(matrix, 10, search="exact")
    approximate = metrics.neighbour_search(matrix, 10, search="approximate")
    assert exact.quality is None and approximate.quality is not None
    assert approximate.indices.shape == (6000, 10) and approximate.indices.dtype == np.int32
    assert approximate.scores.dtype == np.float32
    assert not (approximate.indices == np.arange(6000)[:, None]).any()  # a row is never its own neighbour
    assert (np.diff(approximate.scores, axis=1) <= 1e-6).all()  # sorted by decreasing similarity
    true_recall = recall_at_k(exact.indices, approximate.indices).mean
    assert true_recall >= metrics.SEARCH_TARGET_RECALL - 0.02
    measured = approximate.quality.recall
    assert len(measured.ids) == metrics.SEARCH_CHECK_SAMPLE
    # The check sample's estimate covers the truth (three margins: float near-ties at rank k count too).
    assert abs(measured.mean - true_recall) <= 3 * measured.margin + 1e-3
    assert "PCA" in approximate.quality.method and "re-rank" in approximate.quality.method
    assert "recall@10 against exact search" in approximate.quality.describe(10)


def test_the_index_takes_more_candidates_then_more_directions_until_it_reaches_the_target() -> None:
    matrix = np.ascontiguousarray(metrics._unit_rows(_clustered(4000, 64, 40, seed=3)).numpy())
    index = metrics.ReducedSearch(matrix, 10, exclude_self=True)
    reached = index.calibration_recall >= metrics.SEARCH_TARGET_RECALL
    assert reached or (index.dims * 2 > 64 // 2 and index.k_factor == metrics.ReducedSearch.K_FACTORS[-1])
    exact = metrics.neighbour_search(torch.from_numpy(matrix), 10, search="exact", rows=index.calibration_ids)
    chosen = index.k_factor
    smaller = [k for k in metrics.ReducedSearch.K_FACTORS if k < chosen]
    if reached and smaller:  # the candidate count before it missed the target with these directions
        index.k_factor = smaller[-1]
        found, scores = index(matrix[index.calibration_ids], 11)
        fewer, _ = metrics._drop_own_ids(found, scores, index.calibration_ids, 10)
        assert recall_at_k(exact.indices, fewer).mean < metrics.SEARCH_TARGET_RECALL


def test_an_approximate_table_is_cached_with_its_measured_recall(monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = _clustered(3000, 16, 30)
    affordable, search = metrics.EXACT_SEARCH_FLOPS, metrics.neighbour_search
    monkeypatch.setattr(metrics, "EXACT_SEARCH_FLOPS", 1.0)  # nothing is affordable: auto goes approximate
    first = neighbour_table_cached("big", "fp", matrix, 5)
    assert first.quality is not None
    monkeypatch.setattr(metrics, "neighbour_search", lambda *a, **k: pytest.fail("recomputed"))
    again = neighbour_table_cached("big", "fp", matrix, 5)
    np.testing.assert_array_equal(first.indices, again.indices)
    assert first.quality is not None and again.quality is not None
    assert again.quality.method == first.quality.method
    np.testing.assert_array_equal(again.quality.recall.ids, first.quality.recall.ids)
    assert again.quality.recall.mean == pytest.approx(first.quality.recall.mean)
    assert again.quality.recall.margin == pytest.approx(first.quality.recall.margin)
    files = list(cache_dir("neighbours").glob("big-k5-*.npz"))
    assert len(files) == 1
    monkeypatch.setattr(metrics, "EXACT_SEARCH_FLOPS", affordable)
    monkeypatch.setattr(metrics, "neighbour_search", search)
    exact = neighbour_table_cached("big", "fp", matrix, 5)  # exact and approximate are different entries
    assert exact.quality is None
    assert len(list(cache_dir("neighbours").glob("big-k5-*.npz"))) == 2
