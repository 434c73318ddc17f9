"""Map: the vocabulary in 2-D, the original and each variant in one shared frame (fit on the original)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st

from embviz.errors import EmbvizError
from embviz.figures import projection_panels
from embviz.progress import ProgressCallback, describe
from embviz.projections import ORIGINAL, ProjectionMap, neighbourhood_displacement, projection_map, rows_of
from embviz.vocab import display_token
from pages.data import BackgroundJob, backbone_fingerprint, job_board, original_neighbour_table
from pages.routing import use_app_router
from pages.state import warn_ignored_url_values
from pages.widgets import (
    downloads,
    explain,
    focus_token_id,
    provenance,
    require_variants,
    selected_token_ids,
    token_table,
    wait_for_jobs,
)

use_app_router()
st.title("Map of the vocabulary")
explain(
    "Each point is a token. The 2-D layout is **fitted on the original** embedding; each variant's "
    "reconstruction is then **placed with the same fitted map**, so the panels share one frame and "
    "you can see where the compression moves tokens. **PCA** (the two directions of largest variance) is "
    "instant and exact; **UMAP** keeps local neighbourhoods and takes a minute or two the first time (it "
    "is cached on disk afterwards). The focus token is highlighted in every panel. Select points with the "
    "box or lasso tool to list them."
)

config, backbone, variants = require_variants()

controls = st.columns([2, 2, 1])
method = controls[0].radio(
    "Projection",
    ["pca", "umap"],
    horizontal=True,
    key="map",
    bind="query-params",  # the URL holds what is shown, so the options are the ids (?map=umap)
    captions=["instant, exact", "neighbourhoods; cached"],
)
warn_ignored_url_values(("map",))
sample_choices = {"all tokens": None, "20,000 tokens": 20_000, "5,000 tokens": 5_000}
sample_label = controls[1].selectbox(
    "Points",
    list(sample_choices),
    key="map_points",
    help="UMAP on the full vocabulary is the honest default; a sample is "
    "faster and is always announced under the figure.",
)
lines = controls[2].checkbox(
    "Movement lines", key="map_lines", help="Lines from original to variant positions"
)

focus = focus_token_id(backbone, config)
# Low-rank variants are placed through their factors (about 2.5x cheaper than dense rows for UMAP).
matrices = {name: variant.compressed for name, variant in variants.items()}
params = (
    {}
    if method == "pca"
    else {"sample": sample_choices[sample_label], "include_ids": [focus] if focus is not None else []}
)
keys = {
    name: variant.result.path.name for name, variant in variants.items() if variant.result.path is not None
}


def compute_map(kind: str, progress: ProgressCallback | None = None) -> ProjectionMap:
    """The map (PCA or UMAP) of the original and the variants, from the disk cache when it is there."""
    return projection_map(
        kind,
        backbone.embedding,
        matrices,
        backbone_name=backbone.name,
        fingerprint=backbone_fingerprint(backbone.name),
        variant_keys=keys if len(keys) == len(matrices) else None,
        progress=progress,
        in_child=kind == "umap",  # UMAP's numba loops hold the GIL: in this server they stalled every page
        **(params if kind == "umap" else {}),
    )


@st.fragment(run_every=1.0)
def umap_progress(job: BackgroundJob) -> None:
    """UMAP's progress while PCA is shown; the whole page reruns (and draws UMAP) once it is done."""
    if job.done:
        st.rerun()
    elapsed = time.perf_counter() - job.started
    update = job.progress
    st.progress(
        update.fraction if update else 0.0,
        text=f"UMAP is running in the background ({elapsed:.0f} s; {describe(update) if update else 'starting'}). "
        "PCA is shown meanwhile; this page switches to UMAP by itself, and the other pages can be used.",
    )


