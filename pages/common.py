"""Shared Streamlit plumbing for the pages: settings from the sidebar, cached models and variants.

Kept thin: every number comes from the UI-free ``embviz`` package; this module only decides what is cached
for the server process (``st.cache_resource``), draws progress, and turns errors into messages.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
import torch

from embviz.artifacts import ArtifactResult, artifact_path, compress_cached, matrix_fingerprint
from embviz.backbones import BUILTINS, DEFAULT_BACKBONE, Backbone
from embviz.cache import cache_problem
from embviz.compressors import (
    METHODS,
    CompressedEmbedding,
    TrainingProgress,
    make_compressor,
    ratio_for_rank,
    reconstruction_quality,
)
from embviz.errors import EmbvizError
from embviz.figures import provenance_line
from embviz.metrics import (
    Angles,
    corpus_frequencies,
    frequency_bands,
    nearest_neighbours,
    neighbour_table_cached,
    reconstruction_angles,
    token_classes,
)

ORIGINAL = "original"
AE_LOSSES = ("paper", "cosine", "mse")
RECIPES = ("fast", "paper")
MODES = ("input", "tied")
OTHER_MODEL = "other…"


def use_app_router() -> None:
    """Make sure this page runs inside ``app.py`` (shared controls, URL binding), not on its own.

    Streamlit treats a ``pages/`` folder as a legacy multipage app until some session has called
    ``st.navigation``; a shared link to a page opened first on a fresh server would run the page bare.
    Switch the server to ``st.navigation`` routing and rerun: the rerun keeps the URL and goes through
    ``app.py``.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


_URL_REQUEST = "_embviz_url_request"


def remember_url_request() -> None:
    """Keep what the URL asked for at the start of this run: Streamlit drops values a widget cannot take
    (``rank=abc``, ``model=zzz``) and falls back to the default; :func:`warn_ignored_url_values` tells the user."""
    st.session_state[_URL_REQUEST] = dict(st.query_params)


def warn_ignored_url_values(keys: tuple[str, ...]) -> None:
    """One warning per URL value among ``keys`` that its (already drawn) widget could not take."""
    requested = st.session_state.get(_URL_REQUEST, {})
    for key in keys:
        used = st.session_state.get(key, "")
        if key in requested and str(used) != str(requested[key]):
            st.warning(
                f"Ignored the URL value {key}={requested[key]!r}: not a valid choice here; using {used!r}."
            )


def cache_warning() -> None:
    """One warning when the disk cache is unusable: everything still works, it is just not kept."""
    problem = cache_problem()
    if problem:
        st.warning(f"The disk cache is not usable, so nothing is kept between runs: {problem}.")


def default_backbone() -> str:
    """The packaged default, overridable with ``EMBVIZ_BACKBONE`` (tests point it at a tiny model)."""
    return os.environ.get("EMBVIZ_BACKBONE", DEFAULT_BACKBONE)


def backbone_choices() -> list[str]:
    """Built-in names (a fitted-head backbone such as ``minilm-mlm`` only once built), the default, "other"."""
    from embviz import mlm_head

    fitted = {mlm_head.output_name(mlm_head.DEFAULT_SOURCE)}
    names = [name for name in BUILTINS if name not in fitted or mlm_head.exists(mlm_head.DEFAULT_SOURCE)]
    default = default_backbone()
    return ([] if default in names else [default]) + names + [OTHER_MODEL]


_PENDING_MODEL = "_embviz_pending_model"


def apply_pending_model() -> None:
    """Select a backbone chosen by the previous run (call before the model widget is drawn)."""
    pending = st.session_state.pop(_PENDING_MODEL, None)
    if pending:
        st.session_state["model"] = pending  # the bound widget then updates the URL
        st.session_state.get(_URL_REQUEST, {}).pop("model", None)  # a switch, not an ignored URL value


