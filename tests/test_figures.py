from __future__ import annotations

import json
import math

import numpy as np
import plotly.graph_objects as go
import pytest

from embviz.figures import (
    ORIGINAL_COLOUR,
    angle_by_length,
    angle_histogram,
    bin_count,
    bin_index,
    class_breakdown_bar,
    direction_length_grid,
    norm_ratio_histogram,
    perplexity_curve,
    projection_panels,
    provenance_line,
    rate_distortion,
    recall_bins,
    recall_histogram,
    storage_marks,
    toy_arrows,
    training_curve,
    variant_colours,
)

PROVENANCE = "model tiny · method svd · rank 4 · seed 42"


def _annotations(fig: go.Figure) -> list[str]:
    return [a.text for a in fig.layout.annotations]


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_provenance_line_lists_facts_and_versions() -> None:
    line = provenance_line("smollm2", method="svd", rank=64, seed=None)
    assert line.startswith("model smollm2 · method svd · rank 64 · embviz ")
    assert "seed" not in line and "torch" in line


def test_colours_are_stable_and_original_is_grey() -> None:
    colours = variant_colours(["original", "SVD", "AE"])
    assert colours["original"] == ORIGINAL_COLOUR and len(set(colours.values())) == 3
    assert variant_colours(["SVD", "AE"])["SVD"] == colours["SVD"]


def test_angle_histogram_overlays_variants_on_shared_bins() -> None:
    angles = {"SVD": _rng().uniform(0, 80, 500), "AE": np.append(_rng().uniform(0, 40, 499), np.nan)}
    fig = angle_histogram(angles, provenance=PROVENANCE)
    assert len(fig.data) == 2 and fig.layout.barmode == "overlay"
    assert list(fig.data[0].x) == list(fig.data[1].x) and fig.layout.xaxis.range[0] == 0  # shared bins
    assert fig.data[0].name.startswith("SVD (mean") and "°" in fig.data[0].name
    assert sum(fig.data[1].customdata) == 499  # counted bars; the NaN (a zero row) is left out
    assert sum(fig.data[1].y) == pytest.approx(100.0)
    assert len(fig.data[0].x) == 60  # the browser gets one number per bin, not one per token
    assert PROVENANCE in _annotations(fig)


def test_norm_ratio_and_recall_histograms() -> None:
    ratios = {"SVD": _rng().uniform(0.2, 1.0, 300), "AE": _rng().uniform(0.5, 1.5, 300)}
    fig = norm_ratio_histogram(ratios, provenance=PROVENANCE)
    assert len(fig.data) == 2 and fig.layout.xaxis.range[1] >= 1.05 and PROVENANCE in _annotations(fig)

    recall = {"SVD": _rng().integers(0, 11, 300) / 10, "AE": _rng().integers(5, 11, 300) / 10}
    fig = recall_histogram(recall, 10, provenance=PROVENANCE)
    assert len(fig.data) == 2 and list(fig.data[0].x) == pytest.approx([j / 10 for j in range(11)])
    for trace, values in zip(fig.data, recall.values(), strict=True):  # bar j counts the tokens at j / 10
        assert list(trace.customdata) == np.bincount(np.rint(values * 10).astype(int), minlength=11).tolist()
    assert "recall@10" in fig.layout.title.text and PROVENANCE in _annotations(fig)


def test_bin_index_matches_the_drawn_bars() -> None:
    bins = recall_bins(10)
    values = np.array([0.0, 0.1, 0.3, 0.7, 1.0, np.nan, 1.2])
    assert bin_index(values, bins).tolist() == [0, 1, 3, 7, 10, -1, -1]
    assert bin_count(bins) == 11 and bin_count({"start": 0, "end": 1, "size": 0.3}) == 4


def test_histograms_survive_all_nan_input() -> None:
    fig = angle_histogram({"SVD": np.full(3, np.nan)})
    assert fig.data[0].name == "SVD (no values)" and fig.layout.xaxis.range[1] > 0