shown = method
result: ProjectionMap | None = None
try:
    if method == "umap":
        job_key = (
            backbone.name,
            tuple((name, variant.spec) for name, variant in variants.items()),
            params["sample"],
            tuple(params["include_ids"]) if params["sample"] else (),  # all tokens: the focus is drawn anyway
        )
        board = job_board()
        # PCA before the UMAP job starts, so the map shown meanwhile does not wait behind UMAP's threads.
        pca_first = None if job_key in board.jobs else compute_map("pca")
        job = board.start(job_key, lambda report: compute_map("umap", report))
        wait_for_jobs({"umap": job}, seconds=0.2)  # a map from the disk cache comes back at once (~20 ms)
        if job.done and job.error is not None:
            raise job.error
        if job.done:
            result = job.result
        else:
            with st.container(key="background-jobs"):  # the browser tests and benchmark wait for it to go
                umap_progress(job)
            shown, result = "pca", pca_first
    if result is None:
        with st.spinner(f"PCA map of {backbone.vocab_size:,} tokens…"):
            result = compute_map("pca")
    st.caption(
        f"{shown.upper()} map: {'from the disk cache' if result.from_cache else f'computed in {result.seconds:.1f} s'}."
    )
except EmbvizError as error:
    st.error(str(error))
    st.stop()

note = result.note()
figure = projection_panels(
    result.coords,
    [display_token(t) for t in backbone.tokens],
    focus,
    ids=result.ids,
    sampled_note=note,
    movement_lines=lines,
    provenance=provenance(
        backbone, config, map=shown, **{f"{shown}_{k}": v for k, v in result.params.items()}
    ),
)
figure.update_layout(dragmode="select")  # dragging selects; zoom stays in the toolbar
event = st.plotly_chart(
    figure, width="stretch", key="map_chart", on_select="rerun", selection_mode=("box", "lasso", "points")
)
if note:
    st.info(note)
else:
    st.caption(f"All {backbone.vocab_size:,} tokens are drawn.")

st.caption(
    "Drag a box or lasso (chart toolbar) around points in any panel to list those tokens and their original "
    "neighbours below; choose a row to focus a token on every page."
)

# Displacement against each token's own neighbourhood: a cluster that moves together is not flagged.
original_indices = original_neighbour_table(backbone.name, config.k).indices
neighbour_rows = rows_of(result.ids, original_indices[result.ids])
original_xy = result.coords[ORIGINAL]
moved = {
    name: neighbourhood_displacement(original_xy, xy, neighbour_rows)
    for name, xy in result.coords.items()
    if name != ORIGINAL
}


def map_frame(ids: np.ndarray) -> pd.DataFrame:
    """Tokens with how far they moved from their neighbours in each variant's map, and their neighbours."""
    rows = rows_of(result.ids, ids)
    return pd.DataFrame(
        {
            "token": [display_token(backbone.tokens[i]) for i in ids],
            "id": ids,
            **{f"{name} moved": np.round(values[rows], 3) for name, values in moved.items()},
            "original neighbours": [
                ", ".join(display_token(backbone.tokens[j]) for j in original_indices[i][:5]) for i in ids
            ],
        }
    )


brushed = selected_token_ids(event, {})
brushed = brushed[np.isin(brushed, result.ids)]
if brushed.size:
    st.markdown(f"**{brushed.size:,} selected tokens** (the first 1,000 by id)")
    token_table(map_frame(brushed[:1000]), key="map_brushed")

st.subheader("Tokens that left their neighbourhood")
st.caption(
    f"Distance between a token's position relative to the centroid of its {config.k} original nearest "
    "neighbours, before and after compression (map units; neighbours not drawn are left out). A whole "
    "cluster that shifts scores 0; a token pulled away from its neighbours scores high."
)
pooled = np.nanmax(np.vstack(list(moved.values())), axis=0) if moved else np.zeros(len(result.ids))
order = np.argsort(-np.nan_to_num(pooled, nan=-1.0), kind="stable")[:50]
token_table(map_frame(result.ids[order]), key="map_moved")

table = pd.DataFrame({"token": [backbone.tokens[i] for i in result.ids], "id": result.ids})
for name, coords in result.coords.items():
    table[f"{name}_x"], table[f"{name}_y"] = coords[:, 0], coords[:, 1]
downloads("map", table=table, figure=figure)
