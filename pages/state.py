"""The shared settings: the sidebar controls bound to the URL, read back as one frozen :class:`Settings`.

Option lists come from the core (:data:`embviz.compressors.SIMPLE_LOSSES`, :data:`~embviz.compressors.RECIPES`,
:data:`embviz.backbones.MODES`, :func:`embviz.sources.builtin_names`); this module only orders them for the
sidebar and remembers what the URL asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import cast

import streamlit as st

from embviz.backbones import MODES, Mode
from embviz.compressors import RECIPES, SIMPLE_LOSSES
from embviz.sources import DEFAULT_BACKBONE, builtin_names

__all__ = [
    "BOUND_KEYS",
    "DEFAULT_RECIPE",
    "LOSSES",
    "MAX_COMPARED",
    "MODES",
    "OTHER_MODEL",
    "RECIPE_CHOICES",
    "Settings",
    "apply_pending_settings",
    "backbone_choices",
    "default_backbone",
    "default_compared",
    "remember_url_request",
    "request_focus",
    "request_model_switch",
    "request_settings",
    "settings",
    "warn_ignored_url_values",
]

OTHER_MODEL = "other…"
BOUND_KEYS = ("model", "path", "rank", "loss", "recipe", "cmp", "mode", "tok", "k")
"""The sidebar's widget keys, each bound to the URL parameter of the same name."""
LOSSES = SIMPLE_LOSSES
DEFAULT_RECIPE = "fast"
RECIPE_CHOICES = tuple(sorted(RECIPES, key=lambda name: name != DEFAULT_RECIPE))
"""The core's recipes, the sidebar's default first."""

_URL_REQUEST = "_embviz_url_request"
_PENDING = "_embviz_pending_settings"


@dataclass(frozen=True)
class Settings:
    """The shared controls (sidebar, bound to the URL), validated."""

    model: str
    rank: int
    loss: str
    recipe: str
    mode: Mode
    token: str
    k: int
    compared: tuple[str, ...] = ()
    """The variant names the views compare (``svd``, ``ae-paper``, ``quant-mixed@4b``: see
    :mod:`embviz.compressors.selection`), one to :data:`MAX_COMPARED`."""

    @property
    def ae_method(self) -> str:
        return f"ae-{self.loss}"


MAX_COMPARED = 3


def default_compared(loss: str = "paper") -> list[str]:
    """The picker's default: SVD and the AE with ``loss``, the paper's comparison."""
    return ["svd", f"ae-{loss}"]


def settings() -> Settings:
    """The current shared settings, read from ``st.session_state`` (set by the widgets in ``app.py``)."""
    state = st.session_state
    model = state.get("model") or default_backbone()
    if model == OTHER_MODEL:
        model = (state.get("path") or "").strip() or default_backbone()
    return Settings(
        model=model,
        rank=int(state.get("rank") or 64),
        loss=state.get("loss") or "paper",
        recipe=state.get("recipe") or DEFAULT_RECIPE,
        mode=cast(Mode, state.get("mode") or "input"),
        token=(state.get("tok") or "").strip(),
        k=int(state.get("k") or 10),
        compared=tuple(state.get("cmp") or default_compared(state.get("loss") or "paper")),
    )


# -- the URL ---------------------------------------------------------------------------------------------
def remember_url_request() -> None:
    """Keep what the URL asked for at the start of this run: Streamlit drops values a widget cannot take
    (``rank=abc``, ``model=zzz``) and falls back to the default; :func:`warn_ignored_url_values` tells the user."""
    st.session_state[_URL_REQUEST] = dict(st.query_params)


def warn_ignored_url_values(keys: tuple[str, ...]) -> None:
    """One warning per URL value among ``keys`` that its (already drawn) widget could not take."""
    requested = st.session_state.get(_URL_REQUEST, {})
    for key in keys:
        used = st.session_state.get(key, "")
        if isinstance(used, list):  # the variant picker takes any name; compared_specs reports bad ones
            continue
        if key in requested and str(used) != str(requested[key]):
            st.warning(
                f"Ignored the URL value {key}={requested[key]!r}: not a valid choice here; using {used!r}."
            )


# -- the backbone ----------------------------------------------------------------------------------------
def default_backbone() -> str:
    """The packaged default, overridable with ``EMBVIZ_BACKBONE`` (tests point it at a tiny model)."""
    return os.environ.get("EMBVIZ_BACKBONE", DEFAULT_BACKBONE)


def backbone_choices() -> list[str]:
    """Built-in names (a fitted-head backbone such as ``minilm-mlm`` only once built), the default, "other"."""
    names = builtin_names(ready_only=True)
    default = default_backbone()
    return ([] if default in names else [default]) + names + [OTHER_MODEL]


def request_model_switch(name: str) -> None:
    """Select backbone ``name`` on the next run (the model widget is already drawn in this one)."""
    request_settings(model=name)


def request_focus(token_id: int) -> None:
    """Make token ``token_id`` the focus token (``#id``) on every page, from the next run on."""
    request_settings(tok=f"#{token_id}")


def request_settings(**values: object) -> None:
    """Set sidebar widgets (by key) on the next run: a drawn widget's value cannot change in this one."""
    st.session_state.setdefault(_PENDING, {}).update(values)


def apply_pending_settings() -> None:
    """Apply :func:`request_settings` from the previous run (call before the sidebar widgets are drawn)."""
    pending = st.session_state.pop(_PENDING, None) or {}
    for key, value in pending.items():
        st.session_state[key] = value  # the bound widget then updates the URL
        st.session_state.get(_URL_REQUEST, {}).pop(key, None)  # a change, not an ignored URL value
