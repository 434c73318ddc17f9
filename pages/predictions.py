"""Predictions: fill in the blank with the original and each compared variant side by side."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from embviz.errors import EmbvizError
from embviz.predictions import prediction_table
from embviz.vocab import visible_text
from pages.data import current_backbone, predictions_of
from pages.routing import use_app_router
from pages.state import settings
from pages.widgets import downloads, explain, variants_for

EXAMPLES = (
    "I went to the ___ to buy some bread.",
    "The capital of France is ___.",
    "In the beginning God created the heavens and the ___.",
    "To be, or not to ___, that is the question.",
    "She opened the door and saw a small ___ sitting on the floor.",
)
EVERYDAY = (
    "It is raining, so take your ___ with you.",
    "We had pizza for ___ last night.",
    "My phone is almost out of ___.",
    "He is taller ___ his brother.",
    "Please turn off the ___ when you leave.",
)

use_app_router()
st.title("Fill in the blank")
explain(
    "Type a sentence with one blank (`___` or `[MASK]`). Each variant of the model proposes the most likely "
    "tokens for the blank, with probabilities. For a masked model (BERT) this is its native fill-mask; for a "
    "causal model (like SmolLM2, which reads left to right) the candidates for the next token at the blank "
    "are **re-ranked by how likely the whole sentence becomes** with each candidate filled in, so the words "
    "after the blank count too. Marked **new**: a token not in the original's list."
)

config = settings()
backbone = current_backbone()
if backbone is None:
    st.stop()
if not backbone.trained_head:
    st.warning(f"{backbone.name}: {backbone.note}. Its predictions show what changes, not what is right.")
elif backbone.note:
    st.info(f"{backbone.name}: {backbone.note}.")
variants = variants_for(backbone, config)
if variants is None:
    st.stop()

if "sentence" not in st.session_state and "sentence" not in st.query_params:
    # A shared link may carry the sentence as ?sentence=... (the bound key) or the short ?s=...
    st.session_state["sentence"] = st.query_params.get("s", EXAMPLES[0])
for examples, label in ((EXAMPLES, "From the corpora's world"), (EVERYDAY, "Everyday English")):
    st.caption(label)
    for column, example in zip(st.columns(len(examples)), examples, strict=True):
        if column.button(example, key=f"example-{example}", width="stretch"):
            st.session_state["sentence"] = example
sentence = st.text_input("Sentence with a blank", key="sentence", bind="query-params")

try:
    with st.spinner(f"Predicting with the original and {len(variants)} variants…"):
        result = predictions_of(backbone, sentence, variants, config.k, config.mode)
except EmbvizError as error:
    st.error(str(error))
    st.stop()

for notice in result.notices:
    st.info(notice)
columns = st.columns(len(result.variants))
for column, (name, predictions) in zip(columns, result.variants.items(), strict=True):
    column.markdown(f"**{name}**")
    if name != result.reference:
        column.metric(
            "KL from the original",
            f"{predictions.kl_nats:.3f} nats",
            help="How far this variant's whole-vocabulary distribution at the blank is from the original's "
            "(0 = identical)"
            + (
                "; for a causal model, the next-token distribution given the words before the blank"
                if result.kind == "causal"
                else ""
            ),
        )
        if predictions.top1_kept:
            column.success("original top-1 kept")
        elif predictions.reference_top1_rank:
            column.warning(f"original top-1 now at rank {predictions.reference_top1_rank}")
        else:
            column.markdown(f":red[original top-1 not in its top {config.k}]")
    frame = pd.DataFrame(
        [
            {
                "token": visible_text(p.token),
                "probability": round(p.probability, 4),
                "new": "new" if p.new else "",
            }
            for p in predictions.predictions
        ]
    )
    column.dataframe(frame, hide_index=True, width="stretch")
    if predictions.lost:
        column.caption("lost: " + ", ".join(visible_text(t.strip()) for t in predictions.lost))
st.caption(f"{result.method} · {backbone.name} · mode {config.mode} · computed in {result.seconds:.2f} s")
downloads("predictions", table=pd.DataFrame(prediction_table(result)), payload=result.to_dict())
