"""Overview: what the loaded backbone is, and how much of it the token embedding takes."""

from __future__ import annotations

import streamlit as st

from pages.common import current_backbone

st.title("embviz")
st.caption("See what compressing a language model's token embeddings does.")

backbone = current_backbone()
if backbone is not None:
    info = backbone.info()
    columns = st.columns(4)
    columns[0].metric("Kind", info.kind)
    columns[1].metric("Vocabulary", f"{info.vocab_size:,}")
    columns[2].metric("Hidden size", info.hidden_size)
    columns[3].metric("Embedding share", f"{info.embedding_share:.0%}")
    st.write(
        f"The token-embedding matrix of **{info.name}** is {info.vocab_size:,} x {info.hidden_size} = "
        f"**{info.embedding_params:,}** parameters out of {info.total_params:,} "
        f"({'tied to' if info.tied else 'separate from'} the output layer)."
    )
    if info.note:
        st.warning(info.note)
    st.json(info.to_dict(), expanded=False)
