"""Angles: how far each reconstructed row turns from the original, and how its length changes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from embviz.figures import angle_histogram, class_breakdown_bar, norm_ratio_histogram
from embviz.metrics import FREQUENCY_BANDS, TOKEN_CLASSES
from embviz.vocab import display_token
from pages.data import angles_of, token_groups
from pages.routing import use_app_router
from pages.state import warn_ignored_url_values
from pages.widgets import downloads, explain, provenance, require_variants

use_app_router()
st.title("Reconstruction angles")
explain(
    "For every token we measure the **angle** between its original embedding row and its reconstruction "
    "(0° = same direction) and the **norm ratio** ||x̂|| / ||x|| (1 = same length). The paper's claim is "
    "that direction matters most: the AE trades some length error for smaller angles. The split shows which "
    "kinds of tokens (whole words, subword pieces, digits, punctuation, rare or frequent in the Bible "
    "`train` slice) suffer most."
)

config, backbone, variants = require_variants()

angles = angles_of(backbone, variants)
note = provenance(backbone, config)
columns = st.columns(2 * len(angles))
for i, (name, result) in enumerate(angles.items()):
    columns[2 * i].metric(f"{name} median angle", f"{np.nanmedian(result.degrees):.1f}°")
    columns[2 * i + 1].metric(f"{name} mean norm ratio", f"{np.nanmean(result.norm_ratio):.3f}")

left, right = st.columns(2)
angle_figure = angle_histogram({name: a.degrees for name, a in angles.items()}, provenance=note)
left.plotly_chart(angle_figure, width="stretch")
ratio_figure = norm_ratio_histogram({name: a.norm_ratio for name, a in angles.items()}, provenance=note)
right.plotly_chart(ratio_figure, width="stretch")

st.subheader("By kind of token")
split = st.radio(
    "Split by", ["token class", "corpus frequency"], horizontal=True, key="split", bind="query-params"
)
warn_ignored_url_values(("split",))
with st.spinner("Counting token frequencies in the Bible train slice (cached)…"):
    groups = token_groups(backbone.name, "class" if split == "token class" else "frequency")
order = TOKEN_CLASSES if split == "token class" else FREQUENCY_BANDS
present = [group for group in order if (groups == group).any()]
values = {
    name: {group: float(np.nanmean(a.degrees[groups == group])) for group in present}
    for name, a in angles.items()
}
counts = {group: int((groups == group).sum()) for group in present}
bars = class_breakdown_bar(
    values,
    metric="mean angle (degrees)",
    counts=counts,
    order=present,
    provenance=note,
    group_title="token class" if split == "token class" else "frequency band",
)
st.plotly_chart(bars, width="stretch")

st.subheader("Tokens in an angle range")
variant = st.selectbox("Variant", list(angles), key="angles_variant")
degrees = angles[variant].degrees
finite = degrees[np.isfinite(degrees)]
top = float(np.ceil(finite.max())) if finite.size else 90.0
low, high = st.slider("Angle range (degrees)", 0.0, max(top, 1.0), (min(60.0, top), max(top, 1.0)), step=0.5)
chosen = np.flatnonzero((degrees >= low) & (degrees <= high))
order_ids = chosen[np.argsort(-degrees[chosen], kind="stable")]
table = pd.DataFrame(
    {
        "token": [display_token(backbone.tokens[i]) for i in order_ids],
        "id": order_ids,
        "group": groups[order_ids],
        **{f"{name} angle": np.round(a.degrees[order_ids], 2) for name, a in angles.items()},
        **{f"{name} norm ratio": np.round(a.norm_ratio[order_ids], 3) for name, a in angles.items()},
    }
)
st.caption(f"{len(table):,} tokens with a {variant} angle between {low:g}° and {high:g}° (largest first).")
st.dataframe(table.head(500), hide_index=True, width="stretch")
downloads("angles", table=table, figure=angle_figure)
