"""embviz: `streamlit run app.py`. Shared controls live here (bound to the URL); each view is in pages/,
listed once in pages/navigation.py."""

from __future__ import annotations

import streamlit as st

from embviz.compressors import method_ids
from embviz.errors import EmbvizError
from embviz.threads import APP, configure_threads
from pages.navigation import streamlit_pages
from pages.state import (
    BOUND_KEYS,
    LOSSES,
    MAX_COMPARED,
    MODES,
    OTHER_MODEL,
    RECIPE_CHOICES,
    apply_pending_settings,
    backbone_choices,
    default_backbone,
    default_compared,
    remember_url_request,
    warn_ignored_url_values,
)
from pages.widgets import cache_warning, offer_mlm_head, variant_option_label

st.set_page_config(page_title="embviz", page_icon="🧭", layout="wide")

# The browser showing this page shares the machine's cores with the server: leave it one (embviz.threads).
try:
    configure_threads(APP)
except EmbvizError as error:
    st.error(str(error))

# Streamlit drops URL values a widget cannot take (rank=abc, model=zzz) and falls back to the default;
# remember what the URL asked for so the user is told instead of silently ignored.
remember_url_request()

with st.sidebar:
    st.header("embviz")
    choices = backbone_choices()
    apply_pending_settings()
    model = st.selectbox(
        "Backbone",
        choices,
        index=choices.index(default_backbone()),
        key="model",
        bind="query-params",
        help="Packaged models load offline; smollm2 is the default.",
    )
    offer_mlm_head(model)
    if model == OTHER_MODEL:
        st.text_input(
            "Model folder or hub id",
            key="path",
            bind="query-params",
            placeholder="/path/to/bert-base-uncased or gpt2",
        )
    st.number_input(
        "Rank (latent size r)",
        min_value=1,
        value=64,
        step=8,
        key="rank",
        bind="query-params",
        help="Both SVD and the AE keep r numbers per token plus an r x D decoder.",
    )
    st.selectbox(
        "AE loss",
        LOSSES,
        key="loss",
        bind="query-params",
        help="paper: cosine + annealed |error|^alpha (the paper's); cosine only; MSE only.",
    )
    st.selectbox(
        "AE recipe",
        RECIPE_CHOICES,
        key="recipe",
        bind="query-params",
        help="fast: SVD warm start, large batches; paper: Adam 1e-3, batch 32, 30 epochs.",
    )
    st.multiselect(
        "Compare with the original",
        method_ids(),
        default=default_compared(),
        key="cmp",
        bind="query-params",
        max_selections=MAX_COMPARED,
        accept_new_options=True,  # names with a size: svd@128
        help="Up to three variants, each a registered method (`embviz methods` lists them) at the rank above: "
        "byte-sized methods at the same bytes, fixed-size ones at their own size. Type a size after @: "
        "svd@128 (rank), quant-mixed@8x (8x fewer bytes than float32), vq-direction@1b (1 bit per weight).",
    )
    st.caption(" · ".join(variant_option_label(name) for name in st.session_state.get("cmp") or []))
    st.selectbox(
        "Substitution",
        MODES,
        key="mode",
        bind="query-params",
        help="input: only the input embedding is replaced (the paper); tied: the output layer too.",
    )
    st.text_input(
        "Focus token",
        value="king",
        key="tok",
        bind="query-params",
        help="A word or token, e.g. paris; #123 for a raw id.",
    )
    st.number_input("Neighbours k", min_value=1, max_value=100, value=10, key="k", bind="query-params")

warn_ignored_url_values(BOUND_KEYS)
cache_warning()

st.navigation(streamlit_pages()).run()
