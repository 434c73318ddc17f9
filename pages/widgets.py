"""Streamlit pieces the pages share: progress, training and its button, the sweep panel, downloads, notes.

Numbers come from the core (:mod:`embviz`) and cached data from :mod:`pages.data`; this module draws.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import streamlit as st

from embviz.backbones import Backbone
from embviz.cache import cache_problem
from embviz.compressors import method_label, parse_variant, ratio_for_rank
from embviz.corpora import CORPORA
from embviz.errors import EmbvizError
from embviz.figures import provenance_line
from embviz.progress import Progress, ProgressCallback, describe, format_metrics, throttled
from embviz.sources import load_model
from pages.data import (
    BackgroundJob,
    Variant,
    VariantSpec,
    auto_fit_seconds,
    compared_specs,
    current_backbone,
    find_variant,
    fit_variant,
    shape_of,
    show_notice,
    token_index,
)
from pages.state import Settings, request_focus, request_model_switch, settings

if TYPE_CHECKING:
    from embviz.artifacts import ArtifactResult
    from embviz.evaluation import SweepRow

TEXTS = tuple(f"{name}:test" for name in CORPORA)
"""The held-out texts a sweep scores on: every corpus's test slice (embviz.corpora's registry)."""
RATIOS = (2.0, 4.0, 8.0, 16.0)
"""The ratios a sweep offers unless a page passes its own."""


# -- progress --------------------------------------------------------------------------------------------
def progress_bar(*, readout: bool = False) -> ProgressCallback:
    """An ``st.progress`` bar that follows :class:`~embviz.progress.Progress` reports.

    The bar's text is the message and metrics; with ``readout`` it is the message alone and the metrics (a
    fit's loss and loss terms) and elapsed seconds go in a caption under the bar. At most four reports a
    second are drawn, and every epoch's end (:func:`~embviz.progress.throttled`).
    """
    bar = st.progress(0.0, text="starting")
    caption = st.empty() if readout else None

    def show(update: Progress) -> None:
        bar.progress(update.fraction, text=update.message if readout else describe(update))
        elapsed = f"{update.elapsed_s:.0f} s" if update.elapsed_s is not None else ""
        readout_text = " · ".join(part for part in (format_metrics(update), elapsed) if part)
        if caption is not None and readout_text:
            caption.caption(readout_text)

    return throttled(show)


# -- messages --------------------------------------------------------------------------------------------
def cache_warning() -> None:
    """One warning when the disk cache is unusable: everything still works, it is just not kept."""
    problem = cache_problem()
    if problem:
        st.warning(f"The disk cache is not usable, so nothing is kept between runs: {problem}.")


def explain(text: str) -> None:
    """The short "what am I looking at" note for students."""
    with st.expander("What am I looking at?"):
        st.markdown(text)


def provenance(backbone: Backbone, config: Settings, **facts: Any) -> str:
    """The provenance line under a figure: model, rank, ratio, AE loss, recipe, seed, and ``facts``."""
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


def downloads(name: str, table: pd.DataFrame | None = None, payload: Any = None, figure: Any = None) -> None:
    """CSV / JSON / figure-HTML download buttons for the data behind a view.

    Each file is written when its button is clicked (and the click does not rerun the page), not on every
    run: the Map's three files, every token's coordinates (about 22 MB), took about 1 s of each run.
    """
    columns = st.columns(3)
    if table is not None:
        columns[0].download_button(
            "CSV", lambda: table.to_csv(index=False), f"{name}.csv", "text/csv", key=f"{name}-csv",
            on_click="ignore",
        )  # fmt: skip
    if payload is not None or table is not None:
        data = payload if payload is not None else table

        def as_json() -> str:
            records = data.to_dict(orient="records") if isinstance(data, pd.DataFrame) else data
            return json.dumps(records, indent=2, default=str)

        columns[1].download_button(
            "JSON", as_json, f"{name}.json", "application/json", key=f"{name}-json", on_click="ignore"
        )
    if figure is not None:
        columns[2].download_button(
            "Figure (HTML)",
            lambda: figure.to_html(include_plotlyjs="cdn"),
            f"{name}.html",
            "text/html",
            key=f"{name}-html",
            on_click="ignore",
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


# -- background jobs ------------------------------------------------------------------------------------
def wait_for_jobs(jobs: Mapping[str, BackgroundJob], seconds: float) -> None:
    """Give background jobs up to ``seconds`` in all (quick ones then draw in this run)."""
    deadline = time.perf_counter() + seconds
    for job in jobs.values():
        if job.thread is not None:
            job.thread.join(timeout=max(0.0, deadline - time.perf_counter()))


def jobs_progress(jobs: Mapping[str, BackgroundJob], what: str) -> None:
    """A self-updating progress panel for background jobs; the whole page reruns once they are all done."""

    @st.fragment(run_every=1.0)
    def panel() -> None:
        if all(job.done for job in jobs.values()):
            st.rerun()
        for name, job in jobs.items():
            update = job.progress
            state = "done" if job.done else describe(update) if update else "queued (every core busy)"
            st.progress(
                1.0 if job.done else update.fraction if update else 0.0,
                text=f"{name}: {state} ({time.perf_counter() - job.started:.0f} s)",
            )

    with st.container(key="background-jobs"):  # the browser tests and benchmark wait for it to go
        st.info(f"{what}: computing in the background; this part of the page appears by itself when done.")
        panel()


# -- brushing ---------------------------------------------------------------------------------------------
def selected_token_ids(event: Any, bar_of_token: Mapping[int, np.ndarray]) -> np.ndarray:
    """Token ids of a Plotly selection event (``st.plotly_chart(..., on_select="rerun")``).

    A histogram's bars (:func:`embviz.figures.recall_histogram`, one trace per variant) report their bin as
    ``point_index``: ``bar_of_token[curve]`` gives every token's bin on that trace (token id = position), so
    a selected bar selects its tokens. Scatter points report their ``customdata`` (the token id). Sorted,
    unique.
    """
    selection = getattr(event, "selection", None) or (
        event.get("selection") if isinstance(event, dict) else None
    )
    points = (
        (selection or {}).get("points", [])
        if isinstance(selection, dict)
        else getattr(selection, "points", [])
    )
    chosen: set[int] = set()
    bars: dict[int, set[int]] = {}
    for point in points or []:
        curve = int(point.get("curve_number", 0))
        if curve in bar_of_token and point.get("point_index") is not None:
            bars.setdefault(curve, set()).add(int(point["point_index"]))
            continue
        data = point.get("customdata")
        if isinstance(data, list | tuple):
            data = data[0] if data else None
        if data is not None:
            chosen.add(int(data))
    for curve, picked in bars.items():
        chosen.update(np.nonzero(np.isin(bar_of_token[curve], list(picked)))[0].tolist())
    return np.array(sorted(chosen), dtype=np.int64)


def token_table(table: pd.DataFrame, *, key: str, height: int = 320) -> None:
    """A token table (with an ``id`` column) where choosing a row makes that token the focus on every page."""
    event = st.dataframe(
        table, hide_index=True, width="stretch", height=height, key=key, on_select="rerun",
        selection_mode="single-row",
    )  # fmt: skip
    rows = list(event.selection.rows) if event is not None else []
    chosen = int(table.iloc[rows[0]]["id"]) if rows and rows[0] < len(table) else None
    # Act on a new choice only: a row left selected must not undo a focus token typed afterwards.
    if chosen is not None and st.session_state.get(f"{key}_focused") != chosen:
        st.session_state[f"{key}_focused"] = chosen
        request_focus(chosen)
        st.rerun()
    st.caption("Choose a row to make that token the focus token on every page.")


# -- backbone and variants -------------------------------------------------------------------------------
def offer_mlm_head(model: str) -> None:
    """For ``minilm`` (no trained masked-LM head): a button that fits one and switches to ``minilm-mlm``."""
    from embviz import mlm_head

    source = mlm_head.DEFAULT_SOURCE
    if model != source or mlm_head.exists(source):
        return
    name, minutes = mlm_head.output_name(source), mlm_head.EXPECTED_MINUTES
    st.caption(
        f"{source} has no trained masked-LM head, so its predictions are noise. {name} adds a head fitted "
        f"by embviz on public-domain and generated text (about {minutes} min on 2 CPU cores, once; cached "
        "afterwards)."
    )
    if not st.button(f"Build {name} (about {minutes} min)", key="build-mlm-head"):
        return
    with st.status(f"Fitting {name} (about {minutes} min)…", expanded=True) as status:
        try:
            result = mlm_head.fit_mlm_head(source, load=load_model, progress=progress_bar())
        except EmbvizError as error:
            status.update(label=f"Could not build {name}", state="error")
            st.error(str(error))
            return
        top1 = result.accuracies.get("bible:test", {}).get("top1")
        accuracy = f": top-1 {top1:.0%} on bible:test" if isinstance(top1, float) else ""
        status.update(label=f"Built {name}{accuracy}", state="complete", expanded=False)
    request_model_switch(name)
    st.rerun()


def check_rank(backbone: Backbone, rank: int) -> bool:
    """Show an error (and return False) when the rank does not fit this backbone."""
    if 1 <= rank < backbone.hidden_size:
        return True
    st.error(
        f"Rank {rank} is out of range: it must be between 1 and {backbone.hidden_size - 1} "
        f"(the hidden size of {backbone.name} is {backbone.hidden_size})."
    )
    return False


def variant_option_label(name: str) -> str:
    """How the variant picker shows a name: the method's label, with the size when one is given."""
    try:
        request = parse_variant(name)
    except EmbvizError:
        return f"{name} (not a method)"
    label = method_label(request.method)
    return label if request.name == request.method else f"{label} @ {name.partition('@')[2]}"


