"""Shared Streamlit plumbing for the pages: cached backbone, shared controls, error display.

Kept thin: everything computed here comes from the UI-free ``embviz`` package.
"""

from __future__ import annotations

import os

import streamlit as st

from embviz.backbones import BUILTINS, DEFAULT_BACKBONE, Backbone
from embviz.errors import EmbvizError


def default_backbone() -> str:
    """The packaged default, overridable with ``EMBVIZ_BACKBONE`` (tests point it at a tiny model)."""
    return os.environ.get("EMBVIZ_BACKBONE", DEFAULT_BACKBONE)


@st.cache_resource(show_spinner=False, max_entries=2)
def load_backbone(name: str) -> Backbone:
    """One shared copy of each backbone per server process (sessions never mutate it)."""
    return Backbone.from_pretrained(name)


def backbone_choices() -> list[str]:
    names = list(BUILTINS)
    default = default_backbone()
    return names if default in names else [default, *names]


def current_backbone() -> Backbone | None:
    """The backbone picked in the sidebar, loaded under a spinner; errors are shown, not raised."""
    name = st.session_state.get("model") or default_backbone()
    try:
        with st.spinner(f"Loading {name} (the first load of smollm2 converts its GGUF once, about 25 s)…"):
            return load_backbone(name)
    except EmbvizError as error:
        st.error(str(error))
        return None
