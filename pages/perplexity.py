"""Perplexity: zero-shot perplexity against compression ratio for every method, uncompressed line included."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from embviz.compressors import METHODS
from embviz.errors import EmbvizError
from embviz.evaluation import sweep
from embviz.figures import perplexity_curve, provenance_line
from pages.common import current_backbone, downloads, explain, settings, use_app_router

TEXTS = ("bible:test", "shakespeare:test", "britannica:test")
RATIOS = (2.0, 4.0, 8.0, 16.0)
SWEEP_METHODS = ("svd", "ae-paper", "ae-mse", "ae-cosine", "svd-randomized")

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

controls = st.columns([3, 2, 2])
methods = controls[0].multiselect(
    "Methods", SWEEP_METHODS, default=["svd", "ae-paper"], key="ppl_methods", format_func=lambda m: METHODS[m]
)
ratios = controls[1].multiselect(
    "Compression ratios", RATIOS, default=[4.0, 8.0], key="ppl_ratios", format_func=lambda r: f"{r:g}x"
)
text = controls[2].selectbox("Held-out text", TEXTS, key="ppl_text")
st.caption(
    f"Substitution mode: **{config.mode}** · AE recipe: **{config.recipe}** (change them in the "
    "sidebar). Every variant is scored on the same tokens (and, for masked models, the same masks)."
)

request = (backbone.name, tuple(methods), tuple(sorted(ratios)), text, config.mode, config.recipe)
results: dict = st.session_state.setdefault("ppl_results", {})
if st.button("Compute the sweep", type="primary", disabled=not (methods and ratios)):
    try:
        with st.status(f"Sweeping {len(methods)} methods x {len(ratios)} ratios…", expanded=True) as status:
            bar = st.progress(0.0)
            rows = sweep(
                backbone,
                list(methods),
                ratios=sorted(ratios),
                text=text,
                mode=config.mode,
                k=config.k,
                recipe=config.recipe,
                progress=lambda done, total, message: bar.progress(done / max(total, 1), text=message),
            )
            status.update(
                label="Sweep done (artifacts and perplexities are cached on disk)",
                state="complete",
                expanded=False,
            )
        results[request] = rows
    except EmbvizError as error:
        st.error(str(error))

rows = results.get(request)
if rows is None:
    st.info(
        "Pick methods and ratios, then compute. Trained AEs and perplexities are cached on disk, so a "
        "repeated sweep is fast; the first AE per ratio trains for a while."
    )
    st.stop()

figure = perplexity_curve(
    rows, provenance=provenance_line(backbone.name, text=text, mode=config.mode, recipe=config.recipe, seed=1)
)
st.plotly_chart(figure, use_container_width=True)
table = pd.DataFrame(rows)
st.dataframe(table, hide_index=True, use_container_width=True)
downloads("perplexity", table=table, figure=figure)
