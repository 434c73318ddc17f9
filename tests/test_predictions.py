from __future__ import annotations

import json
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from embviz.backbones import Backbone
from embviz.errors import BadInputError
from embviz.predictions import (
    blank_pattern,
    kl_divergence,
    parse_blank,
    predict_blank,
    prediction_summary,
    prediction_table,
)

BLANK = blank_pattern()
no_blank_text = st.text(max_size=60).filter(lambda text: BLANK.search(text) is None)
markers = st.sampled_from(["___", "_____", "[MASK]", "[mask]", "<mask>", "<MASK>"])


# -- the blank parser ------------------------------------------------------------------------------------
@given(no_blank_text)
def test_text_without_a_blank_is_refused(text: str) -> None:
    with pytest.raises(BadInputError, match="no blank"):
        parse_blank(text)


@given(no_blank_text, markers, no_blank_text)
def test_one_blank_parses_and_reassembles(left: str, marker: str, right: str) -> None:
    sentence = left + marker + right
    blank = parse_blank(sentence)
    assert blank.text() == sentence
    assert BLANK.fullmatch(blank.marker)
    assert BLANK.search(blank.left) is None and BLANK.search(blank.right) is None


@given(no_blank_text, markers, no_blank_text, markers, no_blank_text)
def test_two_blanks_are_refused(a: str, first: str, b: str, second: str, c: str) -> None:
    sentence = a + first + b + " " + second + c  # the space keeps two underscore runs apart
    with pytest.raises(BadInputError, match="blanks"):
        parse_blank(sentence)


def test_tokenizer_mask_token_counts_as_a_blank() -> None:
    assert parse_blank("a <extra_id_0> b", "<extra_id_0>").marker == "<extra_id_0>"
    assert parse_blank("I went to the ___ to buy bread.").left == "I went to the "


# -- predictions on tiny models --------------------------------------------------------------------------
@pytest.mark.parametrize("sentence", ["no blank here", "two ___ blanks [MASK] here", ""])
def test_bad_sentences_are_clear_errors(tiny_backbone: Backbone, sentence: str) -> None:
    with pytest.raises(BadInputError, match="blank"):
        predict_blank(tiny_backbone, sentence)


@pytest.mark.parametrize("mode", ["input", "tied"])
def test_identity_variant_gives_the_original_top_k(tiny_backbone: Backbone, mode: str) -> None:
    result = predict_blank(
        tiny_backbone,
        "I went to the ___ to buy some bread.",
        {"identity": tiny_backbone.embedding.clone()},
        k=5,
        mode=mode,
    )
    original, identity = result.variants["original"], result.variants["identity"]
    assert list(result.variants) == ["original", "identity"]
    assert len(original.predictions) == 5
    assert [p.token_id for p in identity.predictions] == [p.token_id for p in original.predictions]
    assert [p.probability for p in identity.predictions] == [p.probability for p in original.predictions]
    assert identity.top1_kept and identity.reference_top1_rank == 1
    assert identity.kl_nats == 0.0 and original.kl_nats == 0.0
    assert not any(p.new for p in identity.predictions) and identity.lost == ()
    probabilities = [p.probability for p in original.predictions]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-9


def test_both_blank_styles_give_the_same_predictions(tiny_backbone: Backbone) -> None:
    underscores = predict_blank(tiny_backbone, "The king of ___ lived in a great palace.", k=5)
    mask = predict_blank(tiny_backbone, "The king of [MASK] lived in a great palace.", k=5)
    ids = [p.token_id for p in underscores.variants["original"].predictions]
    assert ids == [p.token_id for p in mask.variants["original"].predictions]


