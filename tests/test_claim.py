"""The paper's claim on the real default backbone (slow: the real cache, a real AE fit, real perplexities).

"Direction is what you need" (Bałazy et al. 2021): at the same parameter budget, the linear AutoEncoder
trained with the direction (cosine) loss gives a lower zero-shot perplexity than truncated SVD. SPEC §2
measured it on SmolLM2-135M at rank 64 (input-only substitution, 2k-token held-out Bible slice): original
8.05, SVD 7538, paper-loss AE 3525. A cold cache costs a few minutes on 2 CPU cores (the fast-recipe AE fit,
the original's full-vocabulary neighbour table); a warm one, seconds.
"""

from __future__ import annotations

import pytest

from embviz.evaluation import UNCOMPRESSED, sweep
from embviz.sources import load_model

pytestmark = pytest.mark.slow


def test_direction_loss_beats_svd_at_rank_64() -> None:
    backbone = load_model("smollm2")
    rows = sweep(backbone, ["svd", "ae-paper"], ranks=[64], text="bible:test", mode="input", recipe="fast")
    by_method = {row.method: row.to_dict() for row in rows}
    original = by_method[UNCOMPRESSED]["perplexity"]
    svd, ae = by_method["svd"], by_method["ae-paper"]
    assert svd["params"] <= ae["params"] <= svd["params"] + backbone.hidden_size  # same budget (+ AE bias)
    assert original < ae["perplexity"] < svd["perplexity"], (original, ae["perplexity"], svd["perplexity"])
    assert 1 < original < 100


def test_frequency_aware_compressors_meet_the_issue_7_targets() -> None:
    """Beyond the paper (issue 7), bible:test, input mode: at equal parameters the frequency-weighted SVD
    beats the paper-loss AE by >= 2x at rank 64 (measured: 308 vs 2513, 8.2x), and at 8x fewer bytes the
    frequency-aware mixed-precision rows stay within 1.2x of the original (measured: 0.999x).

    These are in-domain claims: the row weights are the token counts of the bundled corpora's train slices
    (``weights="corpora"``), the same corpora whose test slice is scored. With the default weights, which
    never saw the scored text (wordfreq), mixed rows at 8x give 1.50x on bible:test (29.2 vs 19.5).
    """
    backbone = load_model("smollm2")
    options = {"text": "bible:test", "mode": "input", "recipe": "fast", "weights": "corpora"}
    rows = sweep(backbone, ["ae-paper", "svd-freq"], ranks=[64], **options)
    by_method = {row.method: row.to_dict() for row in rows}
    assert by_method["svd-freq"]["params"] <= by_method["ae-paper"]["params"]
    assert 2 * by_method["svd-freq"]["perplexity"] <= by_method["ae-paper"]["perplexity"]
    [original, mixed] = (
        row.to_dict() for row in sweep(backbone, ["quant-mixed"], ratios=[8.0], by="bytes", **options)
    )
    assert mixed["byte_ratio"] >= 8.0
    assert mixed["perplexity"] <= 1.2 * original["perplexity"], (mixed["perplexity"], original["perplexity"])


def test_direction_vq_at_2_and_1_bits_on_out_of_domain_text() -> None:
    """Issue 14's frontier on held-out text (``pydoc:test``, modern technical English; the default row weights
    and the model's direction metric, neither of which saw it), input mode.

    Targets: <= 1.05x the original's perplexity at 2 bits per weight, <= 1.25x at 1 bit. **Missed**: direction
    VQ in the model's metric measured 1.062x at 2 bits and 1.398x at 1 bit (KL 0.070 and 0.38 nats/token; over
    fit seeds 0-2 at 2 bits 1.058-1.068x, at 1 bit 1.40-1.44x; before the line break counted in the row
    weights 1.069x and 1.514x; before the metric and the `general` weights 1.131x and 1.98x), the best of
    anything embviz has at these budgets. These bounds guard that frontier against regressions, with room
    for the spread between fits (seeds, thread counts); they are not the targets.
    """
    from embviz.artifacts import compress_cached
    from embviz.compressors import get_method
    from embviz.corpora import load_texts
    from embviz.perplexity import evaluate_perplexity
    from embviz.sensitivity import method_inputs

    backbone = load_model("smollm2")
    spec = get_method("vq-direction")
    inputs = method_inputs(backbone, spec)  # the default weights and the model's metric: neither saw pydoc
    variants = {}
    for bits in (2.0, 1.0):
        size = spec.size(backbone.vocab_size, backbone.hidden_size, bits=bits)
        compressed = compress_cached(backbone.name, backbone.embedding, spec.build(size, **inputs))
        assert compressed.compressed.bits_per_weight <= bits
        variants[f"{bits:g} bits"] = compressed.compressed.reconstruct()
    report = evaluate_perplexity(backbone, load_texts("pydoc", "test"), variants, mode="input")
    original = report.results[report.reference].perplexity
    two, one = (report.results[name] for name in ("2 bits", "1 bits"))
    assert two.perplexity / original <= 1.09, (two.perplexity, original)
    assert one.perplexity / original <= 1.55, (one.perplexity, original)
    assert two.perplexity < one.perplexity
