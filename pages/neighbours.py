"""Neighbours: which of a token's nearest neighbours each variant keeps, and recall@k over the vocabulary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from embviz.errors import EmbvizError
from embviz.figures import recall_histogram
from embviz.metrics import neighbour_comparison, recall_at_k
from embviz.vocab import display_token, suggest
from pages.data import ORIGINAL, backbone_fingerprint, neighbour_tables
from pages.routing import use_app_router
from pages.widgets import downloads, explain, focus_token_id, provenance, require_variants

_STATUS_COLOURS = {"kept": "#e6f4ea", "lost": "#fde8e8", "new": "#e8f0fe"}

use_app_router()
st.title("Nearest neighbours")
explain(
    "For every token we list its **k most similar tokens** by cosine similarity, over the **whole "
    "vocabulary** and in the full dimension. A good compression keeps these neighbourhoods: "
    "**kept** neighbours are in both lists, **lost** ones only in the original's, **new** ones only in the "
    "variant's. *Recall@k* is the share of the original k neighbours a variant keeps, for every token."
)

config, backbone, variants = require_variants()

try:
    with st.spinner(
        f"Nearest neighbours of all {backbone.vocab_size:,} tokens (cached on disk for the original)…"
    ):
        tables = neighbour_tables(backbone, variants, config.k)
except EmbvizError as error:  # e.g. not enough memory for the full-vocabulary search
    st.error(str(error))
    st.stop()
original_indices, original_scores = tables[ORIGINAL]

focus = focus_token_id(backbone, config)
if config.token and focus is None:
    hints = suggest(backbone.tokens, config.token, limit=8)
    if hints:
        st.caption("Did you mean: " + ", ".join(hints))
if focus is not None:
    st.subheader(f"Neighbours of {display_token(backbone.tokens[focus])!r} (id {focus})")
    columns = st.columns(len(variants))
    for column, name in zip(columns, variants, strict=True):
        indices, scores = tables[name]
        rows = neighbour_comparison(
            original_indices, original_scores, indices, scores, focus, backbone.tokens
        )
        frame = pd.DataFrame(rows)
        frame["token"] = frame["token"].map(display_token)
        frame = frame[["token", "status", "original_rank", "variant_rank", "original_score", "variant_score"]]
        frame = frame.astype({"original_rank": "Int64", "variant_rank": "Int64"})
        kept = int((frame["status"] == "kept").sum())
        column.markdown(f"**{name}** keeps {kept} of {config.k}")
        column.dataframe(
            frame.style.apply(
                lambda row: [f"background-color: {_STATUS_COLOURS[row['status']]}"] * len(row), axis=1
            ),
            hide_index=True,
            width="stretch",
            column_config={
                "original_score": st.column_config.NumberColumn("original cos", format="%.3f"),
                "variant_score": st.column_config.NumberColumn(f"{name} cos", format="%.3f"),
                "original_rank": "original #",
                "variant_rank": f"{name} #",
            },
        )

st.subheader(f"Recall@{config.k} over the whole vocabulary")
recalls = {name: recall_at_k(original_indices, tables[name][0]) for name in variants}
metric_columns = st.columns(len(recalls))
for column, (name, recall) in zip(metric_columns, recalls.items(), strict=True):
    column.metric(f"{name} mean recall@{config.k}", f"{recall.mean:.3f}")
figure = recall_histogram(
    {name: r.per_token for name, r in recalls.items()},
    config.k,
    provenance=provenance(backbone, config, k=config.k),
)
st.plotly_chart(figure, width="stretch")

st.subheader("Tokens that lost most")
worst = np.argsort(recalls["AE"].per_token + recalls["SVD"].per_token, kind="stable")[:50]
losers = pd.DataFrame(
    {
        "token": [display_token(backbone.tokens[i]) for i in worst],
        "id": worst,
        **{f"{name} recall": np.round(recall.per_token[worst], 2) for name, recall in recalls.items()},
        "original neighbours": [
            ", ".join(display_token(backbone.tokens[j]) for j in original_indices[i][:5]) for i in worst
        ],
    }
)
st.dataframe(losers, hide_index=True, width="stretch")
downloads("neighbours", table=losers, figure=figure)
st.caption(f"Original neighbour table: fingerprint {backbone_fingerprint(backbone.name)[:12]}")