def train_variant(backbone: Backbone, spec: VariantSpec) -> ArtifactResult:
    """Fit one variant under ``st.status`` with a live progress bar (and the loss read-out while training)."""
    verb, done = ("Training", "Trained") if spec.trains else ("Fitting", "Fitted")
    with st.status(f"{verb} {spec.label}…", expanded=True) as status:
        result = fit_variant(backbone, spec, progress=progress_bar(readout=spec.trains))
        status.update(
            label=f"{done} {spec.label} in {result.compressed.train_seconds:.1f} s",
            state="complete",
            expanded=False,
        )
    show_notice(result)
    return result


def variants_for(
    backbone: Backbone,
    config: Settings,
    *,
    specs: dict[str, VariantSpec] | None = None,
    train_button: bool = True,
) -> dict[str, Variant] | None:
    """The variants a page compares, by name: ``specs`` or the sidebar's picks (:func:`compared_specs`).

    A variant that is not cached yet is fitted right away (with progress) when its method expects to
    take at most :func:`~pages.data.auto_fit_seconds`; slower ones wait behind one button that says how
    long. Returns None (the reason on screen) until every variant exists.
    """
    if not check_rank(backbone, config.rank):
        return None
    if specs is None:
        specs, problems = compared_specs(backbone, config)
        for problem in problems:
            st.error(problem)
        if not specs:
            st.info("Pick at least one variant to compare in the sidebar (Compare with the original).")
            return None
    shape = shape_of(backbone)
    found: dict[str, ArtifactResult] = {}
    slow: dict[str, VariantSpec] = {}
    try:
        for name, spec in specs.items():
            result = find_variant(backbone, spec)
            if result is None and spec.expected_seconds(shape) <= auto_fit_seconds():
                result = train_variant(backbone, spec)
            if result is None:
                slow[name] = spec
            else:
                found[name] = result
        if slow:
            seconds = sum(spec.expected_seconds(shape) for spec in slow.values())
            names = ", ".join(f"**{spec.label}**" for spec in slow.values())
            st.info(
                f"{names} {'is' if len(slow) == 1 else 'are'} not fitted yet: about {_duration(seconds)} on this "
                "machine (an estimate). It is cached on disk afterwards, for every page and every user."
            )
            if not (train_button and st.button(f"Fit now (about {_duration(seconds)})", type="primary")):
                return None
            for name, spec in slow.items():
                found[name] = train_variant(backbone, spec)
    except EmbvizError as error:
        st.error(str(error))
        return None
    return {name: Variant(spec, found[name]) for name, spec in specs.items()}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def require_variants() -> tuple[Settings, Backbone, dict[str, Variant]]:
    """The settings, backbone and compared variants a page shows; stops the page (the reason is on screen)
    while the backbone cannot load or a variant is not fitted yet."""
    config = settings()
    backbone = current_backbone()
    if backbone is None:
        st.stop()
    variants = variants_for(backbone, config)
    if variants is None:
        st.stop()
    return config, backbone, variants


