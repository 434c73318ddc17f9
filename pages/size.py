"""Size vs quality: the rate–distortion view. Perplexity and neighbour recall against bits per weight for every
compressor, quantisers, frequency-aware methods and llama.cpp's GGUF formats included, with the frontier, the
uncompressed model, and marks for the backbone's source format, bfloat16 and float32 (SPEC §2)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from embviz.compressors import MixedPrecisionRows, get_method, method_ids
from embviz.compressors.gguf_formats import FAMILY as GGUF_FAMILY
from embviz.errors import BadInputError
from embviz.evaluation import SweepRow
from embviz.figures import provenance_line, rate_distortion
from pages.data import current_backbone
from pages.routing import use_app_router
from pages.state import settings
from pages.widgets import downloads, explain, sweep_panel

FIXED_SIZE = ("uncompressed", *method_ids(sizing="fixed"))
BITS = (8.0, 6.0, 4.5, 4.0, 3.0, 2.0, 1.0)  # budgets offered, in bits per weight (stored bytes x 8 / (V x D))
DEFAULT_BITS = (4.0, 2.0)
# Shown by default: the paper's two, the frequency-aware ones, and direction VQ, the best method at or below 4
# bits per weight on every text measured (README), so "best at each budget" is not claimed without it. (A
# comment, not a docstring: Streamlit's magic would draw a bare string on the page.)
DEFAULT_METHODS = [
    "svd", "ae-paper", "svd-freq", "svd-freq-int8", "vq-direction", "quant-int8", "quant-int4", "quant-mixed",
]  # fmt: skip
GGUF_IDS = method_ids(family=GGUF_FAMILY)
GGUF_REFERENCES = ("gguf-q8_0", "gguf-q4_0")  # llama.cpp's formats shown by default, as references


def best_within(rows: list[SweepRow], bits: float) -> SweepRow | None:
    """The compressed row with the lowest perplexity among those stored in at most ``bits`` per weight."""
    fitting = [row for row in rows if row.method != "uncompressed" and row.bits_per_weight <= bits + 1e-9]
    return min(fitting, key=lambda row: row.perplexity, default=None)


def fixed_bits(method: str, vocab: int, hidden: int) -> float | None:
    """A fixed-size method's bits per weight for a V x D matrix (None where its rows cannot be stored)."""
    try:
        return get_method(method).fixed_bits_per_weight(vocab, hidden)
    except BadInputError:  # e.g. a GGUF block format on rows that are not a multiple of its block
        return None


def against(bits: float, source_format: str | None, source_bits: float | None) -> str:
    """A width stated against the backbone's source format and bfloat16 (and float32), in words."""
    parts = []
    if source_format and source_bits:
        size = (
            f"{source_bits / bits:.3g}x smaller than" if source_bits >= bits else f"{bits / source_bits:.3g}x"
        )
        parts.append(f"{size} the source ({source_format})")
    return ", ".join([*parts, f"{16 / bits:.3g}x smaller than bfloat16", f"{32 / bits:.3g}x than float32"])


use_app_router()
st.title("Size vs quality")
explain(
    "Every compressor on **one axis: bits per weight** — every byte the compressed matrix needs when "
    "deployed (integer codes, per-row scales, fp16 decoders, biases), times 8, divided by the number of "
    "entries in the original matrix. Each point is a compressed embedding matrix, placed at its bits per "
    "weight against the perplexity it gives without retraining (first chart) and how many of each token's "
    "nearest neighbours it keeps (second chart). The dotted lines mark how the backbone's embedding **ships** "
    "(its source format: smollm2's is llama.cpp's GGUF Q8_0, 8.5 bits per weight), **bfloat16** (16) and "
    "**float32** (32), so a size reads against what you would otherwise deploy: 4 bits is about 2x smaller "
    "than a Q8_0 source and 4x smaller than bfloat16 — not just 8x smaller than float32. At each **budget** "
    "every method gets the largest size that fits: low-rank methods through their rank, mixed-precision rows "
    "through their code widths. int8 / int4 rows and the GGUF formats (llama.cpp's own quantisers, shown "
    "as references) have one fixed size and appear once. The grey band is the **frontier**: the best result "
    "at each size. *Frequency-aware* methods (weighted SVD, weighted AE, mixed-precision rows) spend their "
    "budget on the tokens that occur in the corpora's **train** slices, never the slice being scored."
)

config = settings()
backbone = current_backbone()
if backbone is None:
    st.stop()

vocab, hidden = backbone.vocab_size, backbone.hidden_size
widths = {method: fixed_bits(method, vocab, hidden) for method in method_ids(sizing="fixed")}
references = [method for method in GGUF_REFERENCES if widths.get(method) is not None]
shipped = (
    f"This backbone's embedding ships as **{backbone.source_format}** ({backbone.source_bits_per_weight:g} bits "
    "per weight). "
    if backbone.source_format and backbone.source_bits_per_weight
    else ""
)
gguf = [f"{get_method(m).label.split(' (')[0]} {widths[m]:g}" for m in GGUF_IDS if widths.get(m)]
computed = sweep_panel(
    backbone,
    config,
    key="rd",
    methods=method_ids(),
    default_methods=DEFAULT_METHODS + references,
    ratio_label="Budgets (bits per weight)",
    bits=BITS,
    default_bits=DEFAULT_BITS,
    caption=f"{shipped}Fixed-size methods appear once at their own width: int8 rows "
    f"{widths['quant-int8']:.3g}, int4 rows {widths['quant-int4']:.3g}"
    + (f", {', '.join(gguf)} bits per weight" if gguf else " bits per weight")
    + (
        f" (llama.cpp's k-quants need rows of a multiple of 256, not {hidden}, so Q4_0 is the lowest GGUF "
        "reference here)"
        if gguf and hidden % 256
        else ""
    )
    + f". Mixed-precision rows reach down to {32 / MixedPrecisionRows.max_ratio(hidden):.3g} bits per "
    "weight here; a budget a method cannot meet is skipped and listed. Recall is measured over the full "
    f"vocabulary ({vocab:,} tokens, exact neighbours).",
)
if computed is None:
    st.stop()
rows, text = computed
records = [row.to_dict() for row in rows]

provenance = provenance_line(
    backbone.name, text=text, mode=config.mode, recipe=config.recipe, sizing="bits per weight"
)
perplexity_figure = rate_distortion(records, metric="perplexity", provenance=provenance)
st.plotly_chart(perplexity_figure, use_container_width=True)
budgets = sorted({row.target_bits for row in rows if row.target_bits is not None}, reverse=True)
source = (backbone.source_format, backbone.source_bits_per_weight)
best_lines = [
    f"- **{bits:g} bits per weight** ({against(bits, *source)}): {best.label} at "
    f"{best.bits_per_weight:.3g} bits — perplexity {best.perplexity:.4g} ({best.vs_original:.4g}x the "
    f"uncompressed model), recall@{config.k} {best.recall_at_k:.2f}"
    for bits in budgets
    if (best := best_within(rows, bits)) is not None
]
if best_lines:
    st.markdown(
        "**Best at each budget** (lowest perplexity within the bits per weight):\n" + "\n".join(best_lines)
    )
recall_figure = rate_distortion(records, metric="recall_at_k", provenance=provenance)
st.plotly_chart(recall_figure, use_container_width=True)
table = pd.DataFrame(records)
st.dataframe(table, hide_index=True, use_container_width=True)
downloads("size-vs-quality", table=table, figure=perplexity_figure)