def test_class_breakdown_bar_groups_classes_per_variant() -> None:
    values = {"SVD": {"word": 30.0, "subword": 40.0, "special": None}, "AE": {"word": 20.0, "subword": 25.0}}
    fig = class_breakdown_bar(
        values,
        counts={"word": 1200, "subword": 30},
        order=["special", "word", "subword"],
        provenance=PROVENANCE,
    )
    assert [t.name for t in fig.data] == ["SVD", "AE"] and fig.layout.barmode == "group"
    assert list(fig.data[0].x) == ["special", "word (1,200)", "subword (30)"]
    assert list(fig.data[0].y) == [None, 30.0, 40.0] and list(fig.data[1].y) == [None, 20.0, 25.0]
    assert PROVENANCE in _annotations(fig)


def _coords(n: int = 50) -> dict[str, np.ndarray]:
    base = _rng().normal(size=(n, 2))
    return {"original": base, "SVD": base * 3 + 1, "AE": base * 0.5}


def test_projection_panels_share_axes_and_mark_the_focus_everywhere() -> None:
    coords = _coords()
    tokens = [f"tok{i}" for i in range(50)]
    fig = projection_panels(coords, tokens, focus_id=7, provenance=PROVENANCE)
    scatter = [t for t in fig.data if t.mode == "markers"]
    focus = [t for t in fig.data if t.name == "focus: tok7"]
    assert len(fig.data) == 6 and len(scatter) == 3 and len(focus) == 3
    assert all(isinstance(t, go.Scattergl) for t in fig.data)
    for trace, xy in zip(focus, coords.values(), strict=True):  # one star per panel, at the right place
        assert (trace.x[0], trace.y[0]) == tuple(xy[7]) and trace.text == ("tok7",)
    assert {t.xaxis for t in focus} == {"x", "x2", "x3"}
    assert list(scatter[1].hovertext) == tokens
    sent = json.loads(fig.to_json())["data"]  # what the browser gets: every point's token as text
    assert [sent[i]["hovertext"] for i in (0, 2, 4)] == [tokens] * 3
    ranges = {tuple(fig.layout[f"xaxis{s}"].range) for s in ("", "2", "3")}
    assert len(ranges) == 1
    (x_range,) = ranges
    assert x_range[0] <= min(c[:, 0].min() for c in coords.values())
    assert x_range[1] >= max(c[:, 0].max() for c in coords.values())
    assert len({tuple(fig.layout[f"yaxis{s}"].range) for s in ("", "2", "3")}) == 1
    assert fig.layout.xaxis2.matches == "x" and fig.layout.yaxis3.matches == "y"
    assert [a.text for a in fig.layout.annotations][:3] == ["original", "SVD", "AE"]
    assert PROVENANCE in _annotations(fig)


def test_projection_panels_with_sample_note_ids_and_movement_lines() -> None:
    coords = _coords(20)
    ids = np.arange(100, 300, 10)
    tokens = [f"t{i}" for i in range(300)]
    note = "UMAP map of 20 of 300 tokens (random sample)"
    fig = projection_panels(coords, tokens, focus_id=150, ids=ids, sampled_note=note, movement_lines=True)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 2  # one per variant panel
    assert (lines[0].x[0], lines[0].y[0]) == tuple(coords["original"][5])
    assert (lines[0].x[1], lines[0].y[1]) == tuple(coords["SVD"][5])
    assert list(fig.data[0].hovertext) == [f"t{i}" for i in ids]
    assert any(note in text for text in _annotations(fig))


def test_projection_panels_without_focus_in_sample() -> None:
    fig = projection_panels(_coords(10), [str(i) for i in range(10)], focus_id=None)
    assert len(fig.data) == 3
    fig = projection_panels(_coords(10), [str(i) for i in range(99)], focus_id=98, ids=np.arange(10))
    assert len(fig.data) == 3


def test_training_curve_shows_loss_and_validation_cosine() -> None:
    history = [{"epoch": e, "loss": 1 / e, "val_mean_cosine": 0.5 + e / 10} for e in (1, 2, 3)]
    fig = training_curve(history, provenance=PROVENANCE)
    assert [t.name for t in fig.data] == ["training loss", "validation mean cosine"]
    assert fig.data[1].yaxis == "y2"
    assert list(fig.data[0].y) == [1.0, 0.5, 1 / 3]
    assert PROVENANCE in _annotations(fig)


