"""The paper's claim on the BERT track: minilm-mlm (slow: the shipped head, re-measured, then real sweeps).

``minilm-mlm`` is the all-MiniLM-L6-v2 encoder (real bert-base-uncased vocabulary, 30522 x 384) with a
masked-LM head fitted by embviz (:mod:`embviz.mlm_head`, default configuration, seed 0; the word embeddings
stay frozen, so the compressed matrix is the one the head was fitted on). embviz ships that fit
(``embviz/data/heads/``, made by ``embviz fit-mlm-head minilm --package``): CI installs it into the cache in
seconds instead of refitting (about 14 minutes on 2 CPU cores), re-measures what its manifest claims, then
runs the paper's zero-shot MLM protocol (2,048 tokens, whole-word masking at 15%, seed 0) at the BERT-base
ratios 2.5 / 5 / 10 (ranks 151 / 75 / 37 for D = 384), SVD vs paper-loss AE vs MSE AE, input-only and
tied, on the classics (``bible:test``) and on modern everyday English (``smollm:test``).

What holds (README, "BERT track"): see the assertions; each states the measured direction of the claim.
"""

from __future__ import annotations

import pytest

from embviz.backbones import Backbone
from embviz.evaluation import UNCOMPRESSED, sweep
from embviz.mlm_head import (
    EVAL_MAX_TOKENS,
    built_folder,
    fill_in_accuracy,
    held_out_sets,
    masked_accuracy,
    read_fill_in,
    read_manifest,
)
from embviz.predictions import predict_blank
from embviz.sources import load_model

pytestmark = pytest.mark.slow

RATIOS = (2.5, 5.0, 10.0)
METHODS = ["svd", "ae-paper", "ae-mse"]


@pytest.fixture(scope="module")
def minilm_mlm() -> Backbone:
    return load_model("minilm-mlm")  # installs the shipped head into the cache when it is not there


def test_the_shipped_head_scores_what_its_manifest_says_and_meets_the_targets(minilm_mlm: Backbone) -> None:
    manifest = read_manifest(built_folder("minilm"))
    sets = held_out_sets(minilm_mlm, ("bible", "smollm"), EVAL_MAX_TOKENS)
    for name in ("bible:test", "smollm:test"):
        measured = masked_accuracy(minilm_mlm.model, sets[name])
        recorded = manifest["accuracy"][name]
        assert measured["tokens"] == recorded["tokens"]
        # Another CPU's kernels may flip an argmax between two near-equal logits: a token or two.
        assert abs(measured["top1"] - recorded["top1"]) <= 0.003, (name, measured, recorded)
    accuracy = manifest["accuracy"]
    assert accuracy["bible:test"]["top1"] >= 0.40  # issue 16's target, met (42.7%)
    assert accuracy["pydoc:test"]["top1"] >= 0.35  # modern technical English: met (47.0%)
    # Modern everyday English (generated): 34.2%, short of the 35% -- reported as missed.
    assert accuracy["smollm:test"]["top1"] >= 0.32
    fill_in = fill_in_accuracy(minilm_mlm.model, minilm_mlm.tokenizer, read_fill_in())
    assert abs(fill_in["top1"] - manifest["fill_in"]["top1"]) <= 1 / fill_in["sentences"]
    # The everyday fill-in set: 17.9% top-1 / 30.4% top-5, far short of the issue's 50% / 75% (README, "BERT
    # track": the head learns grammar, not facts). These floors guard against a worse refit, nothing more.
    assert fill_in["top1"] >= 0.15 and fill_in["top5"] >= 0.28, fill_in
    grammar = fill_in["by_category"]["grammar"]
    assert grammar["top1"] >= 0.36, grammar  # 4 of 11 (the 15%-mask head had 5)


@pytest.mark.parametrize(
    ("sentence", "answer"),
    [("I'm sorry, I don't ___ what you mean.", "know"), ("He is afraid ___ spiders.", "of")],
)
def test_the_fitted_head_gets_everyday_grammar_right(
    minilm_mlm: Backbone, sentence: str, answer: str
) -> None:
    result = predict_blank(minilm_mlm, sentence, {}, k=5)
    top5 = [p.token for p in next(iter(result.variants.values())).predictions]
    assert top5[0] == answer, top5


def _perplexities(backbone: Backbone, text: str, mode: str) -> tuple[float, dict[tuple[str, float], float]]:
    swept = sweep(backbone, METHODS, ratios=list(RATIOS), text=text, mode=mode, recipe="fast")
    rows = [row.to_dict() for row in swept]
    [original] = [row["perplexity"] for row in rows if row["method"] == UNCOMPRESSED]
    table = {(row["method"], row["target_ratio"]): row["perplexity"] for row in rows[1:]}
    ranks = {row["target_ratio"]: row["rank"] for row in rows[1:]}
    assert ranks == {2.5: 151, 5.0: 75, 10.0: 37}
    assert all(original < value for value in table.values())
    return original, table


@pytest.mark.parametrize("text", ["bible:test", "smollm:test"])
def test_tied_the_direction_loss_wins_at_the_largest_rank_only(minilm_mlm: Backbone, text: str) -> None:
    original, ppl = _perplexities(minilm_mlm, text, "tied")
    svd, paper, mse = (ppl[(method, 2.5)] for method in METHODS)
    # bible 168 vs 206 (MSE 213); smollm 302 vs 333 (MSE 341)
    assert original < paper < 0.95 * svd and paper < mse, (text, original, paper, svd, mse)
    for ratio in (5.0, 10.0):  # bible 340 vs 337, 405 vs 389; smollm 620 vs 608, 863 vs 859
        svd, paper = ppl[("svd", ratio)], ppl[("ae-paper", ratio)]
        assert paper > 0.95 * svd, (text, ratio, paper, svd)


def test_input_only_on_the_classics_svd_wins_at_the_larger_ranks_the_direction_loss_at_the_smallest(
    minilm_mlm: Backbone,
) -> None:
    _, bible = _perplexities(minilm_mlm, "bible:test", "input")
    for ratio in (2.5, 5.0):  # 119 vs 131, 224 vs 240
        assert bible[("svd", ratio)] < 0.97 * bible[("ae-paper", ratio)], (ratio, bible)
    assert bible[("ae-paper", 10.0)] < 0.97 * bible[("svd", 10.0)], bible  # 337 vs 358


def test_input_only_on_everyday_english_svd_wins_or_ties(minilm_mlm: Backbone) -> None:
    _, smollm = _perplexities(minilm_mlm, "smollm:test", "input")
    for ratio in (2.5, 5.0):  # 202 vs 212, 388 vs 427
        assert smollm[("svd", ratio)] < 0.97 * smollm[("ae-paper", ratio)], (ratio, smollm)
    assert abs(smollm[("ae-paper", 10.0)] / smollm[("svd", 10.0)] - 1) < 0.1, smollm  # 731 vs 718
