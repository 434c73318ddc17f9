"""Map: the vocabulary in 2-D, original / SVD / AE in one shared frame (fit on the original)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from embviz.errors import EmbvizError
from embviz.figures import projection_panels
from embviz.projections import projection_map
from embviz.vocab import display_token
from pages.data import backbone_fingerprint
from pages.routing import use_app_router
from pages.state import warn_ignored_url_values
from pages.widgets import downloads, explain, focus_token_id, progress_bar, provenance, require_variants

use_app_router()
st.title("Map of the vocabulary")
explain(
    "Each point is a token. The 2-D layout is **fitted on the original** embedding; the SVD and AE "
    "reconstructions are then **placed with the same fitted map**, so the three panels share one frame and "
    "you can see where the compression moves tokens. **PCA** (the two directions of largest variance) is "
    "instant and exact; **UMAP** keeps local neighbourhoods and takes a minute or two the first time (it "
    "is cached on disk afterwards). The focus token is highlighted in every panel."
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
st.plotly_chart(figure, width="stretch")
if note:
    st.info(note)
else:
    st.caption(f"All {backbone.vocab_size:,} tokens are drawn.")

table = pd.DataFrame({"token": [backbone.tokens[i] for i in result.ids], "id": result.ids})
for name, coords in result.coords.items():
    table[f"{name}_x"], table[f"{name}_y"] = coords[:, 0], coords[:, 1]
downloads("map", table=table, figure=figure)
