"""What each part of direction VQ buys: the same budget with the row weights and the model's metric switched
off one at a time (input mode, three texts, x the original's perplexity, KL and top-1 agreement).

Usage:
    .venv/bin/python scripts/vq_ablation.py [--bits 1,2] > ablation.json
About 4 minutes per budget on 2 cores (three fits, nine perplexity evaluations).
"""

from __future__ import annotations

import argparse
import json

from embviz.compressors import DirectionMetric, get_method
from embviz.corpora import resolve_texts
from embviz.frequency import frequency_weights
from embviz.perplexity import evaluate_perplexity
from embviz.sensitivity import direction_metric
from embviz.sources import load_model
from embviz.threads import ALL, configure_threads

TEXTS = ("bible:test", "pydoc:test", "modern:train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="1,2", help="budgets in bits per weight (default 1,2)")
    args = parser.parse_args()
    configure_threads(ALL)
    backbone = load_model("smollm2")
    spec = get_method("vq-direction")
    vocab, hidden = backbone.vocab_size, backbone.hidden_size
    euclidean = DirectionMetric.euclidean(hidden)
    variants = {
        "wordfreq weights, Euclidean": (frequency_weights(backbone, source="wordfreq"), euclidean),
        "general weights, Euclidean": (frequency_weights(backbone), euclidean),
        "general weights, the model's metric": (frequency_weights(backbone), direction_metric(backbone)),
    }
    found: dict[str, dict[str, dict[str, float]]] = {}
    for bits in (float(value) for value in args.bits.split(",")):
        size = spec.size(vocab, hidden, bits=bits)
        for name, (weights, metric) in variants.items():
            compressor = spec.build(size, row_weights=weights, direction_metric=metric)
            dense = compressor.fit(backbone.embedding).reconstruct()
            key = f"{bits:g} bits, {name}"
            found[key] = {}
            for text in TEXTS:
                report = evaluate_perplexity(backbone, resolve_texts(text), {"variant": dense})
                original, variant = report.results[report.reference], report.results["variant"]
                found[key][text] = {
                    "x_original": round(variant.perplexity / original.perplexity, 4),
                    "kl_nats": round(variant.kl_nats or 0.0, 4),
                    "top1_agreement": round(variant.top1_agreement or 0.0, 3),
                }
    print(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
