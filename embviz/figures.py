"""Plotly figures for the app and the exports, built from plain arrays (no Streamlit here).

Every figure takes a ``provenance`` string (model, method, config, seed, versions; see
:func:`provenance_line`) and shows it as a small note under the plot, so an exported HTML file still says
what it shows. Variants keep one colour each across all figures (by their position in the mapping, the
original always grey).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from embviz.frontier import frontier
from embviz.version import __version__

ORIGINAL_COLOUR = "#7f7f7f"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
FOCUS_COLOUR = "#111111"
NOTE_COLOUR = "#b35900"


# -- shared pieces ------------------------------------------------------------------------------------------
def provenance_line(model: str, **facts: Any) -> str:
    """``"model smollm2 · method svd · rank 64 · seed 42 · embviz 0.1.0, torch 2.13.0"`` (None facts skipped)."""
    import torch

    parts = [f"model {model}"] + [f"{k.replace('_', ' ')} {v}" for k, v in facts.items() if v is not None]
    versions = (
        f"embviz {__version__}, torch {torch.__version__.split('+')[0]}, python {platform.python_version()}"
    )
    return " · ".join([*parts, versions])


def variant_colours(names: Sequence[str]) -> dict[str, str]:
    """One colour per variant name: ``original`` grey, the others from :data:`PALETTE` in order."""
    others = iter(PALETTE * (1 + len(names) // len(PALETTE)))
    return {name: ORIGINAL_COLOUR if name == "original" else next(others) for name in names}


LEGEND_ENTRIES_PER_LINE = 3
LEGEND_LINE_PX = 22
"""A horizontal legend's entries per line in a page-wide chart (long method labels), and a line's height."""


def _finish(fig: go.Figure, provenance: str, *, title: str | None = None, height: int = 380) -> go.Figure:
    """Title, margins and the provenance note under the plot area."""
    fig.update_layout(
        title=title,
        height=height,
        margin={"t": 60 if title else 30, "b": 95, "l": 50, "r": 20},
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
        template="plotly_white",
    )
    if provenance:
        fig.add_annotation(
            text=provenance,
            xref="paper",
            yref="paper",
            x=0,
            y=0,
            xanchor="left",
            yanchor="top",
            yshift=-55,
            showarrow=False,
            align="left",
            font={"size": 10, "color": "#666666"},
            name="provenance",
        )
    return fig


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def bin_index(values: np.ndarray, bins: Mapping[str, float]) -> np.ndarray:
    """Each value's bin among ``bins`` (``start``, ``end``, ``size``, as Plotly's ``xbins``): 0, 1, ...;
    -1 for a value that is not finite or falls outside ``[start, end)``."""
    values = np.asarray(values, dtype=np.float64)
    count = bin_count(bins)
    with np.errstate(invalid="ignore"):
        index = np.floor((values - bins["start"]) / bins["size"])
    inside = np.isfinite(index) & (index >= 0) & (index < count)
    return np.where(inside, index, -1).astype(np.int64)


def bin_count(bins: Mapping[str, float]) -> int:
    """How many bins ``bins`` holds (the last may be cut by ``end``)."""
    return max(1, math.ceil((bins["end"] - bins["start"]) / bins["size"] - 1e-9))


def _overlaid_histogram(
    values_by_variant: Mapping[str, np.ndarray],
    *,
    bins: dict[str, float],
    x_title: str,
    unit: str,
    provenance: str,
    title: str | None,
) -> go.Figure:
    """One translucent histogram per variant on identical bins, y in percent of (finite) tokens.

    Counted here and drawn as bars (one per bin; :func:`bin_index` gives a value's bar): the browser gets a
    few numbers per variant instead of every token's value, which Plotly would bin in JavaScript on every
    redraw (tens of thousands per variant, on the cores the app's server computes on). A selected bar
    reports its ``point_index``, the bin.
    """
    colours = variant_colours(list(values_by_variant))
    count = bin_count(bins)
    centres = bins["start"] + bins["size"] * (np.arange(count) + 0.5)
    fig = go.Figure()
    for name, raw in values_by_variant.items():
        values = _finite(raw)
        label = f"{name} (mean {values.mean():.3g}{unit})" if values.size else f"{name} (no values)"
        index = bin_index(values, bins)
        counts = np.bincount(index[index >= 0], minlength=count)
        fig.add_trace(
            go.Bar(
                x=centres,
                y=100.0 * counts / max(1, values.size),
                width=bins["size"],
                customdata=counts,
                hovertemplate="%{x:.3g}: %{y:.2f}% of tokens (%{customdata:,})<extra></extra>",
                name=label,
                marker_color=colours[name],
                opacity=0.6,
            )
        )
    fig.update_layout(barmode="overlay", bargap=0.02)
    fig.update_xaxes(title=x_title, range=[bins["start"], bins["end"]])
    fig.update_yaxes(title="% of tokens")
    return _finish(fig, provenance, title=title)


def _bins(values_by_variant: Mapping[str, np.ndarray], nbins: int, low: float, high: float | None) -> dict:
    """Shared bins from ``low`` to ``high`` (or to the largest finite value across variants)."""
    if high is None:
        tops = [_finite(v).max() for v in values_by_variant.values() if _finite(v).size]
        high = max(tops, default=low + 1.0)
        high = high if high > low else low + 1.0
    return {"start": low, "end": high, "size": (high - low) / nbins}


# -- histograms ---------------------------------------------------------------------------------------------
def angle_histogram(
    angles_by_variant: Mapping[str, np.ndarray],
    *,
    provenance: str = "",
    nbins: int = 60,
    title: str | None = "Angle between each original row and its reconstruction",
) -> go.Figure:
    """Overlaid histograms of per-token angles (degrees), one per variant (e.g. SVD vs AE); NaNs dropped."""
    bins = _bins(angles_by_variant, nbins, 0.0, None)
    return _overlaid_histogram(
        angles_by_variant, bins=bins, x_title="angle (degrees)", unit="°", provenance=provenance, title=title
    )


def norm_ratio_histogram(
    ratios_by_variant: Mapping[str, np.ndarray],
    *,
    provenance: str = "",
    nbins: int = 60,
    title: str | None = "Norm ratio ||x̂|| / ||x||",
) -> go.Figure:
    """Overlaid histograms of per-token norm ratios; the range stops at the 99.9th percentile of all values."""
    finite = [_finite(v) for v in ratios_by_variant.values()]
    pooled = np.concatenate(finite) if finite else np.zeros(0)
    high = float(np.quantile(pooled, 0.999)) if pooled.size else 1.0
    bins = _bins(ratios_by_variant, nbins, 0.0, max(high, 1.05))
    return _overlaid_histogram(
        ratios_by_variant, bins=bins, x_title="norm ratio", unit="", provenance=provenance, title=title
    )


def recall_bins(k: int) -> dict[str, float]:
    """The recall histogram's bins: one per possible recall@k value ``j / k`` (bin ``j``)."""
    return {"start": -0.5 / k, "end": 1 + 0.5 / k, "size": 1 / k}


def recall_histogram(
    recall_by_variant: Mapping[str, np.ndarray],
    k: int,
    *,
    provenance: str = "",
    title: str | None = None,
) -> go.Figure:
    """Overlaid histograms of per-token recall@k, one bar per possible value 0, 1/k, ..., 1 (bar ``j`` is
    recall ``j / k``)."""
    bins = recall_bins(k)
    return _overlaid_histogram(
        recall_by_variant,
        bins=bins,
        x_title=f"recall@{k} (share of the original {k} nearest neighbours kept)",
        unit="",
        provenance=provenance,
        title=title or f"Neighbour recall@{k} over the whole vocabulary",
    )


# -- per-class bars -----------------------------------------------------------------------------------------
def class_breakdown_bar(
    values_by_variant: Mapping[str, Mapping[str, float | None]],
    *,
    metric: str = "mean angle (degrees)",
    counts: Mapping[str, int] | None = None,
    order: Sequence[str] | None = None,
    provenance: str = "",
    title: str | None = None,
    group_title: str = "token class",
) -> go.Figure:
    """Grouped bars: a metric (mean angle, recall, ...) per token class (or any grouping named by
    ``group_title``, e.g. frequency band), one bar per variant.

    ``values_by_variant`` is ``{variant: {class: value}}`` (a None value draws no bar); ``counts`` adds the
    class sizes to the axis labels; ``order`` fixes the class order (default: first appearance).
    """
    classes = list(order or dict.fromkeys(c for values in values_by_variant.values() for c in values))
    labels = [f"{c} ({counts[c]:,})" if counts and c in counts else c for c in classes]
    colours = variant_colours(list(values_by_variant))
    fig = go.Figure(
        [
            go.Bar(
                x=labels,
                y=[values.get(c) for c in classes],
                name=name,
                marker_color=colours[name],
            )
            for name, values in values_by_variant.items()
        ]
    )
    fig.update_layout(barmode="group")
    fig.update_xaxes(title=group_title)
    fig.update_yaxes(title=metric)
    return _finish(fig, provenance, title=title or f"{metric[:1].upper()}{metric[1:]} by {group_title}")


# -- projection panels --------------------------------------------------------------------------------------
def _shared_range(coords: Sequence[np.ndarray], axis: int, pad: float = 0.04) -> list[float]:
    values = np.concatenate([_finite(c[:, axis]) for c in coords] or [np.zeros(1)])
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    margin = (high - low) * pad or 1.0
    return [low - margin, high + margin]


def projection_panels(
    coords_by_variant: Mapping[str, np.ndarray],
    tokens: Sequence[str],
    focus_id: int | None = None,
    *,
    ids: np.ndarray | None = None,
    sampled_note: str | None = None,
    movement_lines: bool = False,
    provenance: str = "",
    title: str | None = None,
    point_size: float = 3.0,
) -> go.Figure:
    """Side-by-side 2-D maps (original / SVD / AE ...) in one frame, with shared, linked axes.

    ``coords_by_variant`` maps names to ``n x 2`` arrays for the token ids ``ids`` (default ``0..n-1``);
    hovering a point shows its token. The focus token is drawn as a labelled star in every panel; with
    ``movement_lines`` each variant panel also shows where it sat in the original panel, joined by a line.
    ``sampled_note`` (e.g. :meth:`ProjectionMap.note`) is shown above the panels.
    """
    names = list(coords_by_variant)
    coords = [np.asarray(coords_by_variant[name]) for name in names]
    ids = np.arange(len(coords[0])) if ids is None else np.asarray(ids)
    # One array, not a list: plotly validates a list item by item (0.3 s for 3 x 49,152 points).
    hover = np.asarray([tokens[int(i)] for i in ids], dtype=object)
    colours = variant_colours(names)
    focus_row = _row_of(ids, focus_id)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.03)
    for col, (name, xy) in enumerate(zip(names, coords, strict=True), start=1):
        fig.add_trace(
            go.Scattergl(
                x=xy[:, 0],
                y=xy[:, 1],
                mode="markers",
                name=name,
                hovertext=hover,
                customdata=ids,
                hovertemplate="%{hovertext}<br>id %{customdata}<extra>" + name + "</extra>",
                marker={"size": point_size, "color": colours[name], "opacity": 0.5},
                showlegend=False,
            ),
            row=1,
            col=col,
        )
        if focus_row is None or focus_id is None:  # a focus row implies a focus id
            continue
        if movement_lines and col > 1:
            start, end = coords[0][focus_row], xy[focus_row]
            fig.add_trace(
                go.Scatter(
                    x=[start[0], end[0]],
                    y=[start[1], end[1]],
                    mode="lines+markers",
                    line={"color": FOCUS_COLOUR, "dash": "dot", "width": 1},
                    marker={"size": [9, 0], "symbol": "circle-open", "color": FOCUS_COLOUR},
                    name=f"{tokens[focus_id]} moved",
                    hoverinfo="skip",
                    showlegend=False,
                ),
                row=1,
                col=col,
            )
        fig.add_trace(_focus_trace(xy[focus_row], tokens[focus_id], focus_id), row=1, col=col)
    x_range, y_range = _shared_range(coords, 0), _shared_range(coords, 1)
    fig.update_xaxes(range=x_range, matches="x", showticklabels=False, zeroline=False)
    fig.update_yaxes(range=y_range, matches="y", showticklabels=False, zeroline=False)
    if sampled_note:
        fig.add_annotation(
            text=f"⚠ {sampled_note}",
            xref="paper",
            yref="paper",
            x=0,
            y=1,
            yshift=32,
            xanchor="left",
            yanchor="bottom",
            showarrow=False,
            font={"size": 12, "color": NOTE_COLOUR},
            name="sampled_note",
        )
    fig = _finish(fig, provenance, title=title, height=460)
    fig.update_layout(margin={"t": 90 if sampled_note or title else 50})
    return fig


def _row_of(ids: np.ndarray, token_id: int | None) -> int | None:
    if token_id is None:
        return None
    rows = np.flatnonzero(ids == token_id)
    return int(rows[0]) if rows.size else None


def _focus_trace(xy: np.ndarray, token: str, token_id: int) -> go.Scattergl:
    return go.Scattergl(
        x=[xy[0]],
        y=[xy[1]],
        mode="markers+text",
        text=[token],
        textposition="top center",
        hovertext=[token],
        customdata=[token_id],
        hovertemplate="%{hovertext}<br>id %{customdata} (focus)<extra></extra>",
        marker={"size": 14, "symbol": "star", "color": FOCUS_COLOUR, "line": {"width": 1, "color": "white"}},
        name=f"focus: {token}",
        showlegend=False,
    )


# -- cost curves (``embviz bench --stages scale``) ----------------------------------------------------------
def cost_curves(
    points: Sequence[Mapping[str, Any]], growth: Mapping[str, Mapping[str, Any]], provenance: str
) -> go.Figure:
    """Log-log time against vocabulary size, one panel per width D, one line per stage (measured points
    only), each stage's fitted exponent in the legend."""
    measured = [p for p in points if p.get("status") == "measured" and p.get("seconds")]
    hiddens = sorted({int(p["hidden"]) for p in measured})
    stages = list(dict.fromkeys(str(p["stage"]) for p in measured))
    colours = dict(zip(stages, PALETTE * (1 + len(stages) // len(PALETTE)), strict=False))
    fig = make_subplots(
        rows=1, cols=max(1, len(hiddens)), subplot_titles=[f"D = {d:,}" for d in hiddens], shared_yaxes=True
    )
    for column, hidden in enumerate(hiddens, start=1):
        for stage in stages:
            chosen = sorted((p for p in measured if p["stage"] == stage and p["hidden"] == hidden),
                            key=lambda p: p["vocab"])  # fmt: skip
            if not chosen:
                continue
            fitted = growth.get(stage, {})
            exponent = fitted.get("vocab_exponent")
            name = f"{stage} (V^{exponent:g})" if exponent is not None else stage
            fig.add_trace(
                go.Scatter(
                    x=[p["vocab"] for p in chosen],
                    y=[p["seconds"] for p in chosen],
                    mode="lines+markers",
                    name=name,
                    legendgroup=stage,
                    showlegend=column == 1,
                    line={"color": colours[stage]},
                    hovertemplate=f"{stage}<br>V=%{{x:,}}<br>%{{y:.1f}} s<extra>D={hidden:,}</extra>",
                ),
                row=1,
                col=column,
            )
    vocabs = [int(p["vocab"]) for p in measured] or [1]
    seconds = [float(p["seconds"]) for p in measured] or [1.0]
    # Every panel on the same log ranges (plotly's shared y-axis would log-scale the first panel only).
    x_range = [math.log10(min(vocabs) / 1.25), math.log10(max(vocabs) * 1.25)]
    y_range = [math.log10(min(seconds) / 1.5), math.log10(max(seconds) * 1.5)]
    fig.update_xaxes(type="log", range=x_range, title_text="vocabulary rows V")
    fig.update_yaxes(type="log", range=y_range)
    fig.update_yaxes(title_text="seconds (2 CPU cores)", row=1, col=1)
    fig = _finish(fig, provenance, title="How each stage's time grows with V (log-log)", height=500)
    # The legend above the panels' own titles, not on them.
    fig.update_layout(margin={"t": 120}, legend={"y": 1.14, "x": 0, "xanchor": "left"})
    return fig


__all__ = [
    "angle_histogram",
    "bin_count",
    "bin_index",
    "class_breakdown_bar",
    "cost_curves",
    "norm_ratio_histogram",
    "perplexity_curve",
    "projection_panels",
    "provenance_line",
    "recall_bins",
    "recall_histogram",
    "training_curve",
    "variant_colours",
]


# -- training and perplexity curves ---------------------------------------------------------------------------
def training_curve(
    history: Sequence[Mapping[str, Any]], *, provenance: str = "", title: str | None = None
) -> go.Figure:
    """Per-epoch AE training: the training cosine error (left) and the validation mean cosine (right).

    The total loss is not plotted: the paper loss anneals its exponent alpha, so its value is not comparable
    from one epoch to the next; the cosine term (mean 1 - cos on training rows) is. A loss without a cosine
    term (MSE) falls back to the total loss. The selected checkpoint is marked.
    """
    epochs = [record["epoch"] for record in history]
    has_cosine = all("cosine" in record.get("terms", {}) for record in history)
    train = [record["terms"]["cosine"] if has_cosine else record["loss"] for record in history]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=epochs,
            y=train,
            name="training 1 − cos" if has_cosine else "training loss",
            mode="lines+markers",
            marker_color=PALETTE[0],
        )
    )
    fig.add_trace(
        go.Scatter(
            x=epochs,
            y=[record.get("val_mean_cosine") for record in history],
            name="validation mean cosine",
            mode="lines+markers",
            yaxis="y2",
            marker_color=PALETTE[2],
        )
    )
    selected = [record for record in history if record.get("selected")]
    if selected:
        fig.add_vline(
            x=selected[0]["epoch"],
            line_dash="dot",
            line_color=ORIGINAL_COLOUR,
            annotation_text="kept",
            annotation_position="top left",
        )
    fig.update_layout(
        xaxis={"title": "epoch", "dtick": 1},
        yaxis={"title": "1 − cos (train)" if has_cosine else "loss"},
        yaxis2={"title": "mean cosine (held-out rows)", "overlaying": "y", "side": "right"},
    )
    return _finish(fig, provenance, title=title or "AutoEncoder training")


def _series_by_method(
    rows: Sequence[Mapping[str, Any]], metric: str
) -> tuple[dict[str, list[Mapping[str, Any]]], Mapping[str, Any] | None]:
    """Sweep rows grouped by label (rows without ``metric`` dropped), and the uncompressed row if present."""
    methods: dict[str, list[Mapping[str, Any]]] = {}
    reference = None
    for row in rows:
        if row.get(metric) is None:
            continue
        if row["method"] == "uncompressed":
            reference = row
        else:
            methods.setdefault(str(row.get("label") or row["method"]), []).append(row)
    return methods, reference


def perplexity_curve(
    rows: Sequence[Mapping[str, Any]], *, provenance: str = "", title: str | None = None
) -> go.Figure:
    """Perplexity (log scale) against compression ratio, one line per method, the uncompressed model dashed.

    ``rows`` are sweep rows in their JSON form (:meth:`embviz.evaluation.SweepRow.to_dict`, as
    ``embviz sweep --json`` prints them), at least ``method``, ``ratio`` and ``perplexity``; a row whose
    method is ``uncompressed`` draws the horizontal reference line.
    """
    methods, reference_row = _series_by_method(rows, "perplexity")
    reference = float(reference_row["perplexity"]) if reference_row is not None else None
    colours = variant_colours(list(methods))
    fig = go.Figure()
    for name, points in methods.items():
        points = sorted(points, key=lambda r: r["ratio"])
        fig.add_trace(
            go.Scatter(
                x=[p["ratio"] for p in points],
                y=[p["perplexity"] for p in points],
                name=name,
                mode="lines+markers",
                marker_color=colours[name],
                text=[f"rank {p.get('rank')}" for p in points],
                hovertemplate="ratio %{x:.2f}x · %{text}<br>perplexity %{y:.4g}<extra>" + name + "</extra>",
            )
        )
    if reference is not None:
        # A trace, not add_hline: on a log axis a shape's y is read in log10 units.
        top = max((float(r["ratio"]) for r in rows), default=1.0)
        fig.add_trace(
            go.Scatter(
                x=[1.0, max(top, 1.0)],
                y=[reference, reference],
                name=f"uncompressed ({reference:.3g})",
                mode="lines+markers",
                line={"dash": "dash", "color": ORIGINAL_COLOUR},
                marker={"size": [8, 0], "color": ORIGINAL_COLOUR},
                hovertemplate=f"uncompressed perplexity {reference:.4g}<extra></extra>",
            )
        )
    ticks = sorted({1.0, *(round(float(r["ratio"]), 1) for r in rows)})
    fig.update_xaxes(
        title="compression ratio of the embedding (x fewer parameters)",
        type="log",
        tickvals=ticks,
        ticktext=[f"{value:g}x" for value in ticks],
    )
    fig.update_yaxes(title="perplexity (log scale)", type="log", dtick=1)
    return _finish(fig, provenance, title=title or "Zero-shot perplexity vs compression ratio", height=440)


RD_AXES = ("bits", "bytes")
"""What :func:`rate_distortion` puts on its x-axis: bits per weight (SPEC §2) or stored MiB."""
BITS_TICKS = (0.125, 0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
MARK_COLOUR = "#555555"


def storage_marks(rows: Sequence[Mapping[str, Any]]) -> list[tuple[float, str]]:
    """The widths a bits-per-weight axis marks, ``[(bits, label), ...]`` by width: the backbone's source
    format (the rows' ``source_format`` / ``source_bits_per_weight``, e.g. ``GGUF Q8_0, 8.5 bits``),
    bfloat16 (16) and float32 (32); a source stored at 16 or 32 bits shares that mark."""
    marks = {16.0: "bfloat16, 16 bits", 32.0: "float32, 32 bits"}
    source = next((row for row in rows if row.get("source_bits_per_weight")), None)
    if source is not None:
        bits = float(source["source_bits_per_weight"])
        name = str(source.get("source_format") or "source format")
        marks[bits] = (
            f"{marks[bits]} (the source format)" if bits in marks else f"source: {name}, {bits:g} bits"
        )
    return sorted(marks.items())


def rate_distortion(
    rows: Sequence[Mapping[str, Any]],
    *,
    metric: str = "perplexity",
    provenance: str = "",
    title: str | None = None,
    x: str = "bits",
) -> go.Figure:
    """``metric`` (perplexity, log scale; or recall@k) against stored size, one series per method.

    ``x="bits"`` (the default) puts **bits per weight** on a log x-axis (every stored byte x 8 over V*D,
    SPEC §2) with dotted vertical marks for the backbone's source format, bfloat16 and float32
    (:func:`storage_marks`); ``x="bytes"`` puts stored MiB there. The Pareto frontier over every method is
    drawn as a thick line, the uncompressed model as a star. ``rows`` are sweep rows in their JSON form
    (:meth:`embviz.evaluation.SweepRow.to_dict`), at least ``method``, ``label``, ``bytes``, ``rank`` and
    ``metric``, and ``bits_per_weight`` for the bits axis.

    Raises:
        ValueError: an unknown ``x``.
    """
    if x not in RD_AXES:
        raise ValueError(f"x must be one of {RD_AXES}, got {x!r}")
    bits_axis = x == "bits"

    def position(row: Mapping[str, Any]) -> float:
        return float(row["bits_per_weight"]) if bits_axis else row["bytes"] / 2**20

    unit = "%{x:.3g} bits/weight" if bits_axis else "%{x:.2f} MiB"
    higher_is_better = metric != "perplexity"
    methods, reference = _series_by_method(rows, metric)
    colours = variant_colours(list(methods))
    fig = go.Figure()
    for name, points in methods.items():
        points = sorted(points, key=lambda r: r["bytes"])
        fig.add_trace(
            go.Scatter(
                x=[position(p) for p in points],
                y=[p[metric] for p in points],
                name=name,
                mode="lines+markers",
                marker_color=colours[name],
                line={"width": 1},
                text=[_size_text(p) for p in points],
                hovertemplate=f"{unit} · %{{text}}<br>{metric} %{{y:.4g}}<extra>{name}</extra>",
            )
        )
    kept = [row for row in rows if row.get(metric) is not None]
    best = sorted(
        (
            row
            for row, on in zip(kept, frontier(kept, y=metric, maximize=higher_is_better), strict=True)
            if on
        ),
        key=lambda r: r["bytes"],
    )
    if best:
        fig.add_trace(
            go.Scatter(
                x=[position(p) for p in best],
                y=[p[metric] for p in best],
                name="frontier (best at its size)",
                mode="lines",
                line={"width": 6, "color": "rgba(40,40,40,0.22)"},
                hoverinfo="skip",
            )
        )
    if reference is not None:
        fig.add_trace(
            go.Scatter(
                x=[position(reference)],
                y=[reference[metric]],
                name=f"uncompressed ({reference[metric]:.4g})",
                mode="markers",
                marker={"symbol": "star", "size": 14, "color": ORIGINAL_COLOUR},
                hovertemplate=f"uncompressed · {unit}<br>{metric} %{{y:.4g}}<extra></extra>",
            )
        )
    if bits_axis:
        marks = storage_marks(rows)
        for bits, label in marks:
            fig.add_shape(
                type="line",
                xref="x",
                yref="paper",
                x0=bits,
                x1=bits,
                y0=0,
                y1=1,
                line={"color": MARK_COLOUR, "width": 1, "dash": "dot"},
                name=label,
            )
            fig.add_annotation(
                text=label,
                xref="x",
                yref="paper",
                x=math.log10(bits),  # annotations on a log axis take the log of their position
                y=1,
                xanchor="right",
                yanchor="top",
                textangle=-90,
                showarrow=False,
                font={"size": 10, "color": MARK_COLOUR},
                name=f"mark: {label}",
            )
        values = [position(row) for row in kept] + [bits for bits, _ in marks]
        positive = [value for value in values if value > 0]
        low, high = min(positive) / 1.4, max(positive) * 1.4
        ticks = [value for value in BITS_TICKS if low <= value <= high]
        fig.update_xaxes(
            title="bits per weight (every stored byte x 8 over V x D; log scale)",
            type="log",
            range=[math.log10(low), math.log10(high)],
            tickvals=ticks,
            ticktext=[f"{value:g}" for value in ticks],
        )
    else:
        ticks = _log_ticks([float(row["bytes"]) / 2**20 for row in kept])
        fig.update_xaxes(
            title="stored size of the embedding (MiB, log scale)",
            type="log",
            tickvals=ticks,
            ticktext=[f"{value:g}" for value in ticks],
        )
    if higher_is_better:
        fig.update_yaxes(title=metric.replace("_at_k", "@k"), range=[0, 1.02])
    else:
        fig.update_yaxes(title=f"{metric} (log scale)", type="log", dtick=1)
    quality = "Perplexity" if metric == "perplexity" else "Neighbour recall"
    default = f"{quality} vs {'bits per weight' if bits_axis else 'stored bytes'}"
    # The legend sits above the plot, right-aligned, a few entries per line: below the title, not over it.
    entries = sum(1 for trace in fig.data if trace.showlegend is not False)
    legend_px = LEGEND_LINE_PX * math.ceil(entries / LEGEND_ENTRIES_PER_LINE)
    _finish(fig, provenance, title=title or default, height=440 + legend_px)
    top = {"yref": "container", "y": 1.0, "yanchor": "top", "pad": {"t": 14}}  # not centred in the margin
    return fig.update_layout(margin={"t": 60 + legend_px}, title=top)


def _log_ticks(values: Sequence[float]) -> list[float]:
    """1-2-5 tick values spanning ``values`` on a log axis (plotly's own log ticks label every minor step)."""
    positive = [value for value in values if value > 0]
    if not positive:
        return []
    low, high = min(positive) / 1.5, max(positive) * 1.5
    exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    return [m * 10.0**e for e in exponents for m in (1, 2, 5) if low <= m * 10.0**e <= high]


def _size_text(row: Mapping[str, Any]) -> str:
    rank = f"rank {row['rank']} · " if row.get("rank") is not None else ""
    if row.get("bytes_vs_bf16") is None:
        return f"{rank}{float(row.get('byte_ratio') or 0):.2f}x fewer bytes"
    text = f"{rank}{float(row['bytes_vs_bf16']):.2f}x fewer bytes than bfloat16"
    if row.get("bytes_vs_source") is not None:
        text += f", {float(row['bytes_vs_source']):.2f}x than the source ({row.get('source_format')})"
    return text


# -- the "Why direction?" page: the toy and the direction / length 2 x 2 -------------------------------------
TOY_ARC_SHARE = 0.45
"""An angle's arc is drawn at this share of its arrow's length from the origin."""


def _arc(start: np.ndarray, end: np.ndarray, radius: float, points: int = 16) -> np.ndarray:
    """Points on the arc from ``start``'s direction to ``end``'s at ``radius`` (empty when undefined)."""
    a, b = np.linalg.norm(start), np.linalg.norm(end)
    if a == 0 or b == 0:
        return np.empty((0, len(start)))
    u, v = start / a, end / b
    theta = math.acos(max(-1.0, min(1.0, float(u @ v))))
    if theta < 1e-3 or math.pi - theta < 1e-3:
        return np.empty((0, len(start)))
    t = np.linspace(0.0, 1.0, points)[:, None]
    return radius * (np.sin((1 - t) * theta) * u + np.sin(t * theta) * v) / math.sin(theta)


def _segments(ends: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
    """Line segments start -> end with a NaN row between them (one trace draws them all)."""
    starts = np.zeros_like(ends) if starts is None else starts
    rows = [np.vstack([s, e, np.full(ends.shape[1], np.nan)]) for s, e in zip(starts, ends, strict=True)]
    return np.vstack(rows) if rows else np.empty((0, ends.shape[1]))


def _toy_hover(
    vectors: np.ndarray, reconstruction: np.ndarray, angles: np.ndarray, name: str
) -> list[str | None]:
    """Hover text for the tips of the reconstructed arrows (None at the origin and the gaps)."""
    texts: list[str | None] = []
    for i, (x, y, angle) in enumerate(zip(vectors, reconstruction, angles, strict=True)):
        a, b = float(np.linalg.norm(x)), float(np.linalg.norm(y))
        ratio = f" (x{b / a:.2f})" if a else ""
        texts += [
            None,
            f"{name} · arrow {i + 1}<br>angle {angle:.1f}°<br>length {a:.2f} -> {b:.2f}{ratio}",
            None,
        ]
    return texts


def _toy_trace(points: np.ndarray, *, tips: bool = False, **style: Any) -> go.Scatter | go.Scatter3d:
    """One 2-D or 3-D line trace through ``points``; with ``tips`` a marker at the end of every segment (an
    arrowhead in 2-D), sized 0 at its start and gap rows."""
    dim = points.shape[1]
    if tips:
        symbol = {"symbol": "arrow", "angleref": "previous"} if dim == 2 else {"symbol": "diamond"}
        size = [0, 11 if dim == 2 else 4, 0] * (len(points) // 3)
        style["marker"] = {"size": size, "color": style["line"]["color"], **symbol}
    style.setdefault("hoverinfo", "text" if "hovertext" in style else "skip")
    style["mode"] = "lines+markers" if tips else "lines"
    if dim == 2:
        return go.Scatter(x=points[:, 0], y=points[:, 1], **style)
    return go.Scatter3d(x=points[:, 0], y=points[:, 1], z=points[:, 2], **style)


def _span_trace(basis: np.ndarray, offset: np.ndarray, reach: float, colour: str, **legend: Any) -> Any:
    """What a rank-r map can reach: a dashed line (r = 1) or a shaded plane (r = 2 in 3-D); None otherwise."""
    name = "what rank r can reach"
    if basis.shape[1] == 1:
        line = offset + np.outer([-2 * reach, 2 * reach], basis[:, 0])
        return _toy_trace(line, name=name, line={"color": colour, "dash": "dash", "width": 1}, **legend)
    if basis.shape == (3, 2):
        plane = offset + (np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 1.5 * reach) @ basis.T
        x, y, z = plane.T
        triangles = {"i": [0, 0], "j": [1, 2], "k": [2, 3]}
        style = {"color": colour, "opacity": 0.12, "name": name, "hoverinfo": "skip"}
        return go.Mesh3d(x=x, y=y, z=z, **triangles, **style, **legend)
    return None


def toy_arrows(
    vectors: np.ndarray,
    reconstructions: Mapping[str, np.ndarray],
    angles: Mapping[str, np.ndarray],
    *,
    spans: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    provenance: str,
    title: str | None = None,
) -> go.Figure:
    """The toy's arrows (grey) and each variant's reconstructions (one panel each), 2-D or 3-D.

    ``vectors`` is n x D (D = 2 or 3); ``reconstructions`` and ``angles`` (degrees) map a variant to its
    n x D reconstruction and n angles; ``spans`` maps a variant to ``(basis, offset)``: the D x r directions
    its reconstructions can take and where they are shifted to, drawn as a dashed line (r = 1) or a shaded
    plane (r = 2, 3-D). Each angle is an arc at :data:`TOY_ARC_SHARE` of its arrow's length.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    dim = vectors.shape[1]
    if dim not in (2, 3):
        raise ValueError(f"toy_arrows draws 2-D or 3-D arrows, got {dim}-D")
    names = list(reconstructions)
    colours = variant_colours(names)
    reach = 1.15 * max(
        [float(np.abs(vectors).max(initial=1.0))]
        + [float(np.abs(np.asarray(r)).max(initial=0.0)) for r in reconstructions.values()]
    )
    fig = make_subplots(
        rows=1,
        cols=len(names),
        specs=[[{"type": "scene" if dim == 3 else "xy"} for _ in names]],
        subplot_titles=[f"{name}: mean angle {np.nanmean(angles[name]):.1f}°" for name in names],
        horizontal_spacing=0.06,
    )
    lengths = np.linalg.norm(vectors, axis=1)
    for col, name in enumerate(names, start=1):
        rebuilt = np.asarray(reconstructions[name], dtype=np.float64)

        def legend(group: str, col: int = col) -> dict[str, Any]:
            return {"showlegend": col == 1, "legendgroup": group}

        traces = []
        if spans and name in spans:
            basis, offset = (np.asarray(part, dtype=np.float64) for part in spans[name])
            traces.append(_span_trace(basis, offset, reach, colours[name], **legend("span")))
        grey, colour = {"color": ORIGINAL_COLOUR, "width": 3}, {"color": colours[name], "width": 3}
        hover = _toy_hover(vectors, rebuilt, angles[name], name)
        traces.append(
            _toy_trace(_segments(vectors), tips=True, name="original arrows", line=grey, **legend("x"))
        )
        rebuilt_style = {"name": "reconstructed", "line": colour, "hovertext": hover, **legend("rebuilt")}
        traces.append(_toy_trace(_segments(rebuilt), tips=True, **rebuilt_style))
        arcs = [_arc(x, y, TOY_ARC_SHARE * n) for x, y, n in zip(vectors, rebuilt, lengths, strict=True)]
        gap = np.full((1, dim), np.nan)
        arc_points = np.vstack([part for arc in arcs if len(arc) for part in (arc, gap)] or [gap])
        arc_line = {"color": NOTE_COLOUR, "width": 1.5}
        traces.append(_toy_trace(arc_points, name="angle", line=arc_line, **legend("angle")))
        for trace in traces:
            if trace is not None:
                fig.add_trace(trace, row=1, col=col)
    # the arrows' bounding box (origin included), one unit as long on every axis
    points = np.vstack([vectors, np.zeros((1, dim)), *(np.asarray(r) for r in reconstructions.values())])
    low, high = np.minimum(points.min(axis=0), 0.0), np.maximum(points.max(axis=0), 0.0)
    pad = 0.08 * float((high - low).max())
    if dim == 2:
        x_range, y_range = [low[0] - pad, high[0] + pad], [low[1] - pad, high[1] + pad]
        for col in range(1, len(names) + 1):
            anchor = f"x{col if col > 1 else ''}"
            fig.update_xaxes(range=x_range, zerolinecolor="#cccccc", row=1, col=col)
            fig.update_yaxes(
                range=y_range, scaleanchor=anchor, scaleratio=1, zerolinecolor="#cccccc", row=1, col=col
            )
    else:  # a cube around the box: equal ranges, so angles look right
        half = float((high - low).max()) / 2 + pad
        centre = (low + high) / 2
        axes = {f"{name}axis": {"range": [c - half, c + half]} for name, c in zip("xyz", centre, strict=True)}
        fig.update_scenes(**axes, aspectmode="cube")
    _finish(fig, provenance, title=title, height=540)
    # the legend goes above the panels' titles
    return fig.update_layout(margin={"t": 110 if title else 80}, legend={"y": 1.12})


def angle_by_length(
    lengths: np.ndarray, angles: Mapping[str, np.ndarray], *, provenance: str, title: str | None = None
) -> go.Figure:
    """Each arrow's angle error (degrees) against its original length, one series per variant."""
    lengths = np.asarray(lengths, dtype=np.float64)
    order = np.argsort(lengths, kind="stable")
    colours = variant_colours(list(angles))
    fig = go.Figure()
    for name, values in angles.items():
        values = np.asarray(values, dtype=np.float64)
        fig.add_trace(
            go.Scatter(
                x=lengths[order],
                y=values[order],
                name=f"{name} (mean {np.nanmean(values):.1f}°)",
                mode="markers",
                marker={"size": 9, "color": colours[name]},
                customdata=order + 1,
                hovertemplate=f"{name} · arrow %{{customdata}}<br>length %{{x:.2f}}<br>angle %{{y:.1f}}°"
                "<extra></extra>",
            )
        )
    fig.update_xaxes(title="length of the original arrow")
    fig.update_yaxes(title="angle to its reconstruction (degrees)", rangemode="tozero")
    return _finish(fig, provenance, title=title or "Which arrows lose their direction", height=360)


def direction_length_grid(
    grids: Mapping[str, Mapping[tuple[str, str], float]],
    *,
    notes: Mapping[str, Mapping[tuple[str, str], str]] | None = None,
    provenance: str,
    title: str | None = None,
) -> go.Figure:
    """One 2 x 2 heat map per variant: rows whose directions, columns whose lengths, colour log perplexity.

    ``grids`` maps a variant to ``{(directions, lengths): perplexity}`` where each side is ``"original"`` or
    the variant's name; ``notes`` adds a line to a cell (e.g. its top prediction for a blank). The colour
    scale is shared by every panel (log10 of perplexity; lower is better).
    """
    names = list(grids)
    values = [v for cells in grids.values() for v in cells.values() if v > 0 and math.isfinite(v)]
    low, high = (math.log10(min(values)), math.log10(max(values))) if values else (0.0, 1.0)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.17)
    for col, name in enumerate(names, start=1):
        sides = ("original", name)
        z, text = [], []
        for directions in sides:
            row_z, row_text = [], []
            for lengths in sides:
                value = grids[name].get((directions, lengths), math.nan)
                row_z.append(math.log10(value) if value > 0 else math.nan)
                note = (notes or {}).get(name, {}).get((directions, lengths), "")
                row_text.append(f"<b>{value:,.1f}</b>" + (f"<br>{note}" if note else ""))
            z.append(row_z)
            text.append(row_text)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=[f"{side} lengths" for side in sides],
                y=[f"{side} directions" for side in sides],
                text=text,
                texttemplate="%{text}",
                textfont={"size": 14},
                zmin=low,
                zmax=max(high, low + 1e-6),
                colorscale="YlOrRd",
                showscale=col == len(names),
                colorbar={"title": "log10 perplexity"},
                hovertemplate="%{y} · %{x}<br>perplexity %{text}<extra></extra>",
                name=name,
            ),
            row=1,
            col=col,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    return _finish(fig, provenance, title=title or "Perplexity: whose directions x whose lengths", height=420)
