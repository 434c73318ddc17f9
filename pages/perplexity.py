"""Perplexity: zero-shot perplexity against compression ratio for every method, uncompressed line included."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from embviz.figures import perplexity_curve, provenance_line
from pages.common import current_backbone, downloads, explain, settings, sweep_panel, use_app_router

SWEEP_METHODS = (
    "svd",
    "ae-paper",
    "ae-mse",
    "ae-cosine",
    "svd-randomized",
    "ae-paper-elu",
    "svd-freq",
    "ae-paper-freq",
)

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
figure = perplexity_curve(
    rows, provenance=provenance_line(backbone.name, text=text, mode=config.mode, recipe=config.recipe, seed=1)
)
st.plotly_chart(figure, use_container_width=True)
table = pd.DataFrame(rows)
st.dataframe(table, hide_index=True, use_container_width=True)
downloads("perplexity", table=table, figure=figure)
