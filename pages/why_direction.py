"""Why direction? A toy to play with (SVD vs a direction-loss AE on a few arrows), then the direction / length
2 x 2 on the real model: perplexity and a fill-in-the-blank example for every swap."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, cast

import numpy as np
import pandas as pd
import streamlit as st

from embviz.errors import EmbvizError
from embviz.evaluation import (
    DirectionLengthReport,
    cell_name,
    direction_length_grids,
    direction_length_variants,
)
from embviz.figures import angle_by_length, direction_length_grid, provenance_line, toy_arrows
from embviz.perplexity import DEFAULT_MAX_TOKENS
from embviz.predictions import PredictionResult, predict_blank
from embviz.toy import DEFAULT_WEIGHT, WEIGHTS, ToyResult, toy_comparison
from embviz.vocab import visible_text
from pages.data import angles_of, current_backbone, paper_specs, reconstructions
from pages.routing import use_app_router
from pages.state import settings
from pages.widgets import TEXTS, downloads, explain, progress_bar, provenance, variants_for

DEFAULT_SENTENCE = "The capital of France is ___."
TOP = 3  # predictions shown per cell
KEPT_RESULTS = 16


@st.cache_resource(show_spinner=False, max_entries=64)
def toy_result(dim: int, rank: int, weight: float, seed: int, bias: bool) -> ToyResult:
    """The toy for these settings (a fraction of a second; kept so dragging back is instant)."""
    return toy_comparison(dim, rank, weight, seed=seed, bias=bias)


@st.cache_resource(show_spinner=False)
def computed() -> OrderedDict[Any, Any]:
    """2 x 2 reports and blank predictions computed in this server process, by request (shared by sessions)."""
    return OrderedDict()


def remember(key: Any, value: Any) -> Any:
    """Keep ``value`` under ``key`` in :func:`computed`, dropping the oldest beyond :data:`KEPT_RESULTS`."""
    store = computed()
    store[key] = value
    while len(store) > KEPT_RESULTS:
        store.popitem(last=False)
    return value


def percent(probability: float) -> str:
    return f"{probability:.0%}" if probability >= 0.01 else "<1%"


use_app_router()
st.title("Why direction?")
explain(
    "Every row of an embedding table is an **arrow**: it has a **direction** (where it points) and a "
    "**length** (how long it is). Compressing the table to rank *r* means every arrow must be rebuilt from "
    "only *r* numbers, so something is lost.\n\n"
    "* **SVD** keeps what makes the overall error smallest. Long arrows carry most of that error, so SVD "
    "looks after them and lets short ones turn away.\n"
    "* The **direction-loss AutoEncoder** (Bałazy et al., *Direction is what you need*) is trained mostly on "
    "the **angle** between each arrow and its rebuild (the cosine term), with a small |error| term that keeps "
    "lengths sensible. Every arrow's direction counts the same, long or short.\n\n"
    "**1. The toy** lets you see this with a handful of 2-D or 3-D arrows. **2. The real model** then asks "
    "which part the language model actually needs: we mix the directions of one table with the lengths of "
    "another and measure how surprised the model is by real text (perplexity: lower is better)."
)

# -- 1. the toy ------------------------------------------------------------------------------------------
st.header("1. A toy you can play with")
controls = st.columns([1.2, 1.4, 2.2, 1.2])
dim = 3 if controls[0].radio("Arrows in", ["2-D", "3-D"], horizontal=True, key="toy_dim") == "3-D" else 2
if int(st.session_state.get("toy_rank", 1)) > dim:  # 3-D rank 3, then 2-D: keep the slider in range
    st.session_state["toy_rank"] = dim
rank = int(
    controls[1].slider(
        "Rank r",
        1,
        dim,
        1,
        key="toy_rank",
        help=f"How many numbers each arrow is squeezed into ({dim} = none lost)",
    )
)
weight = float(
    controls[2].select_slider(
        "AE direction weight w",
        options=list(WEIGHTS),
        value=DEFAULT_WEIGHT,
        key="toy_weight",
        format_func=lambda w: f"{w:g}",
        help="The AE's loss is w x cosine term + (1 - w) x |error| term. 0: lengths and positions only; 1: "
        f"directions only; {DEFAULT_WEIGHT:g}: about the paper's balance.",
    )
)
seed = int(controls[3].number_input("Arrows (seed)", 0, 999, 0, key="toy_seed", help="Draw other arrows"))
bias = st.checkbox(
    "Give the AE a bias (the real one has one)",
    key="toy_bias",
    help="Off: the AE is the same kind of rank-r map as SVD, so only the loss differs. On: it may also shift "
    "everything by a fixed vector, which in 2-D or 3-D is a big extra freedom (in 576-D it is a small one).",
)
try:
    toy = toy_result(dim, rank, weight, seed, bias)
except EmbvizError as error:
    st.error(str(error))
    st.stop()
svd_fit, ae_fit = toy.fits["SVD"], toy.fits["AE"]
metrics = st.columns(4)
metrics[0].metric("SVD mean angle", f"{svd_fit.mean_angle:.1f}°")
metrics[1].metric(
    "AE mean angle",
    f"{ae_fit.mean_angle:.1f}°",
    delta=f"{ae_fit.mean_angle - svd_fit.mean_angle:+.1f}° vs SVD",
    delta_color="inverse",
)
metrics[2].metric("SVD length kept (mean)", f"{svd_fit.mean_length_ratio:.0%}")
metrics[3].metric("AE length kept (mean)", f"{ae_fit.mean_length_ratio:.0%}")
toy_note = provenance_line(
    "toy arrows", dims=dim, rank=rank, direction_weight=f"{weight:g}", ae_bias=bias, seed=seed
)
arrows = toy_arrows(
    toy.vectors,
    {name: fit.reconstruction for name, fit in toy.fits.items()},
    {name: fit.angles for name, fit in toy.fits.items()},
    spans={name: (fit.basis, fit.offset) for name, fit in toy.fits.items()},
    provenance=toy_note,
)
st.plotly_chart(arrows, width="stretch")
st.caption(
    "Grey: the original arrows. Coloured: each method's rebuild. Dashed line / shaded plane: everything a "
    "rank-r map can produce. Orange arcs: the angle each arrow turned. Hover a tip for its numbers."
)
left, right = st.columns([3, 2])
left.plotly_chart(
    angle_by_length(toy.lengths, {name: fit.angles for name, fit in toy.fits.items()}, provenance=toy_note),
    width="stretch",
)
right.markdown("**What the toy shows**")
right.markdown(toy.summary())
right.markdown(
    "Drag **w** towards 1 and the AE turns its line (or plane) towards where most arrows point, whatever their "
    "length; towards 0 it behaves more like SVD. Try rank 1 in 3-D for the biggest difference."
)
with st.expander("Every arrow's numbers"):
    st.dataframe(pd.DataFrame(toy.table()), hide_index=True, width="stretch")

# -- 2. the real model -----------------------------------------------------------------------------------
st.header("2. On the real model: swap directions and lengths")
config = settings()
backbone = current_backbone()
if backbone is None:
    st.stop()
st.markdown(
    f"Now the arrows are the {backbone.vocab_size:,} rows of **{backbone.name}**'s embedding table "
    f"({backbone.hidden_size} numbers each), compressed to rank **{config.rank}** by SVD and by the AE "
    "(change the rank and the AE's loss in the sidebar). For each method we build two mixed tables: its "
    "**directions with the original lengths**, and the **original directions with its lengths**. Together "
    "with the original and the compressed table itself that makes a 2 x 2. If perplexity depends on "
    "direction, fixing the directions should fix almost everything and fixing the lengths very little."
)
variants = variants_for(backbone, config, specs=paper_specs(backbone.name, config))  # the paper's pair
if variants is None:
    st.stop()

pick = st.columns([1, 2])
text = pick[0].selectbox("Held-out text", TEXTS, key="why_text", help="The Perplexity page's held-out texts")
sentence = pick[1].text_input("Fill-in-the-blank example", DEFAULT_SENTENCE, key="why_sentence")
specs = tuple((name, variant.spec) for name, variant in variants.items())
request = ("grid", backbone.name, specs, text, config.mode)
blank_request = ("blank", backbone.name, specs, sentence, config.mode)
store = computed()
if request not in store:
    offer = st.empty()
    with offer.container():
        passes = 1 + 4 * len(variants)
        st.info(
            f"Scoring the 2 x 2 of {' and '.join(variants)} takes up to {passes} passes of the model over the "
            f"first {DEFAULT_MAX_TOKENS:,} tokens of {text} (on smollm2 with 2 CPU cores, about half a minute "
            "each the first time). Every perplexity is cached on disk, so afterwards this takes a second."
        )
        clicked = st.button("Compute the 2 x 2", type="primary")
    if not clicked:
        st.stop()
    offer.empty()
    try:
        with st.status("Scoring every cell of the 2 x 2…", expanded=True) as status:
            report = direction_length_grids(
                backbone,
                {name: variant.compressed for name, variant in variants.items()},
                text=text,
                mode=config.mode,
                progress=progress_bar(),
            )
            status.update(
                label=f"Scored in {report.seconds:.0f} s (cached on disk)", state="complete", expanded=False
            )
    except EmbvizError as error:
        st.error(str(error))
        st.stop()
    remember(request, report)
report = cast(DirectionLengthReport, store[request])

prediction: PredictionResult | None = store.get(blank_request)
if prediction is None:
    try:
        with st.spinner(f"Filling in the blank with {1 + 3 * len(variants)} tables…"):
            matrices = direction_length_variants(backbone.embedding, reconstructions(variants))
            prediction = predict_blank(
                backbone, sentence, {"original": None, **matrices}, k=TOP, mode=config.mode
            )
            del matrices
        remember(blank_request, prediction)
    except EmbvizError as error:
        st.error(str(error))


def top_words(cell: str) -> list[str]:
    """The cell's top predictions for the blank, as ``'␣Paris' 56%`` (none without predictions)."""
    if prediction is None or cell not in prediction.variants:
        return []
    return [
        f"'{visible_text(p.token)}' {percent(p.probability)}" for p in prediction.variants[cell].predictions
    ]