def test_a_changed_embedding_marks_new_and_lost_tokens(tiny_backbone: Backbone) -> None:
    noisy = tiny_backbone.embedding + torch.randn(
        tiny_backbone.embedding.shape, generator=torch.Generator().manual_seed(0)
    )
    result = predict_blank(
        tiny_backbone, "The ship sailed across the ___ to an island.", {"noisy": noisy}, k=5
    )
    reference = [p.token_id for p in result.variants["original"].predictions]
    noisy_result = result.variants["noisy"]
    for prediction in noisy_result.predictions:
        assert prediction.new == (prediction.token_id not in reference)
    assert len(noisy_result.lost) == sum(p.new for p in noisy_result.predictions)
    ranks = [p.token_id for p in noisy_result.predictions]
    expected_rank = ranks.index(reference[0]) + 1 if reference[0] in ranks else None
    assert noisy_result.reference_top1_rank == expected_rank
    assert noisy_result.top1_kept == (expected_rank == 1)
    assert noisy_result.kl_nats > 0.01
    assert result.to_dict()["variants"]["noisy"]["kl_nats"] == noisy_result.kl_nats


def test_kl_divergence_is_full_vocabulary_kl_with_zero_probability_entries() -> None:
    p = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0, float("-inf")]), dim=0)
    q = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0, float("-inf")]), dim=0)
    expected = float((p.exp()[:3] * (p[:3] - q[:3])).sum())
    assert kl_divergence(p, q) == pytest.approx(expected) and expected > 0
    assert kl_divergence(p, p) == 0.0


def test_causal_candidates_include_the_variants_own(tiny_causal: Backbone) -> None:
    noisy = tiny_causal.embedding + torch.randn(
        tiny_causal.embedding.shape, generator=torch.Generator().manual_seed(0)
    )
    sentence = "We ate apples, ___ and bread."
    result = predict_blank(tiny_causal, sentence, {"noisy": noisy}, candidates=20, variant_candidates=15)
    assert result.variants["original"].candidates == 20
    assert 20 < result.variants["noisy"].candidates <= 35
    assert "whole sentence" in result.method
    alone = predict_blank(tiny_causal, sentence, {"noisy": noisy}, candidates=20, variant_candidates=0)
    assert alone.variants["noisy"].candidates == 20


def test_shared_prefix_cache_matches_full_sentences(tiny_causal: Backbone, monkeypatch) -> None:
    variants = {"half": tiny_causal.embedding * 0.5}
    sentence = "The children played in the ___ until the sun went down."
    for mode in ("input", "tied"):
        cached = predict_blank(tiny_causal, sentence, variants, k=8, mode=mode)
        with monkeypatch.context() as patch:
            patch.setattr("embviz.predictions._cache_argument", lambda model: None)
            full = predict_blank(tiny_causal, sentence, variants, k=8, mode=mode)
        for name in variants.keys() | {"original"}:
            a, b = cached.variants[name].predictions, full.variants[name].predictions
            assert [p.token_id for p in a] == [p.token_id for p in b]
            assert [p.probability for p in a] == pytest.approx([p.probability for p in b], rel=1e-5)


def test_causal_scores_are_whole_sentence_log_likelihoods(tiny_causal: Backbone) -> None:
    tokenizer = tiny_causal.tokenizer
    result = predict_blank(tiny_causal, "The cat sat by the ___ wall.", k=3, candidates=10)
    left = tokenizer("The cat sat by the", add_special_tokens=False)["input_ids"]
    right = tokenizer(" wall.", add_special_tokens=False)["input_ids"]
    scores = {}
    predictions = result.variants["original"].predictions
    for prediction in predictions:
        ids = torch.tensor([[*left, prediction.token_id, *right]])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_causal.model(input_ids=ids).logits[0].double(), dim=-1)
        targets = ids[0, len(left) :]
        scores[prediction.token_id] = float(logp[len(left) - 1 : -1].gather(1, targets[:, None]).sum())
    # Ratios of probabilities are ratios of whole-sentence likelihoods.
    first, second = predictions[0], predictions[1]
    ratio = first.probability / second.probability
    assert ratio == pytest.approx(
        torch.tensor(scores[first.token_id] - scores[second.token_id]).exp().item(), rel=1e-4
    )


def test_long_input_is_truncated_around_the_blank_with_a_notice(tiny_backbone: Backbone) -> None:
    words = "the king of france lived in a great palace in paris " * 1000  # 10,000 words
    result = predict_blank(tiny_backbone, f"{words} and the ___ of england {words}", k=3)
    assert len(result.notices) == 1 and "long input" in result.notices[0]
    assert len(result.variants["original"].predictions) == 3
    assert "of england" in result.context