def offer_mlm_head(model: str) -> None:
    """For ``minilm`` (no trained masked-LM head): a button that fits one and switches to ``minilm-mlm``."""
    from embviz import mlm_head

    source = mlm_head.DEFAULT_SOURCE
    if model != source or mlm_head.exists(source):
        return
    name, minutes = mlm_head.output_name(source), mlm_head.EXPECTED_MINUTES
    st.caption(
        f"{source} has no trained masked-LM head, so its predictions are noise. {name} adds a head fitted "
        f"by embviz on public-domain text (about {minutes} min on 2 CPU cores, once; cached afterwards)."
    )
    if not st.button(f"Build {name} (about {minutes} min)", key="build-mlm-head"):
        return
    with st.status(f"Fitting {name} (about {minutes} min)…", expanded=True) as status:
        bar = st.progress(0.0, text="starting")

        def report(done: float, total: int, message: str) -> None:
            bar.progress(min(max(done / max(total, 1), 0.0), 1.0), text=message)

        try:
            result = mlm_head.fit_mlm_head(source, progress=report)
        except EmbvizError as error:
            status.update(label=f"Could not build {name}", state="error")
            st.error(str(error))
            return
        top1 = result.accuracies.get("bible:test", {}).get("top1")
        accuracy = f": top-1 {top1:.0%} on bible:test" if isinstance(top1, float) else ""
        status.update(label=f"Built {name}{accuracy}", state="complete", expanded=False)
    st.session_state[_PENDING_MODEL] = name
    st.rerun()


@dataclass(frozen=True)
class Settings:
    """The shared controls (sidebar, bound to the URL), validated."""

    model: str
    rank: int
    loss: str
    recipe: str
    mode: str
    token: str
    k: int

    @property
    def ae_method(self) -> str:
        return f"ae-{self.loss}"


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
        recipe=state.get("recipe") or "fast",
        mode=state.get("mode") or "input",
        token=(state.get("tok") or "").strip(),
        k=int(state.get("k") or 10),
    )


# -- backbone ------------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=2)
def load_backbone(name: str) -> Backbone:
    """One shared copy of each backbone per server process (sessions never mutate it)."""
    return Backbone.from_pretrained(name)


@st.cache_resource(show_spinner=False, max_entries=4)
def backbone_fingerprint(name: str) -> str:
    return matrix_fingerprint(load_backbone(name).embedding)


@st.cache_resource(show_spinner=False, max_entries=4)
def token_index(name: str) -> dict[str, int]:
    return {token: i for i, token in enumerate(load_backbone(name).tokens)}


def current_backbone() -> Backbone | None:
    """The backbone picked in the sidebar, loaded under a spinner; errors are shown, not raised."""
    name = settings().model
    try:
        with st.spinner(f"Loading {name} (the first load of smollm2 converts its GGUF once, about 25 s)…"):
            return load_backbone(name)
    except EmbvizError as error:
        st.error(str(error))
        return None


def check_rank(backbone: Backbone, rank: int) -> bool:
    """Show an error (and return False) when the rank does not fit this backbone."""
    if 1 <= rank < backbone.hidden_size:
        return True
    st.error(
        f"Rank {rank} is out of range: it must be between 1 and {backbone.hidden_size - 1} "
        f"(the hidden size of {backbone.name} is {backbone.hidden_size})."
    )
    return False


# -- variants ------------------------------------------------------------------------------------------
class VariantStore:
    """Compressed variants and their reconstructions, shared by every session of this server process.

    Artifacts are small (codes + decoder); reconstructions are V x D, so only a few are kept (LRU).
    """

    def __init__(self, max_matrices: int = 6) -> None:
        self.lock = threading.Lock()
        self.results: dict[tuple, ArtifactResult] = {}
        self.matrices: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.max_matrices = max_matrices

    def matrix(self, key: tuple, result: ArtifactResult) -> torch.Tensor:
        with self.lock:
            if key in self.matrices:
                self.matrices.move_to_end(key)
                return self.matrices[key]
        matrix = result.compressed.reconstruct().contiguous()
        with self.lock:
            self.matrices[key] = matrix
            while len(self.matrices) > self.max_matrices:
                self.matrices.popitem(last=False)
        return matrix


@st.cache_resource(show_spinner=False)
def variant_store() -> VariantStore:
    return VariantStore()