def test_training_curve_prefers_the_comparable_cosine_term_and_marks_the_kept_epoch() -> None:
    # the paper loss anneals alpha, so its total is not comparable across epochs; its cosine term is
    history = [
        {
            "epoch": e,
            "loss": e,
            "terms": {"cosine": 0.4 - e / 10, "abs_power": e},
            "val_mean_cosine": 0.6,
            "selected": e == 2,
        }
        for e in (1, 2, 3)
    ]
    fig = training_curve(history)
    assert fig.data[0].name == "training 1 − cos"
    np.testing.assert_allclose(fig.data[0].y, [0.3, 0.2, 0.1])
    assert [shape.x0 for shape in fig.layout.shapes] == [2]


def test_perplexity_curve_has_one_line_per_method_and_the_uncompressed_reference() -> None:
    rows = [
        {"method": "uncompressed", "ratio": 1.0, "perplexity": 8.05},
        {"method": "svd", "ratio": 8.0, "perplexity": 7538.0, "rank": 64},
        {"method": "svd", "ratio": 2.0, "perplexity": 1502.0, "rank": 256},
        {"method": "ae-paper", "ratio": 8.0, "perplexity": 3525.0, "rank": 64},
    ]
    fig = perplexity_curve(rows, provenance=PROVENANCE)
    assert [t.name for t in fig.data] == ["svd", "ae-paper", "uncompressed (8.05)"]
    assert list(fig.data[0].x) == [2.0, 8.0] and list(fig.data[0].y) == [1502.0, 7538.0]
    # the reference is a trace in data units from ratio 1 to the largest ratio (a shape's y on a log axis
    # would be read as log10 and stretch the axis to 1e8)
    assert list(fig.data[2].x) == [1.0, 8.0] and list(fig.data[2].y) == [8.05, 8.05]
    assert fig.layout.yaxis.type == "log" and not fig.layout.shapes
    assert PROVENANCE in _annotations(fig)


def test_rate_distortion_draws_methods_frontier_and_uncompressed_star() -> None:
    rows = [
        {"method": "uncompressed", "label": "uncompressed", "bytes": 4 * 2**20, "perplexity": 19.5,
         "recall_at_k": 1.0, "rank": 576, "byte_ratio": 1.0},
        {"method": "svd", "label": "SVD", "bytes": 2**20, "perplexity": 4000.0, "recall_at_k": 0.2,
         "rank": 64, "byte_ratio": 4.0},
        {"method": "quant-int8", "label": "int8", "bytes": 2**20, "perplexity": 19.6, "recall_at_k": 0.9,
         "rank": None, "byte_ratio": 4.0},
        {"method": "quant-mixed", "label": "mixed", "bytes": 2**19, "perplexity": 21.0, "recall_at_k": 0.5,
         "rank": None, "byte_ratio": 8.0},
    ]  # fmt: skip
    fig = rate_distortion(rows, provenance=PROVENANCE, x="bytes")
    names = [trace.name for trace in fig.data]
    assert names == ["SVD", "int8", "mixed", "frontier (best at its size)", "uncompressed (19.5)"]
    frontier_trace = fig.data[3]
    assert list(frontier_trace.x) == [0.5, 1.0, 4.0] and list(frontier_trace.y) == [21.0, 19.6, 19.5]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    recall = rate_distortion(rows, metric="recall_at_k", x="bytes")
    assert list(recall.data[3].y) == [0.5, 0.9, 1.0] and recall.layout.yaxis.type != "log"
    assert PROVENANCE in _annotations(fig)
    # five legend entries take two lines above the plot: the top margin makes room below the title
    assert fig.layout.margin.t == 60 + 2 * 22 and fig.layout.height == 440 + 2 * 22
    one_method = rate_distortion(rows[:2], x="bytes")  # SVD, frontier, uncompressed: one line
    assert one_method.layout.margin.t == 60 + 22