# -- sweeps ----------------------------------------------------------------------------------------------
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
    bits: Sequence[float] | None = None,
    default_bits: Sequence[float] = (4.0, 2.0),
) -> tuple[list[SweepRow], str] | None:
    """Method / size / text pickers and a compute button for a sweep; ``(rows, text)`` once computed.

    The sizes are ``ratios`` (widget ``{key}_ratios``) or, when ``bits`` is given, budgets in bits per
    weight (widget ``{key}_bits``; each method at the largest size within each budget, fixed-size methods
    once, and the budgets a method cannot meet listed under the button). The method list shows each
    registered method's label (:func:`embviz.compressors.method_label`). The sweep runs under ``st.status``
    with a progress bar, and its rows are kept in the session per request, so widgets can change and come
    back without recomputing. Returns None (with a hint or the error shown) until rows exist for the
    current choice.
    """
    from embviz.evaluation import sweep

    controls = st.columns([3, 2, 2])
    chosen = controls[0].multiselect(
        "Methods", list(methods), default=list(default_methods), key=f"{key}_methods",
        format_func=method_label,
    )  # fmt: skip
    if bits is None:
        sizes = controls[1].multiselect(
            ratio_label,
            list(ratios),
            default=[4.0, 8.0],
            key=f"{key}_ratios",
            format_func=lambda r: f"{r:g}x",
        )
    else:
        sizes = controls[1].multiselect(
            ratio_label, list(bits), default=list(default_bits), key=f"{key}_bits",
            format_func=lambda b: f"{b:g} bits",
        )  # fmt: skip
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
        "bits" if bits is not None else "ratios",
    )
    results: dict = st.session_state.setdefault(f"{key}_results", {})
    what = "budgets" if bits is not None else "ratios"
    if st.button("Compute the sweep", type="primary", disabled=not (chosen and sizes)):
        try:
            with st.status(f"Sweeping {len(chosen)} methods x {len(sizes)} {what}…", expanded=True) as status:
                progress = progress_bar()
                results[request] = sweep(
                    backbone,
                    list(chosen),
                    ratios=sorted(sizes) if bits is None else None,
                    bits=sorted(sizes, reverse=True) if bits is not None else None,
                    text=text,
                    mode=config.mode,
                    k=config.k,
                    recipe=config.recipe,
                    by=by,
                    progress=progress,
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
            f"Pick methods and {what}, then compute. Trained AEs and perplexities are cached on disk, so a "
            "repeated sweep is fast; the first AE per size trains for a while, and direction VQ first measures "
            "the model's sensitivity (about 2 minutes on 2 cores, once per model)."
        )
        return None
    notes = getattr(results[request], "notes", ())
    if notes:
        st.caption("**Budgets:**\n" + "\n".join(f"- {note}" for note in notes))
    return results[request], text