def _compressor(method: str, rank: int, recipe: str):
    return make_compressor(method, rank, **({} if method.startswith("svd") else {"recipe": recipe}))


def variant_key(model: str, method: str, rank: int, recipe: str) -> tuple:
    return (model, method, rank, recipe if method.startswith("ae") else "")


def get_variant(
    backbone: Backbone, method: str, rank: int, recipe: str, *, train: bool
) -> ArtifactResult | None:
    """The artifact for one configuration: from memory, from the disk cache, or trained here if allowed.

    Training draws a live progress bar and loss read-out under ``st.status``. Returns None when the
    artifact does not exist yet and ``train`` is False.
    """
    store = variant_store()
    key = variant_key(backbone.name, method, rank, recipe)
    if key in store.results:
        return store.results[key]
    compressor = _compressor(method, rank, recipe)
    try:
        on_disk = artifact_path(backbone.name, backbone_fingerprint(backbone.name), compressor).exists()
    except EmbvizError:
        on_disk = False
    if not on_disk and not (train or method.startswith("svd")):
        return None
    label = METHODS[method]
    if on_disk or method.startswith("svd"):
        with st.spinner(f"Loading {label} (rank {rank})…"):
            result = compress_cached(backbone.name, backbone.embedding, compressor)
    else:
        result = _train_with_progress(backbone, compressor, label, rank)
    if result.notice and not (result.path is None and cache_problem()):  # cache_warning() says that once
        st.warning(result.notice)
    store.results[key] = result
    return result


def _train_with_progress(backbone: Backbone, compressor: Any, label: str, rank: int) -> ArtifactResult:
    with st.status(f"Training {label}, rank {rank}…", expanded=True) as status:
        bar = st.progress(0.0, text="starting")
        readout = st.empty()

        def report(update: TrainingProgress) -> None:
            done = ((update.epoch - 1) + update.step / max(update.steps, 1)) / max(update.epochs, 1)
            bar.progress(
                min(max(done, 0.0), 1.0),
                text=f"epoch {update.epoch}/{update.epochs} · step {update.step}/{update.steps}",
            )
            terms = " · ".join(f"{name} {value:.4f}" for name, value in update.terms.items())
            readout.caption(f"loss {update.loss:.5f} · {terms} · {update.elapsed_s:.0f} s")

        result = compress_cached(backbone.name, backbone.embedding, compressor, progress=report)
        status.update(
            label=f"Trained {label}, rank {rank} in {result.compressed.train_seconds:.1f} s",
            state="complete",
            expanded=False,
        )
    return result


def variants_for(
    backbone: Backbone, config: Settings, *, train_button: bool = True
) -> dict[str, ArtifactResult] | None:
    """SVD and AE artifacts for the current settings; offers a train button while the AE is missing."""
    if not check_rank(backbone, config.rank):
        return None
    try:
        svd = get_variant(backbone, "svd", config.rank, config.recipe, train=True)
        ae = get_variant(backbone, config.ae_method, config.rank, config.recipe, train=False)
        if ae is None:
            st.info(
                f"The {METHODS[config.ae_method]} at rank {config.rank} ({config.recipe} recipe) is not "
                "trained yet. Train it here or on the Compress page; it is cached on disk afterwards."
            )
            if not (train_button and st.button("Train the AutoEncoder now", type="primary")):
                return None
            ae = get_variant(backbone, config.ae_method, config.rank, config.recipe, train=True)
    except EmbvizError as error:
        st.error(str(error))
        return None
    return {"SVD": svd, "AE": ae}  # type: ignore[dict-item]


def require_variants() -> tuple[Settings, Backbone, dict[str, ArtifactResult]]:
    """The settings, backbone and SVD / AE variants a page shows; stops the page (the reason is on screen)
    while the backbone cannot load or the AE is not trained yet."""
    config = settings()
    backbone = current_backbone()
    if backbone is None:
        st.stop()
    variants = variants_for(backbone, config)
    if variants is None:
        st.stop()
    return config, backbone, variants