def _bits_rows(source: tuple[str, float]) -> list[dict]:
    vd = 49152 * 576
    rows = [
        ("uncompressed", "uncompressed", 4 * vd, 19.5, 576),
        ("svd", "SVD", vd // 2, 4000.0, 71),
        ("svd", "SVD", vd // 4, 7000.0, 35),
        ("gguf-q4_0", "GGUF Q4_0", vd * 9 // 16, 19.9, None),
        ("quant-mixed", "mixed", vd // 2, 21.0, None),
    ]
    return [
        {"method": method, "label": label, "bytes": size, "perplexity": ppl, "recall_at_k": 0.5,
         "rank": rank, "byte_ratio": 4 * vd / size, "bits_per_weight": 8 * size / vd,
         "bytes_vs_bf16": 16 / (8 * size / vd), "source_format": source[0],
         "source_bits_per_weight": source[1], "bytes_vs_source": source[1] / (8 * size / vd)}
        for method, label, size, ppl, rank in rows
    ]  # fmt: skip


def test_rate_distortion_puts_bits_per_weight_on_the_axis_with_source_bf16_and_fp32_marks() -> None:
    fig = rate_distortion(_bits_rows(("GGUF Q8_0", 8.5)), provenance=PROVENANCE)
    assert fig.layout.xaxis.type == "log" and "bits per weight" in fig.layout.xaxis.title.text
    assert list(fig.data[0].x) == [2.0, 4.0]  # SVD at 2 and 4 bits per weight
    assert fig.data[1].name == "GGUF Q4_0" and list(fig.data[1].x) == [4.5]
    assert list(fig.data[-1].x) == [32.0]  # the uncompressed star, float32 in memory
    marks = [(shape.x0, shape.name) for shape in fig.layout.shapes]
    assert marks == [
        (8.5, "source: GGUF Q8_0, 8.5 bits"),
        (16.0, "bfloat16, 16 bits"),
        (32.0, "float32, 32 bits"),
    ]
    assert all(shape.xref == "x" and shape.yref == "paper" for shape in fig.layout.shapes)
    labels = {a.text: a.x for a in fig.layout.annotations if a.text != PROVENANCE}
    assert labels == {
        "source: GGUF Q8_0, 8.5 bits": pytest.approx(math.log10(8.5)),
        "bfloat16, 16 bits": pytest.approx(math.log10(16)),
        "float32, 32 bits": pytest.approx(math.log10(32)),
    }
    low, high = fig.layout.xaxis.range
    assert 10**low < 2 and 10**high > 32  # every point and mark in view
    assert {2, 4, 8, 16, 32} <= set(fig.layout.xaxis.tickvals)
    assert "than bfloat16" in fig.data[0].text[0] and "GGUF Q8_0" in fig.data[0].text[0]
    assert fig.layout.title.text == "Perplexity vs bits per weight"


def test_a_float32_source_shares_the_float32_mark() -> None:
    assert storage_marks(_bits_rows(("float32", 32.0))) == [
        (16.0, "bfloat16, 16 bits"),
        (32.0, "float32, 32 bits (the source format)"),
    ]
    assert storage_marks([{"source_bits_per_weight": None}]) == [
        (16.0, "bfloat16, 16 bits"),
        (32.0, "float32, 32 bits"),
    ]
    with pytest.raises(ValueError, match="x must be"):
        rate_distortion(_bits_rows(("float32", 32.0)), x="MiB")


# -- the "Why direction?" page -------------------------------------------------------------------------------
def _toy(dim: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    vectors = _rng().normal(size=(5, dim))
    flat = vectors.copy()
    flat[:, -1] = 0.0  # the projection onto the first axes
    cosine = (
        np.einsum("ij,ij->i", vectors, flat) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(flat, axis=1)
    )
    angles = np.degrees(np.arccos(np.clip(cosine, -1, 1)))
    return vectors, {"SVD": flat, "AE": flat * 0.5}, {"SVD": angles, "AE": angles}


def test_toy_arrows_in_2d_draw_arrows_spans_and_angle_arcs() -> None:
    vectors, rebuilt, angles = _toy(2)
    spans = {
        "SVD": (np.array([[1.0], [0.0]]), np.zeros(2)),
        "AE": (np.array([[1.0], [0.0]]), np.array([0, 0.5])),
    }
    fig = toy_arrows(vectors, rebuilt, angles, spans=spans, provenance=PROVENANCE)
    names = [trace.name for trace in fig.data]
    assert (
        names.count("original arrows") == 2
        and names.count("reconstructed") == 2
        and names.count("angle") == 2
    )
    assert names.count("what rank r can reach") == 2
    originals = fig.data[names.index("original arrows")]
    assert originals.marker.symbol == "arrow" and list(originals.marker.size[:3]) == [0, 11, 0]
    assert len(originals.x) == 3 * len(vectors)  # origin, tip, gap per arrow
    assert "angle" in fig.data[names.index("reconstructed")].hovertext[1]
    assert fig.layout.annotations[0].text.startswith("SVD: mean angle")
    assert fig.layout.yaxis.scaleanchor == "x" and fig.layout.yaxis2.scaleanchor == "x2"
    ae_span = [trace for trace in fig.data if trace.name == "what rank r can reach"][1]
    assert np.allclose(ae_span.y, 0.5)  # the AE's line is shifted by its offset
    assert PROVENANCE in _annotations(fig)
    assert sum(trace.showlegend is not False for trace in fig.data) == 4  # one legend entry per kind


def test_toy_arrows_in_3d_shade_a_rank_2_plane() -> None:
    vectors, rebuilt, angles = _toy(3)
    basis = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    fig = toy_arrows(vectors, rebuilt, angles, spans={"SVD": (basis, np.zeros(3))}, provenance=PROVENANCE)
    assert {type(trace).__name__ for trace in fig.data} == {"Scatter3d", "Mesh3d"}
    assert fig.layout.scene.aspectmode == "cube" and fig.layout.scene2 is not None
    with pytest.raises(ValueError, match="2-D or 3-D"):
        toy_arrows(np.zeros((3, 4)), {}, {}, provenance=PROVENANCE)


def test_angle_by_length_sorts_arrows_by_length() -> None:
    lengths = np.array([2.0, 0.5, 1.0])
    fig = angle_by_length(lengths, {"SVD": np.array([5.0, 60.0, 20.0]), "AE": np.array([9.0, 30.0, 15.0])},
                          provenance=PROVENANCE)  # fmt: skip
    assert list(fig.data[0].x) == [0.5, 1.0, 2.0] and list(fig.data[0].y) == [60.0, 20.0, 5.0]
    assert list(fig.data[0].customdata) == [2, 3, 1] and fig.data[1].name.startswith("AE (mean 18.0")


def test_direction_length_grid_is_one_2x2_heatmap_per_variant_on_a_shared_scale() -> None:
    grids = {
        "SVD": {("original", "original"): 19.5, ("original", "SVD"): 41.4, ("SVD", "original"): 3511.0,
                ("SVD", "SVD"): 4233.3},
        "AE": {("original", "original"): 19.5, ("original", "AE"): 20.9, ("AE", "original"): 2668.8,
               ("AE", "AE"): 2513.4},
    }  # fmt: skip
    notes = {"SVD": {("original", "SVD"): "' Paris' 56%"}}
    fig = direction_length_grid(grids, notes=notes, provenance=PROVENANCE)
    svd, ae = fig.data
    assert list(svd.y) == ["original directions", "SVD directions"] and list(ae.x)[1] == "AE lengths"
    assert svd.zmin == ae.zmin == pytest.approx(math.log10(19.5)) and svd.zmax == pytest.approx(
        math.log10(4233.3)
    )
    assert svd.text[0][1] == "<b>41.4</b><br>' Paris' 56%" and svd.text[1][1] == "<b>4,233.3</b>"
    assert svd.showscale is False and ae.showscale is True
    assert PROVENANCE in _annotations(fig)
