"""Size vs quality: the rate–distortion view. Perplexity and neighbour recall against stored bytes for every
compressor, quantisers and frequency-aware methods included, with the frontier and the uncompressed model."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from embviz.compressors import MixedPrecisionRows, method_ids
from embviz.evaluation import SweepRow
from embviz.figures import provenance_line, rate_distortion
from pages.data import current_backbone
from pages.routing import use_app_router
from pages.state import settings
from pages.widgets import downloads, explain, sweep_panel

FIXED_SIZE = ("uncompressed", *method_ids(sizing="fixed"))
RATIOS = (2.0, 4.0, 8.0, 12.0, 16.0, 32.0)
DEFAULT_METHODS = ["svd", "ae-paper", "svd-freq", "svd-freq-int8", "quant-int8", "quant-int4", "quant-mixed"]


def best_within(rows: list[SweepRow], budget: float) -> SweepRow | None:
    """The compressed row with the lowest perplexity among those stored in at most ``budget`` bytes."""
    fitting = [row for row in rows if row.method != "uncompressed" and row.bytes <= budget * (1 + 1e-9)]
    return min(fitting, key=lambda row: row.perplexity, default=None)


use_app_router()
st.title("Size vs quality")
explain(
    "Every compressor on **one axis: bytes**. Each point is a compressed embedding matrix, placed at the "
    "bytes it needs when deployed (integer codes, per-row scales and fp16 decoders counted) against the "
    "perplexity it gives without retraining (first chart) and how many of each token's nearest neighbours "
    "it keeps (second chart). At a **byte ratio** every method gets the same budget: low-rank methods through their rank, "
    "quantised ones through their code width. The grey band is the **frontier**: the best result at each "
    "size. *Frequency-aware* methods (weighted SVD, weighted AE, mixed-precision rows) spend their budget on "
    "the tokens that occur in the corpora's **train** slices, never the slice being scored."
)

config = settings()
backbone = current_backbone()
if backbone is None:
    st.stop()

computed = sweep_panel(
    backbone,
    config,
    key="rd",
    methods=method_ids(),
    default_methods=DEFAULT_METHODS,
    ratio_label="Byte ratios (x fewer bytes)",
    ratios=RATIOS,
    caption="int8 / int4 rows have a fixed size and appear once; mixed-precision rows reach at most "
    f"{MixedPrecisionRows.max_ratio(backbone.hidden_size):.1f}x here. Recall is measured over the full "
    f"vocabulary ({backbone.vocab_size:,} tokens, exact neighbours).",
    by="bytes",
)
if computed is None:
    st.stop()
rows, text = computed
records = [row.to_dict() for row in rows]

provenance = provenance_line(backbone.name, text=text, mode=config.mode, recipe=config.recipe, sizing="bytes")
perplexity_figure = rate_distortion(records, metric="perplexity", provenance=provenance)
st.plotly_chart(perplexity_figure, use_container_width=True)
full_size = 4 * backbone.vocab_size * backbone.hidden_size
byte_ratios = sorted({row.target_ratio for row in rows if row.method not in FIXED_SIZE and row.target_ratio})
st.markdown(
    "**Best at each budget** (lowest perplexity within the bytes):\n"
    + "\n".join(
        f"- **{ratio:g}x** fewer bytes: {best.label} — perplexity {best.perplexity:.4g} "
        f"({best.vs_original:.3g}x the uncompressed model), recall@{config.k} {best.recall_at_k:.2f}"
        for ratio in byte_ratios
        if (best := best_within(rows, full_size / ratio)) is not None
    )
)
recall_figure = rate_distortion(records, metric="recall_at_k", provenance=provenance)
st.plotly_chart(recall_figure, use_container_width=True)
table = pd.DataFrame(records)
st.dataframe(table, hide_index=True, use_container_width=True)
downloads("size-vs-quality", table=table, figure=perplexity_figure)
