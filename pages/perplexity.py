"""Perplexity: zero-shot perplexity against compression ratio for every method, uncompressed line included."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from embviz.compressors import all_methods
from embviz.figures import perplexity_curve, provenance_line
from pages.data import current_backbone
from pages.routing import use_app_router
from pages.state import settings
from pages.widgets import downloads, explain, sweep_panel

# Every float low-rank method (quantised ones are compared by bytes on the Size page).
SWEEP_METHODS = tuple(spec.id for spec in all_methods() if spec.sizing == "rank" and spec.code_bits is None)

use_app_router()
st.title("Perplexity vs compression")
explain(
    "**Perplexity** measures how surprised the language model is by held-out text (lower is better; the "
    "uncompressed model is the dashed line). Each point swaps in a compressed embedding at a given "
    "**compression ratio** (how many times fewer embedding parameters) *without any retraining*. In "
    "**input** mode only the input embedding is replaced, as in the paper; in **tied** mode the output "
    "layer uses the compressed matrix too. The paper's claim: at the same budget the direction-loss AE "
    "beats SVD."
)

config = settings()
backbone = current_backbone()
if backbone is None:
    st.stop()

computed = sweep_panel(
    backbone,
    config,
    key="ppl",
    methods=SWEEP_METHODS,
    default_methods=["svd", "ae-paper"],
    ratio_label="Compression ratios",
)
if computed is None:
    st.stop()
rows, text = computed
records = [row.to_dict() for row in rows]
figure = perplexity_curve(
    records,
    provenance=provenance_line(backbone.name, text=text, mode=config.mode, recipe=config.recipe, seed=1),
)
st.plotly_chart(figure, use_container_width=True)
table = pd.DataFrame(records)
st.dataframe(table, hide_index=True, use_container_width=True)
downloads("perplexity", table=table, figure=figure)