def reconstructions(
    backbone: Backbone, config: Settings, variants: dict[str, ArtifactResult]
) -> dict[str, torch.Tensor]:
    """V x D matrices of each variant (shared, LRU-bounded)."""
    store = variant_store()
    methods = {"SVD": "svd", "AE": config.ae_method}
    return {
        name: store.matrix(variant_key(backbone.name, methods[name], config.rank, config.recipe), result)
        for name, result in variants.items()
    }


@st.cache_resource(show_spinner=False, max_entries=4)
def _original_neighbours(model: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    backbone = load_backbone(model)
    return neighbour_table_cached(model, backbone_fingerprint(model), backbone.embedding, k)


@st.cache_resource(show_spinner=False, max_entries=8)
def _variant_neighbours(
    key: tuple, k: int, _compressed: CompressedEmbedding
) -> tuple[np.ndarray, np.ndarray]:
    return nearest_neighbours(_compressed, k)


def neighbour_tables(
    backbone: Backbone, config: Settings, variants: dict[str, ArtifactResult]
) -> dict[str, tuple]:
    """Full-vocabulary top-k tables: ``original`` (disk-cached) and each variant (factor path, in memory)."""
    methods = {"SVD": "svd", "AE": config.ae_method}
    tables = {ORIGINAL: _original_neighbours(backbone.name, config.k)}
    for name, result in variants.items():
        key = variant_key(backbone.name, methods[name], config.rank, config.recipe)
        tables[name] = _variant_neighbours(key, config.k, result.compressed)
    return tables


@st.cache_resource(show_spinner=False, max_entries=16)
def _quality(key: tuple, _backbone: Backbone, _compressed: CompressedEmbedding) -> dict[str, float]:
    return reconstruction_quality(_backbone.embedding, _compressed)


def quality_of(backbone: Backbone, config: Settings, name: str, result: ArtifactResult) -> dict[str, float]:
    """Mean cosine and relative error of one variant (cached per configuration)."""
    method = "svd" if name == "SVD" else config.ae_method
    return _quality(
        variant_key(backbone.name, method, config.rank, config.recipe), backbone, result.compressed
    )


@st.cache_resource(show_spinner=False, max_entries=16)
def _angles(key: tuple, _backbone: Backbone, _compressed: CompressedEmbedding) -> Angles:
    return reconstruction_angles(_backbone.embedding, _compressed)


def angles_of(backbone: Backbone, config: Settings, variants: dict[str, ArtifactResult]) -> dict[str, Angles]:
    """Per-token angle and norm ratio of each variant (cached per configuration)."""
    methods = {"SVD": "svd", "AE": config.ae_method}
    return {
        name: _angles(
            variant_key(backbone.name, methods[name], config.rank, config.recipe), backbone, result.compressed
        )
        for name, result in variants.items()
    }


@st.cache_resource(show_spinner=False, max_entries=8)
def token_groups(model: str, split: str) -> np.ndarray:
    """Token class, or corpus-frequency band (Bible ``train`` slice), of every vocabulary row."""
    backbone = load_backbone(model)
    if split == "class":
        return token_classes(backbone.tokens, backbone.special_ids)
    return frequency_bands(corpus_frequencies(backbone.tokenizer, backbone.tokens, "bible", "train"))


def variant_labels(variants: dict[str, ArtifactResult]) -> dict[str, str]:
    return {name: f"{name} · {result.compressed.label}" for name, result in variants.items()}


# -- presentation helpers ----------------------------------------------------------------------------------
def provenance(backbone: Backbone, config: Settings, **facts: Any) -> str:
    ratio = ratio_for_rank(backbone.vocab_size, backbone.hidden_size, config.rank)
    return provenance_line(
        backbone.name,
        rank=config.rank,
        ratio=f"{ratio:.1f}x",
        ae_loss=config.loss,
        recipe=config.recipe,
        seed=1,
        **facts,
    )


def explain(text: str) -> None:
    """The short "what am I looking at" note for students."""
    with st.expander("What am I looking at?"):
        st.markdown(text)


def downloads(name: str, table: pd.DataFrame | None = None, payload: Any = None, figure: Any = None) -> None:
    """CSV / JSON / figure-HTML download buttons for the data behind a view."""
    columns = st.columns(3)
    if table is not None:
        columns[0].download_button(
            "CSV", table.to_csv(index=False), f"{name}.csv", "text/csv", key=f"{name}-csv"
        )
    if payload is not None or table is not None:
        data = payload if payload is not None else table.to_dict(orient="records")
        columns[1].download_button(
            "JSON",
            json.dumps(data, indent=2, default=str),
            f"{name}.json",
            "application/json",
            key=f"{name}-json",
        )
    if figure is not None:
        columns[2].download_button(
            "Figure (HTML)",
            figure.to_html(include_plotlyjs="cdn"),
            f"{name}.html",
            "text/html",
            key=f"{name}-html",
        )


def focus_token_id(backbone: Backbone, config: Settings) -> int | None:
    """The focus token's row, or None with an error shown (unknown token) / nothing (empty)."""
    from embviz.vocab import find_token

    if not config.token:
        return None
    try:
        return find_token(backbone.tokens, config.token, token_index(backbone.name))
    except EmbvizError as error:
        st.error(str(error))
        return None


def as_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)


