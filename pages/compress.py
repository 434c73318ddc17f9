"""Compress: the backbone's facts, and the SVD and AE variants at the chosen rank (train or load)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from embviz.compressors import ratio_for_rank
from embviz.figures import training_curve
from pages.data import current_backbone, paper_specs, quality_of
from pages.routing import use_app_router
from pages.state import settings
from pages.widgets import downloads, explain, provenance, variants_for

use_app_router()
st.title("Compress the token embedding")
explain(
    "A language model looks up every token in an **embedding matrix** E with one row per vocabulary entry. "
    "Here E is replaced by a low-rank version with **r** numbers per token plus a shared r x D decoder:\n\n"
    "- **SVD** keeps the r directions of largest variance (the best possible in squared error);\n"
    "- the **AutoEncoder (AE)** learns its codes and decoder with a loss that cares about the **direction** "
    "(cosine) of each row, which is what the model's attention and output layer mostly read.\n\n"
    "Both use the same number of parameters. *Mean cosine* close to 1 means rows keep their direction; "
    "*relative error* is the Euclidean error ||E - Ê|| / ||E||."
)

config = settings()
backbone = current_backbone()
if backbone is None:
    st.stop()

info = backbone.info()
columns = st.columns([3, 2, 3, 2, 2])
columns[0].metric("Backbone", info.name if len(info.name) < 24 else "…" + info.name[-22:])
columns[1].metric("Kind", info.kind)
columns[2].metric("Embedding", f"{info.vocab_size:,} × {info.hidden_size}", help="vocabulary x hidden size")
columns[3].metric(
    "Embedding share", f"{info.embedding_share:.0%}", help=f"{info.embedding_params:,} parameters"
)
columns[4].metric("Tied output layer", "yes" if info.tied else "no")
if info.note:
    st.warning(info.note)

variants = variants_for(backbone, config, specs=paper_specs(backbone.name, config))
if variants is None:
    st.stop()

ratio = ratio_for_rank(backbone.vocab_size, backbone.hidden_size, config.rank)
st.subheader(f"Rank {config.rank}: {ratio:.1f}x fewer embedding parameters")
rows = []
for name, variant in variants.items():
    compressed = variant.compressed
    quality = quality_of(backbone, variant)
    rows.append(
        {
            "variant": name,
            "method": compressed.label,
            "rank": compressed.rank,
            "params": compressed.params,
            "bytes": compressed.bytes,
            "ratio": round(compressed.ratio, 2),
            "train_seconds": round(compressed.train_seconds, 1),
            "mean_cosine": round(quality["mean_cosine"], 4),
            "relative_error": round(quality["relative_error"], 4),
            "from_cache": variant.result.cached,
        }
    )
table = pd.DataFrame(rows)
st.dataframe(table, hide_index=True, width="stretch")
cosines = table.set_index("variant")["mean_cosine"]
if cosines.get("AE", 0) > cosines.get("SVD", 0):
    st.success(
        f"The AE keeps directions better: mean cosine {cosines['AE']:.3f} vs SVD {cosines['SVD']:.3f}."
    )
else:
    st.info(
        f"Mean cosine: AE {cosines.get('AE', float('nan')):.3f}, SVD {cosines.get('SVD', float('nan')):.3f}."
    )

history = variants["AE"].compressed.history
figure = None
if history:
    figure = training_curve(history, provenance=provenance(backbone, config))
    st.plotly_chart(figure, width="stretch")
else:
    st.caption("No training history stored for this AE.")
downloads("compress", table=table, figure=figure)