cells = {
    name: {(d, n): grid.cell(d, n) for d in ("original", name) for n in ("original", name)}
    for name, grid in report.grids.items()
}
notes = {
    name: {key: next(iter(top_words(cell_name(name, *key))), "") for key in grid_cells}
    for name, grid_cells in cells.items()
}
note = provenance(backbone, config, text=text, mode=config.mode, tokens=DEFAULT_MAX_TOKENS)
figure = direction_length_grid(
    cells,
    notes=notes if prediction is not None else None,
    provenance=note,
    title="Perplexity (lower is better): whose directions x whose lengths"
    + (f" · top word for “{sentence}”" if prediction is not None else ""),
)
st.plotly_chart(figure, width="stretch")

st.subheader("In plain words")
for grid in report.grids.values():
    st.markdown(f"- {grid.summary()}")
st.markdown(
    "So the language model reads an embedding row mostly by **where it points**: with the right directions "
    "the lengths hardly matter, while with the wrong directions the right lengths do not help. That is why "
    "a compressor should be judged by the angles it keeps, not only by its overall error."
)
angles = angles_of(backbone, variants)
st.caption(
    "Angles on the whole vocabulary (see the Angles page): "
    + "; ".join(
        f"{name}: mean angle {np.nanmean(a.degrees):.1f}°, rows keep {np.nanmean(a.norm_ratio):.0%} of their "
        "length on average"
        for name, a in angles.items()
    )
    + ". The mean alone does not decide perplexity: which rows keep their direction matters too."
)

rows = [
    {**row, f"top {TOP} for the blank": ", ".join(top_words(row["cell"]))}
    for row in report.table()
    if row["cell"] != "original" or row["variant"] == next(iter(report.grids))
]
table = pd.DataFrame(rows).drop(columns=["variant"])
if prediction is not None:
    st.markdown(f"**“{sentence}”** in every cell (the original model first):")
st.dataframe(table, hide_index=True, width="stretch")
st.caption(f"Perplexity protocol: {report.protocol}. Substitution mode: {config.mode}.")
payload = {"grids": report.to_dict(), "blank": prediction.to_dict() if prediction is not None else None}
downloads("why-direction", table=table, payload=payload, figure=figure)
