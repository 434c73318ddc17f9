"""embviz: `streamlit run app.py`. Shared controls live here; each view is a page in pages/."""

from __future__ import annotations

import streamlit as st

from pages.common import backbone_choices, default_backbone

st.set_page_config(page_title="embviz", page_icon="🧭", layout="wide")

with st.sidebar:
    choices = backbone_choices()
    st.selectbox(
        "Backbone",
        choices,
        index=choices.index(default_backbone()),
        key="model",
        bind="query-params",
        help="Packaged models load offline; smollm2 is the default.",
    )

navigation = st.navigation([st.Page("pages/overview.py", title="Overview", icon="🏠", default=True)])
navigation.run()