TEXTS = ("bible:test", "shakespeare:test", "britannica:test")
RATIOS = (2.0, 4.0, 8.0, 16.0)


def sweep_panel(
    backbone: Backbone,
    config: Settings,
    *,
    key: str,
    methods: Sequence[str],
    default_methods: Sequence[str],
    ratio_label: str,
    ratios: Sequence[float] = RATIOS,
    caption: str = "",
    by: str = "params",
) -> tuple[list[dict[str, Any]], str] | None:
    """Method / ratio / text pickers and a compute button for a sweep; ``(rows, text)`` once computed.

    The sweep runs under ``st.status`` with a progress bar, and its rows are kept in the session per
    request, so widgets can change and come back without recomputing. Returns None (with a hint or the
    error shown) until rows exist for the current choice.
    """
    from embviz.evaluation import sweep

    controls = st.columns([3, 2, 2])
    chosen = controls[0].multiselect(
        "Methods", list(methods), default=list(default_methods), key=f"{key}_methods",
        format_func=lambda m: METHODS[m],
    )  # fmt: skip
    sizes = controls[1].multiselect(
        ratio_label, list(ratios), default=[4.0, 8.0], key=f"{key}_ratios", format_func=lambda r: f"{r:g}x"
    )
    text = controls[2].selectbox("Held-out text", TEXTS, key=f"{key}_text")
    st.caption(
        f"Substitution mode: **{config.mode}** · AE recipe: **{config.recipe}** (change them in the sidebar). "
        f"Every variant is scored on the same tokens (and, for masked models, the same masks). {caption}"
    )
    request = (
        backbone.name,
        tuple(chosen),
        tuple(sorted(sizes)),
        text,
        config.mode,
        config.recipe,
        config.k,
        by,
    )
    results: dict = st.session_state.setdefault(f"{key}_results", {})
    if st.button("Compute the sweep", type="primary", disabled=not (chosen and sizes)):
        try:
            with st.status(f"Sweeping {len(chosen)} methods x {len(sizes)} ratios…", expanded=True) as status:
                bar = st.progress(0.0)
                results[request] = sweep(
                    backbone,
                    list(chosen),
                    ratios=sorted(sizes),
                    text=text,
                    mode=config.mode,
                    k=config.k,
                    recipe=config.recipe,
                    by=by,
                    progress=lambda done, total, message: bar.progress(
                        min(done / max(total, 1), 1.0), text=message
                    ),
                )
                status.update(
                    label="Sweep done (artifacts and perplexities are cached on disk)",
                    state="complete",
                    expanded=False,
                )
        except EmbvizError as error:
            st.error(str(error))
    if request not in results:
        st.info(
            "Pick methods and ratios, then compute. Trained AEs and perplexities are cached on disk, so a "
            "repeated sweep is fast; the first AE per size trains for a while."
        )
        return None
    return results[request], text
