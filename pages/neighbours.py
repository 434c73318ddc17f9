"""Neighbours: which of a token's nearest neighbours each variant keeps, and recall@k over the vocabulary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from embviz.errors import EmbvizError
from embviz.figures import bin_index, class_breakdown_bar, recall_bins, recall_histogram
from embviz.metrics import (
    FREQUENCY_BANDS,
    TOKEN_CLASSES,
    full_table_is_exact,
    group_means,
    neighbour_comparison,
    recall_at_k,
)
from embviz.vocab import display_token, suggest
from pages.data import (
    ORIGINAL,
    backbone_fingerprint,
    focus_neighbours,
    original_neighbour_table,
    sampled_recall_of,
    token_groups,
    variant_neighbour_jobs,
)
from pages.routing import use_app_router
from pages.widgets import (
    downloads,
    explain,
    focus_token_id,
    jobs_progress,
    provenance,
    require_variants,
    selected_token_ids,
    token_table,
    wait_for_jobs,
)

_STATUS_COLOURS = {"kept": "#e6f4ea", "lost": "#fde8e8", "new": "#e8f0fe"}

use_app_router()
st.title("Nearest neighbours")
explain(
    "For every token we list its **k most similar tokens** by cosine similarity, over the **whole "
    "vocabulary** and in the full dimension. A good compression keeps these neighbourhoods: "
    "**kept** neighbours are in both lists, **lost** ones only in the original's, **new** ones only in the "
    "variant's. *Recall@k* is the share of the original k neighbours a variant keeps, for every token. "
    "Pick the variants in the sidebar (any registered method and size, up to three); select bars of the "
    "histogram to list their tokens."
)

config, backbone, variants = require_variants()

try:
    with st.spinner(f"Nearest neighbours of all {backbone.vocab_size:,} original tokens (cached on disk)…"):
        original_table = original_neighbour_table(backbone.name, config.k)
    original_indices, original_scores = original_table.indices, original_table.scores
    jobs = variant_neighbour_jobs(variants, config.k)  # each variant's table, in the background
    wait_for_jobs(jobs, seconds=1.0)
except EmbvizError as error:  # e.g. not enough memory for the full-vocabulary search
    st.error(str(error))
    st.stop()

focus = focus_token_id(backbone, config)
if config.token and focus is None:
    hints = suggest(backbone.tokens, config.token, limit=8)
    if hints:
        st.caption("Did you mean: " + ", ".join(hints))
if focus is not None:
    st.subheader(f"Neighbours of {display_token(backbone.tokens[focus])!r} (id {focus})")
    columns = st.columns(len(variants))
    focus_tables = focus_neighbours(variants, focus, config.k)
    for column, name in zip(columns, variants, strict=True):
        indices, scores = focus_tables[name]
        rows = neighbour_comparison(
            original_indices[focus : focus + 1],
            original_scores[focus : focus + 1],
            indices,
            scores,
            0,
            backbone.tokens,
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
failed = [job.error for job in jobs.values() if job.done and job.error is not None]
for error in failed:
    if not isinstance(error, EmbvizError):
        raise error
    st.error(str(error))
if failed:
    st.stop()
if not all(job.done for job in jobs.values()):
    # A first answer at once: exact recall on a random sample, with its error, until the full tables are in.
    try:
        estimates = sampled_recall_of(variants, config.k)
    except EmbvizError as error:  # e.g. not enough memory for the search
        st.error(str(error))
        st.stop()
    sample = len(next(iter(estimates.values())).ids)
    metric_columns = st.columns(len(estimates))
    for column, (name, estimate) in zip(metric_columns, estimates.items(), strict=True):
        column.metric(
            f"{name} mean recall@{config.k} (estimate)",
            f"{estimate.mean:.3f} ± {estimate.margin:.3f}",
            help=f"95% interval from {sample:,} random tokens",
        )
    st.plotly_chart(
        recall_histogram(
            {name: estimate.per_token for name, estimate in estimates.items()},
            config.k,
            provenance=provenance(backbone, config, k=config.k),
            title=f"Neighbour recall@{config.k} on {sample:,} random tokens (estimate)",
        ),
        width="stretch",
        key="recall_estimate",
    )
    st.warning(
        f"**Estimated from a random sample** of {sample:,} of the {backbone.vocab_size:,} tokens (each one's "
        "neighbours searched exactly over the whole vocabulary); ± is the 95% interval of the mean. The exact "
        "figures for every token, the groups and the token table replace it when the background job ends."
    )
    exact = all(full_table_is_exact(variant.compressed) for variant in variants.values())
    jobs_progress(
        jobs,
        f"Nearest neighbours of all {backbone.vocab_size:,} tokens under each variant "
        f"({'exact' if exact else 'approximate index where exact is unaffordable, recall measured'})",
    )
    st.stop()
tables = {ORIGINAL: original_table} | {name: job.result for name, job in jobs.items()}
approximate = {name: table.quality for name, table in tables.items() if table.quality is not None}
for name, quality in approximate.items():  # a vocabulary too large for an affordable exact search
    st.warning(f"**{name}**: {quality.describe(config.k)}. The recall figures below inherit this error.")
recalls = {name: recall_at_k(original_indices, tables[name][0]) for name in variants}
metric_columns = st.columns(len(recalls))
for column, (name, recall) in zip(metric_columns, recalls.items(), strict=True):
    column.metric(f"{name} mean recall@{config.k}", f"{recall.mean:.3f}")
figure = recall_histogram(
    {name: r.per_token for name, r in recalls.items()},
    config.k,
    provenance=provenance(backbone, config, k=config.k),
)
figure.update_layout(dragmode="select")  # dragging selects; zoom stays in the toolbar
event = st.plotly_chart(
    figure, width="stretch", key="recall_histogram", on_select="rerun", selection_mode=("box", "points")
)
st.caption(
    "Drag a box over bars (or click one) to list those tokens below; choose a row there to focus it on every "
    "page. Double-click the chart to clear the selection."
)
classes = token_groups(backbone.name, "class")
bars = recall_bins(config.k)
brushed = selected_token_ids(
    event, {curve: bin_index(recall.per_token, bars) for curve, recall in enumerate(recalls.values())}
)
names = list(variants)


def token_frame(ids: np.ndarray) -> pd.DataFrame:
    """One row per token: its recall under each variant, its class and its original neighbours."""
    return pd.DataFrame(
        {
            "token": [display_token(backbone.tokens[i]) for i in ids],
            "id": ids,
            "class": classes[ids],
            **{f"{name} recall": np.round(recalls[name].per_token[ids], 2) for name in names},
            "original neighbours": [
                ", ".join(display_token(backbone.tokens[j]) for j in original_indices[i][:5]) for i in ids
            ],
            **{
                f"{name} neighbours": [
                    ", ".join(display_token(backbone.tokens[j]) for j in tables[name][0][i][:5]) for i in ids
                ]
                for name in names
            },
        }
    )


if brushed.size:
    st.markdown(f"**{brushed.size:,} selected tokens** (the first 1,000 by id)")
    token_table(token_frame(brushed[:1000]), key="brushed_tokens")

st.subheader("Which tokens lose most")
with st.spinner("Counting token frequencies in the Bible train slice (cached)…"):
    bands = token_groups(backbone.name, "frequency")
left, right = st.columns(2)
for column, groups, order, what in (
    (left, classes, TOKEN_CLASSES, "token class"),
    (right, bands, FREQUENCY_BANDS, "frequency band (Bible train slice)"),
):
    present = [group for group in order if (groups == group).any()]
    column.plotly_chart(
        class_breakdown_bar(
            {name: group_means(recall.per_token, groups, present) for name, recall in recalls.items()},
            metric=f"mean recall@{config.k}",
            counts={group: int((groups == group).sum()) for group in present},
            order=present,
            provenance=provenance(backbone, config, k=config.k),
            title=f"Mean recall@{config.k} by {what}",
            group_title=what.split(" (")[0],
        ),
        width="stretch",
    )

st.subheader("Tokens that lost most")
total = np.sum([recall.per_token for recall in recalls.values()], axis=0)
worst = np.argsort(total, kind="stable")[:50]
losers = token_frame(worst)
token_table(losers, key="worst_tokens")
downloads("neighbours", table=losers, figure=figure)
st.caption(f"Original neighbour table: fingerprint {backbone_fingerprint(backbone.name)[:12]}")
