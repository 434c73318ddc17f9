"""The paper's claim on the BERT track: minilm-mlm (slow: fits the head once, then two real sweeps).

``minilm-mlm`` is the all-MiniLM-L6-v2 encoder (real bert-base-uncased vocabulary, 30522 x 384) with a
masked-LM head fitted by embviz (:mod:`embviz.mlm_head`, default budget, seed 0; the word embeddings stay
frozen, so the compressed matrix is the one the head was fitted on). The fit goes through the real cache, so
it is built once (about 8-10 minutes on 2 CPU cores) and reused afterwards. Then the paper's zero-shot MLM
protocol (``bible:test``, 2,048 tokens, whole-word masking at 15%, seed 0) at the BERT-base ratios 2.5 / 5 /
10 (ranks 151 / 75 / 37 for D = 384), SVD vs paper-loss AE vs MSE AE, input-only and tied.

What holds (README, "BERT track"): with the tied output layer replaced too, the paper-loss AE beats SVD at
every ratio (and the MSE AE); with only the input embedding replaced -- the paper's own setting -- the claim
**fails** on this model: SVD is better at 2.5 and the two are within a few percent at 5 and 10.
"""

from __future__ import annotations

import pytest

from embviz.backbones import Backbone
from embviz.evaluation import UNCOMPRESSED, sweep
from embviz.mlm_head import fit_mlm_head
from embviz.predictions import predict_blank
from embviz.sources import load_model

pytestmark = pytest.mark.slow

RATIOS = (2.5, 5.0, 10.0)
METHODS = ["svd", "ae-paper", "ae-mse"]


@pytest.fixture(scope="module")
def minilm_mlm() -> Backbone:
    result = fit_mlm_head("minilm", load=load_model)
    test = result.accuracies["bible:test"]
    assert test["top1"] >= 0.40, result.accuracies  # the target
    assert result.accuracies["bible:valid"]["top1"] >= 0.38
    assert all(0 < figures["top1"] < figures["top5"] < 1 for figures in result.accuracies.values())
    return load_model("minilm-mlm")


def _perplexities(backbone: Backbone, mode: str) -> tuple[float, dict[tuple[str, float], float]]:
    swept = sweep(backbone, METHODS, ratios=list(RATIOS), text="bible:test", mode=mode, recipe="fast")
    rows = [row.to_dict() for row in swept]
    [original] = [row["perplexity"] for row in rows if row["method"] == UNCOMPRESSED]
    table = {(row["method"], row["target_ratio"]): row["perplexity"] for row in rows[1:]}
    ranks = {row["target_ratio"]: row["rank"] for row in rows[1:]}
    assert ranks == {2.5: 151, 5.0: 75, 10.0: 37}
    return original, table


def test_the_fitted_head_fills_the_blank_with_nouns(minilm_mlm: Backbone) -> None:
    result = predict_blank(minilm_mlm, "I went to the ___ to buy some bread.", {}, k=5)
    top5 = [p.token for p in next(iter(result.variants.values())).predictions]
    places = {"land", "house", "city", "temple", "market", "town", "sea", "village", "shop", "store", "king"}
    assert len(places & set(top5)) >= 3, top5


def test_tied_the_direction_loss_beats_svd_at_every_ratio(minilm_mlm: Backbone) -> None:
    original, ppl = _perplexities(minilm_mlm, "tied")
    for ratio in RATIOS:
        svd, paper, mse = (ppl[(method, ratio)] for method in METHODS)
        assert original < paper < svd, (ratio, original, paper, svd)
        assert paper < mse, (ratio, paper, mse)


def test_input_only_the_claim_fails(minilm_mlm: Backbone) -> None:
    original, ppl = _perplexities(minilm_mlm, "input")
    assert all(original < value for value in ppl.values())
    assert ppl[("svd", 2.5)] < 0.9 * ppl[("ae-paper", 2.5)], ppl  # SVD clearly better at the largest rank
    for ratio in (5.0, 10.0):  # near-ties: neither method is more than 10% better
        assert abs(ppl[("ae-paper", ratio)] / ppl[("svd", ratio)] - 1) < 0.1, (ratio, ppl)