def test_emoji_and_non_latin_text_work(tiny_backbone: Backbone) -> None:
    for sentence in ["I 😀 love the ___ 🍞!", "東京は___の首都です", "Москва — ___ России."]:
        result = predict_blank(tiny_backbone, sentence, k=3)
        assert len(result.variants["original"].predictions) == 3
        assert all(isinstance(p.token, str) for p in result.variants["original"].predictions)


def test_blank_at_the_start_or_end(tiny_backbone: Backbone) -> None:
    for sentence in ["___ went to the market.", "I went to the ___"]:
        assert len(predict_blank(tiny_backbone, sentence, k=2).variants["original"].predictions) == 2


def test_tables_are_plain_rows(tiny_backbone: Backbone) -> None:
    result = predict_blank(tiny_backbone, "I went to the ___.", {"half": tiny_backbone.embedding * 0.5}, k=4)
    rows = prediction_table(result)
    assert [row["rank"] for row in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"rank", "original", "half"}
    summary = prediction_summary(result)
    assert [row["variant"] for row in summary] == ["original", "half"]
    assert summary[0]["top1 kept"] is True
    json.dumps(result.to_dict())


def test_threads_give_the_serial_predictions(tiny_backbone: Backbone) -> None:
    generator = torch.Generator().manual_seed(0)
    variants = {
        f"v{i}": tiny_backbone.embedding
        + 0.5 * i * torch.randn(tiny_backbone.embedding.shape, generator=generator)
        for i in range(3)
    }
    sentences = ["I went to the ___ to buy some bread.", "The queen of ___ lived in London."]
    jobs = [(sentence, mode) for sentence in sentences for mode in ("input", "tied")]

    def run(sentence: str, mode: str) -> dict[str, list[tuple[int, float]]]:
        result = predict_blank(tiny_backbone, sentence, variants, k=5, mode=mode)
        return {
            name: [(p.token_id, p.probability) for p in variant.predictions]
            for name, variant in result.variants.items()
        }

    serial = {job: run(*job) for job in jobs}
    parallel: dict[tuple[str, str], dict] = {}
    threads = [threading.Thread(target=lambda job=job: parallel.__setitem__(job, run(*job))) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert parallel == serial


def test_perplexity_and_predictions_together_in_threads(tiny_backbone: Backbone) -> None:
    from embviz.perplexity import evaluate_perplexity

    texts = [" ".join(["the king of france lived in a great palace in paris"] * 3)] * 6
    half = {"half": tiny_backbone.embedding * 0.5}

    def perplexity() -> dict[str, float]:
        report = evaluate_perplexity(tiny_backbone, texts, half, max_tokens=200)
        return {name: result.perplexity for name, result in report.results.items()}

    def predictions() -> list[int]:
        result = predict_blank(tiny_backbone, "The king of ___ lived in a palace.", half, k=5)
        return [p.token_id for p in result.variants["half"].predictions]

    serial = [perplexity(), predictions()] * 3
    parallel: dict[int, object] = {}
    jobs = [perplexity, predictions] * 3
    threads = [
        threading.Thread(target=lambda i=i, job=job: parallel.__setitem__(i, job()))
        for i, job in enumerate(jobs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [parallel[i] for i in range(len(jobs))] == serial


def test_bad_k_is_refused(tiny_backbone: Backbone) -> None:
    with pytest.raises(BadInputError, match="k must be"):
        predict_blank(tiny_backbone, "a ___ b", k=0)


# -- the real default backbone ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_fills_a_plausible_noun() -> None:
    from embviz.sources import load_model

    backbone = load_model("smollm2")
    result = predict_blank(backbone, "I went to the ___ to buy some bread.", k=5)
    top5 = {p.token.strip().lower() for p in result.variants["original"].predictions}
    assert top5 & {"store", "shop", "market", "bakery", "supermarket"}
