"""Map: the vocabulary in 2-D, the original and each variant in one shared frame (fit on the original)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from embviz.errors import EmbvizError
from embviz.figures import projection_panels
from embviz.projections import ORIGINAL, neighbourhood_displacement, projection_map, rows_of
from embviz.vocab import display_token
from pages.data import backbone_fingerprint, original_neighbour_table
from pages.routing import use_app_router
from pages.state import warn_ignored_url_values
from pages.widgets import (
    downloads,
    explain,
    focus_token_id,
    progress_bar,
    provenance,
    require_variants,
    selected_token_ids,
    token_table,
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
try:
    with st.status(
        f"{method.upper()} map of {backbone.vocab_size:,} tokens…", expanded=method == "umap"
    ) as status:
        progress = progress_bar()
        result = projection_map(
            method,
            backbone.embedding,
            matrices,
            backbone_name=backbone.name,
            fingerprint=backbone_fingerprint(backbone.name),
            variant_keys=keys if len(keys) == len(matrices) else None,
            progress=progress,
            **params,
        )
        status.update(
            label=f"{method.upper()} map ready ({'from cache' if result.from_cache else f'{result.seconds:.1f} s'})",
            state="complete",
            expanded=False,
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
        backbone, config, map=method, **{f"{method}_{k}": v for k, v in result.params.items()}
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
original_indices, _ = original_neighbour_table(backbone.name, config.k)
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
