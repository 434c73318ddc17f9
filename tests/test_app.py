"""Every page of the app under streamlit's AppTest, on a tiny causal model (seconds, no download)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import streamlit as st
from streamlit.runtime.pages_manager import PagesManager
from streamlit.testing.v1 import AppTest

from embviz import resources
from embviz.artifacts import compress_cached
from embviz.backbones import Backbone
from embviz.cache import embviz_home
from embviz.compressors import AECompressor, CompressedEmbedding, make_compressor, method_ids
from embviz.progress import Progress
from pages.navigation import PAGES, PageSpec
from pages.state import MAX_COMPARED

ROOT = Path(__file__).resolve().parents[1]
RANK = 8


@pytest.fixture(autouse=True)
def server_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every run through app.py's st.navigation, as a real server does.

    AppTest resets Streamlit's legacy ``pages/`` flag before every run, so each run would first go through
    :func:`pages.routing.use_app_router`'s one-off rerun (and lose a button click); a server clears the
    flag for good once any session has called ``st.navigation``. The rerun itself is covered by the
    browser tests, which open pages directly on a fresh server.
    """
    original = PagesManager.__init__

    def init(self: PagesManager, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", init)


@pytest.fixture(scope="module")
def app_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("app-home")


@pytest.fixture
def app_env(app_home: Path, tiny_causal_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One cache for the module (artifacts trained once), the tiny model as the app's default backbone."""
    monkeypatch.setenv("EMBVIZ_HOME", str(app_home))
    monkeypatch.setenv("EMBVIZ_BACKBONE", str(tiny_causal_path))
    return tiny_causal_path


@pytest.fixture
def trained(app_env: Path) -> Path:
    """The AE the pages need, trained ahead (the train button is tested separately)."""
    backbone = Backbone.from_pretrained(str(app_env))
    compress_cached(backbone.name, backbone.embedding, make_compressor("ae-paper", RANK, recipe="fast"))
    return app_env


def run_app(page: str | None = None, **params: str | list[str]) -> AppTest:
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    for key, value in {"rank": str(RANK), **params}.items():
        app.query_params[key] = value
    app.run()
    if page is not None:
        app.switch_page(f"pages/{page}.py").run()
    return app


def assert_clean(app: AppTest) -> None:
    assert not app.exception, [e.message for e in app.exception]
    assert not app.error, [e.value for e in app.error]


def test_a_quick_autoencoder_trains_by_itself_and_is_cached(
    app_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "fresh"))
    st.cache_resource.clear()
    app = run_app(rank="6")
    assert_clean(app)
    assert not [b for b in app.button if b.label.startswith("Fit now")]
    assert any(status.label.startswith("Trained AE, paper loss, rank 6") for status in app.status)
    table = app.dataframe[0].value
    assert set(table["variant"]) == {"SVD", "AE"}
    assert (table["rank"] == 6).all()
    assert list((tmp_path / "fresh" / "artifacts").rglob("manifest.json"))


def test_a_slow_variant_waits_behind_one_button_that_says_how_long(
    app_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "fresh"))
    monkeypatch.setenv("EMBVIZ_AUTO_FIT_SECONDS", "0")
    st.cache_resource.clear()
    app = run_app(rank="6")
    assert_clean(app)
    assert any("not fitted yet" in info.value for info in app.info)
    [button] = [b for b in app.button if b.label.startswith("Fit now (about ")]
    assert not list((tmp_path / "fresh").rglob("ae-paper*/manifest.json"))
    button.click().run()
    assert_clean(app)
    assert set(app.dataframe[0].value["variant"]) == {"SVD", "AE"}
    assert list((tmp_path / "fresh" / "artifacts").rglob("manifest.json"))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_page_renders_without_errors(trained: Path, page: PageSpec) -> None:
    app = run_app(page.name)
    assert_clean(app)
    assert app.title, "each page has a title"
    assert app.title[0].value == page.heading, "the heading the browser tests wait for"
    assert app.expander, "each page explains itself"


_METHOD_GROUPS = [list(method_ids()[i : i + MAX_COMPARED]) for i in range(0, len(method_ids()), MAX_COMPARED)]


@pytest.mark.parametrize("methods", _METHOD_GROUPS, ids=lambda group: "+".join(group))
def test_every_registered_method_can_be_compared_on_every_page(trained: Path, methods: list[str]) -> None:
    """The variant picker over the registry: each method (three at a time) on every page, no error."""
    app = run_app(cmp=methods)
    assert app.session_state["cmp"] == methods
    for page in PAGES:
        app.switch_page(page.path).run()
        assert_clean(app)
        assert not [b for b in app.button if b.label.startswith("Fit now")], "tiny fits start by themselves"
    app.switch_page("pages/neighbours.py").run()
    assert [m.label for m in app.metric] == [f"{name} mean recall@10" for name in methods]


def test_variant_names_with_sizes_and_bad_names_in_the_url(trained: Path) -> None:
    app = run_app("angles", cmp=["svd@4", "quant-mixed@4b", "nonsense@7"])
    assert not app.exception
    [error] = [e.value for e in app.error]
    assert "'nonsense@7' left out: unknown method 'nonsense'" in error
    labels = [m.label for m in app.metric]
    assert "svd@4 median angle" in labels and "quant-mixed@4b median angle" in labels
    app = run_app("angles", cmp=["svd@x9"])
    assert "the size after @ must be a rank" in app.error[0].value
    assert any("Pick at least one variant" in info.value for info in app.info)


def test_a_shared_link_with_chosen_variants_reproduces_the_view(trained: Path) -> None:
    first = run_app("neighbours", cmp=["svd", "quant-int8"], tok="king")
    shared = {key: first.query_params[key] for key in first.query_params}
    second = run_app("neighbours", **shared)
    assert_clean(second)
    assert [m.value for m in second.metric] == [m.value for m in first.metric]
    assert second.session_state["cmp"] == ["svd", "quant-int8"]


def test_the_navigation_lists_every_page_once() -> None:
    """A page is a file under pages/ that starts with use_app_router(); each is in pages/navigation.py."""
    scripts = {
        f"pages/{path.name}"
        for path in (ROOT / "pages").glob("*.py")
        if "\nuse_app_router()\n" in path.read_text(encoding="utf-8")
    }
    assert sorted(page.path for page in PAGES) == sorted(scripts)
    assert [page.url_path for page in PAGES if page.default] == [""]
    assert len({page.title for page in PAGES}) == len(PAGES)


@pytest.mark.parametrize("script", ["app.py", *(page.path for page in PAGES)])
def test_no_script_draws_a_stray_string(script: str) -> None:
    """Streamlit's magic draws a bare string statement after the module docstring: a constant's "docstring"
    in a page script appears on the page. Comments there, not strings."""
    import ast

    body = ast.parse((ROOT / script).read_text(encoding="utf-8")).body
    stray = [
        node.lineno
        for node in body[1:]
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    assert stray == [], f"{script}: bare strings at lines {stray}"


def test_url_parameters_restore_the_shared_state(trained: Path) -> None:
    app = run_app("neighbours", tok="king", k="5", mode="tied", loss="paper")
    assert_clean(app)
    assert app.session_state["tok"] == "king"
    assert app.session_state["k"] == 5
    assert app.session_state["mode"] == "tied"
    assert app.session_state["rank"] == RANK
    assert any("king" in header.value for header in app.subheader)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tok": "zzzzqqq"}, "not a single token"),
        ({"tok": "#99999"}, "outside the vocabulary"),
        ({"tok": "#²"}, "not a single token"),
        ({"rank": "999"}, "out of range"),
    ],
)
def test_bad_values_show_an_error_not_a_traceback(
    trained: Path, params: dict[str, str], message: str
) -> None:
    app = run_app("neighbours", **params)
    assert not app.exception
    assert any(message in error.value for error in app.error)


def test_garbage_in_the_url_falls_back_to_defaults_with_a_warning(trained: Path) -> None:
    app = run_app(k="abc", loss="nonsense")
    assert not app.exception
    warnings = " ".join(w.value for w in app.warning)
    assert "k='abc'" in warnings and "loss='nonsense'" in warnings
    assert app.session_state["k"] == 10 and app.session_state["loss"] == "paper"


def test_predictions_for_three_variants_and_a_sentence_without_blank(trained: Path) -> None:
    app = run_app("predictions")
    assert_clean(app)
    assert len(app.dataframe) == 3
    app.text_input(key="sentence").input("no blank in this sentence").run()
    assert any("blank" in error.value for error in app.error)
    assert not app.exception


def test_predictions_are_computed_once_per_sentence_and_variants(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page revisited (or a second session) with the same sentence and variants gets the same tables at
    once; a new sentence is computed."""
    from pages import data

    calls: list[str] = []
    predict = data.predict_blank

    def counting(backbone: Backbone, sentence: str, *args: object, **kwargs: object) -> object:
        calls.append(sentence)
        return predict(backbone, sentence, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(data, "predict_blank", counting)
    data._predictions.clear()
    first = run_app("predictions")
    assert_clean(first)
    second = run_app("predictions")  # a fresh session: nothing in its own state
    assert_clean(second)
    assert len(calls) == 1 and len(second.dataframe) == 3
    assert [d.value.equals(e.value) for d, e in zip(first.dataframe, second.dataframe, strict=True)] == [
        True
    ] * 3
    second.text_input(key="sentence").input("The ___ is blue.").run()
    assert_clean(second)
    assert calls == [calls[0], "The ___ is blue."]


def test_perplexity_sweep_runs_on_demand_with_the_uncompressed_row(trained: Path) -> None:
    app = run_app("perplexity")
    assert_clean(app)
    [button] = [b for b in app.button if b.label == "Compute the sweep"]
    button.click().run()
    assert_clean(app)
    table = app.dataframe[0].value
    assert "uncompressed" in set(table["method"])
    assert {"svd", "ae-paper"} <= set(table["method"])
    assert (table["perplexity"] > 0).all()


def test_size_page_puts_every_method_on_the_byte_axis_with_a_frontier(trained: Path) -> None:
    app = run_app("size")
    assert_clean(app)
    app.multiselect(key="rd_methods").set_value(["svd", "svd-freq", "quant-int8", "quant-mixed"])
    app.multiselect(key="rd_bits").set_value([8.0, 4.0])
    app.run()
    [button] = [b for b in app.button if b.label == "Compute the sweep"]
    button.click().run()
    assert_clean(app)
    table = app.dataframe[0].value
    assert {"uncompressed", "svd", "svd-freq", "quant-int8", "quant-mixed"} <= set(table["method"])
    assert len(table[table["method"] == "quant-int8"]) == 1  # a fixed size, shown once
    assert table["frontier"].any() and (table["bytes"] > 0).all()
    assert len(app.get("plotly_chart")) == 2


def test_size_page_plots_bits_per_weight_with_source_bf16_and_fp32_marks(trained: Path) -> None:
    app = run_app("size")
    assert_clean(app)
    methods = app.multiselect(key="rd_methods")
    assert {"gguf-q8_0", "gguf-q4_0"} <= set(methods.value)  # llama.cpp's formats, as references
    assert "vq-direction" in methods.value  # the best method at few bits, so "best at each budget" is honest
    assert app.multiselect(key="rd_bits").value == [4.0, 2.0]
    methods.set_value(["svd", "quant-mixed", "gguf-q4_0"])
    app.multiselect(key="rd_bits").set_value([4.0, 2.0])
    app.run()
    [button] = [b for b in app.button if b.label == "Compute the sweep"]
    button.click().run()
    assert_clean(app)
    table = app.dataframe[0].value
    budgeted = table[table["target_bits"].notna()]
    assert set(zip(budgeted["method"], budgeted["target_bits"], strict=True)) == {
        ("svd", 4.0),
        ("svd", 2.0),
        ("quant-mixed", 4.0),  # mixed rows of 32 columns cannot go below 2.75 bits: 2 is skipped
    }
    assert (budgeted["bits_per_weight"] <= budgeted["target_bits"]).all()
    assert any("skipped quant-mixed at 2 bits per weight" in c.value for c in app.caption)
    figure = json.loads(app.get("plotly_chart")[0].proto.spec)
    layout = figure["layout"]
    assert layout["xaxis"]["type"] == "log" and "bits per weight" in layout["xaxis"]["title"]["text"]
    marks = {(shape["x0"], shape["name"]) for shape in layout["shapes"]}
    assert marks == {(16.0, "bfloat16, 16 bits"), (32.0, "float32, 32 bits (the source format)")}
    labels = {annotation["text"] for annotation in layout["annotations"]}
    assert {"bfloat16, 16 bits", "float32, 32 bits (the source format)"} <= labels
    gguf = next(trace for trace in figure["data"] if trace["name"].startswith("GGUF Q4_0"))
    assert gguf["x"] == [4.5]
    best = next(m.value for m in app.markdown if "Best at each budget" in m.value)
    assert "4 bits per weight** (8x smaller than the source (float32), 4x smaller than bfloat16" in best


# -- every URL-bound key, bad input, a broken cache, too little memory --------------------------------
URL_GARBAGE = [
    (None, "model", "no-such-model"),
    (None, "rank", "abc"),
    (None, "rank", "0"),
    (None, "rank", "-3"),
    (None, "loss", "nonsense"),
    (None, "recipe", "slow"),
    (None, "mode", "both"),
    (None, "k", "0"),
    (None, "k", "101"),
    (None, "k", "many"),
    ("angles", "split", "by colour"),
    ("map", "map", "tsne"),
]


@pytest.mark.parametrize(("page", "key", "value"), URL_GARBAGE, ids=[f"{k}={v}" for _, k, v in URL_GARBAGE])
def test_every_bound_key_falls_back_with_a_warning(
    trained: Path, page: str | None, key: str, value: str
) -> None:
    app = run_app(page, **{key: value})
    assert not app.exception, [e.message for e in app.exception]
    assert any(f"{key}={value!r}" in warning.value for warning in app.warning)
    assert str(app.session_state[key]) != value


@pytest.mark.parametrize(
    ("params", "expected"),
    [({"model": "__default__"}, None), ({"split": "corpus frequency"}, "angles"), ({"map": "umap"}, "map")],
)
def test_valid_url_values_are_taken_without_a_warning(
    trained: Path, params: dict[str, str], expected: str | None
) -> None:
    params = {key: str(trained) if value == "__default__" else value for key, value in params.items()}
    app = run_app(expected, **params)
    assert_clean(app)
    assert not app.warning
    assert all(app.session_state[key] == value for key, value in params.items())


@pytest.mark.parametrize(
    ("params", "check"),
    [
        ({"sentence": "The king of ___ lived in a palace."}, "three"),
        ({"s": "The queen of ___ lived in London."}, "three"),
        ({"sentence": "I 😀 love the ___ 🍞! 東京は Москва"}, "three"),
        ({"sentence": "no blank at all"}, "no blank"),
        ({"sentence": "two ___ blanks ___"}, "2 blanks"),
        ({"sentence": "the king of paris " * 2500 + "the ___ of england"}, "long input"),
    ],
    ids=["sentence", "s", "emoji", "no-blank", "two-blanks", "10000-words"],
)
def test_sentences_from_the_url(trained: Path, params: dict[str, str], check: str) -> None:
    app = run_app("predictions", **params)
    assert not app.exception
    assert app.session_state["sentence"] == next(iter(params.values()))
    if check == "three":
        assert_clean(app)
        assert len(app.dataframe) == 3
    elif check == "long input":
        assert_clean(app)
        assert any("long input" in info.value for info in app.info)
    else:
        assert any(check in error.value for error in app.error)


def test_two_sessions_training_the_same_autoencoder_train_it_once(
    app_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two browser sessions share the server's caches: clicking "train" in both at once trains once."""
    from pages import data

    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "shared"))
    data.variant_store.clear()
    fits: list[int] = []
    fit = AECompressor.fit

    def counting_fit(self: AECompressor, *args: object, **kwargs: object) -> object:
        fits.append(self.rank)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(AECompressor, "fit", counting_fit)
    backbone = data.load_backbone(str(app_env))
    spec = data.VariantSpec(backbone.name, "ae-paper", 5, "fast")
    results: dict[int, object] = {}
    sessions = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, data.get_variant(backbone, spec, train=True))
        )
        for i in range(2)
    ]
    for session in sessions:
        session.start()
    for session in sessions:
        session.join()
    assert fits == [5]
    assert sorted(result.cached for result in results.values()) == [False, True]
    assert len(list((tmp_path / "shared" / "artifacts").rglob("manifest.json"))) == 1


def test_an_unusable_cache_shows_one_warning_and_the_app_still_works(
    app_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "a-file" / "cache"))  # ENOTDIR, even for root
    st.cache_resource.clear()
    app = run_app(rank="6")
    assert_clean(app)
    assert set(app.dataframe[0].value["variant"]) == {"SVD", "AE"}
    for page in ("neighbours", "map"):
        app.switch_page(f"pages/{page}.py").run()
        assert_clean(app)
        [warning] = [w.value for w in app.warning]
        assert "disk cache is not usable" in warning and "Not a directory" in warning
    st.cache_resource.clear()


def test_a_neighbour_search_that_does_not_fit_is_an_error_not_a_crash(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pages import data

    data.load_backbone(str(trained))  # the model itself fits
    artifacts = embviz_home() / "artifacts"
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "home"))  # no neighbour table on disk either
    shutil.copytree(artifacts, tmp_path / "home" / "artifacts")
    monkeypatch.setattr(resources, "available_memory", lambda: 600_000)
    data.original_neighbour_table.clear()
    data.job_board.clear()
    app = run_app("neighbours")
    assert not app.exception
    assert any("needs about" in error.value and "available" in error.value for error in app.error)
    data.original_neighbour_table.clear()


def test_minilm_offers_a_button_that_builds_minilm_mlm_and_switches_to_it(
    tiny_masked_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``minilm-mlm`` is offered once built; under ``minilm`` the sidebar builds it (the fit is stood in for by
    writing the tiny masked model as the fitted folder) with its expected duration, then selects it."""
    import dataclasses

    from embviz import mlm_head, sources

    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mlm_head, "PACKAGED_HEADS", tmp_path / "no-shipped-heads")  # an install without data
    tiny = dataclasses.replace(sources.builtin("minilm"), locate=lambda: tiny_masked_path)
    monkeypatch.setitem(sources._BUILTINS, "minilm", tiny)
    st.cache_resource.clear()
    calls: list[str] = []

    def fake_fit(source: str, *, progress: object, **_: object) -> mlm_head.HeadResult:
        calls.append(source)
        progress(Progress(1, 2, "step 1/2"))  # type: ignore[operator]
        backbone = Backbone.from_pretrained(str(tiny_masked_path))
        folder = mlm_head.output_folder(source)
        manifest = {"format_version": mlm_head.FORMAT_VERSION, "accuracy": {"bible:test": {"top1": 0.5}}}
        mlm_head._write_folder(folder, backbone.model, backbone.tokenizer, manifest)
        return mlm_head.HeadResult(folder, mlm_head.read_manifest(folder))

    monkeypatch.setattr(mlm_head, "fit_mlm_head", fake_fit)
    app = run_app(model="minilm", rank="4")
    assert not app.exception, [e.message for e in app.exception]
    assert "minilm-mlm" not in app.selectbox(key="model").options
    [button] = [b for b in app.button if b.label.startswith("Build minilm-mlm")]
    assert f"about {mlm_head.EXPECTED_MINUTES} min" in button.label
    button.click().run()
    assert_clean(app)
    assert calls == ["minilm"]
    assert "minilm-mlm" in app.selectbox(key="model").options
    assert app.session_state["model"] == "minilm-mlm"
    assert not [b for b in app.button if b.label.startswith("Build minilm-mlm")]
    warnings = [warning.value for warning in app.warning]
    assert any("fitted by embviz" in warning for warning in warnings)
    assert not any("Ignored" in warning for warning in warnings), warnings


def test_a_plotly_selection_becomes_token_ids() -> None:
    """A histogram's bars give the tokens in their bin on that trace; scatter points give their id
    (customdata)."""
    import numpy as np

    from pages.widgets import selected_token_ids

    bins = {1: np.array([0, 2, 1, 2, -1]), 0: np.array([2, 2, 2, 2, 2])}  # each token's bar per trace
    histogram = {"selection": {"points": [{"curve_number": 1, "point_index": 2, "x": 0.2}]}}
    assert selected_token_ids(histogram, bins).tolist() == [1, 3]
    two_bars = {"selection": {"points": [{"curve_number": 1, "point_index": i} for i in (0, 1)]}}
    assert selected_token_ids(two_bars, bins).tolist() == [0, 2]
    scatter = {"selection": {"points": [{"curve_number": 0, "customdata": 7}, {"customdata": [3]}]}}
    assert selected_token_ids(scatter, {}).tolist() == [3, 7]
    assert selected_token_ids(None, {}).size == 0
    assert selected_token_ids({"selection": {"points": []}}, {}).size == 0


def test_umap_runs_in_the_background_while_pca_is_shown(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold UMAP does not block the page: PCA is drawn with UMAP's progress, then UMAP once it is done;
    the map is fitted in a child process (its numba loops would hold the server's GIL)."""
    from embviz import projections

    release = threading.Event()
    map_in_child = projections.map_in_child
    children: list[str] = []

    def slow_umap(method: str, *args: object, **kwargs: object) -> object:
        release.wait(timeout=60)
        children.append(method)
        return map_in_child(method, *args, **kwargs)  # type: ignore[arg-type]

    from pages.data import job_board

    # Cold for real, in a cache of its own: an earlier test may have left the same UMAP on disk, or a board
    # it cleared may still be writing it there.
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "fresh"))
    st.cache_resource.clear()
    monkeypatch.setattr(projections, "map_in_child", slow_umap)
    app = run_app("map", map="umap", tok="king")
    assert_clean(app)
    assert any(caption.value.startswith("PCA map") for caption in app.caption)
    assert any("UMAP is running in the background" in bar.proto.text for bar in app.get("progress"))
    release.set()
    for job in job_board().jobs.values():
        assert job.thread is not None
        job.thread.join(timeout=120)
    app.run()
    assert_clean(app)
    assert any(caption.value.startswith("UMAP map") for caption in app.caption)
    assert children == ["umap"]


def test_variant_neighbour_tables_compute_in_the_background_while_the_focus_token_shows(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The focus token's neighbours show at once (one product per variant), and recall estimated on a random
    sample with its error; the exact recall over the vocabulary follows when the background searches finish."""
    from pages import data

    release = threading.Event()
    search = data.neighbour_table_cached

    def slow_search(*args: object, **kwargs: object) -> object:
        if isinstance(args[2], CompressedEmbedding):  # a variant's table, not the original's
            release.wait(timeout=60)
        return search(*args, **kwargs)

    data.job_board.clear()
    monkeypatch.setattr(data, "neighbour_table_cached", slow_search)
    app = run_app("neighbours", tok="king", k="7")
    assert_clean(app)
    assert any("king" in header.value for header in app.subheader)
    assert any("computing in the background" in info.value for info in app.info)
    labels = [m.label for m in app.metric]
    assert labels == ["svd mean recall@7 (estimate)", "ae-paper mean recall@7 (estimate)"]
    assert all(" ± " in m.value for m in app.metric)
    assert any("Estimated from a random sample" in w.value for w in app.warning)
    release.set()
    for job in data.job_board().jobs.values():
        assert job.thread is not None
        job.thread.join(timeout=120)
    app.run()
    assert_clean(app)
    assert [m.label for m in app.metric] == ["svd mean recall@7", "ae-paper mean recall@7"]
    assert not any("Estimated from a random sample" in w.value for w in app.warning)


def test_why_direction_plays_the_toy_and_computes_the_2x2_on_demand(trained: Path) -> None:
    st.cache_resource.clear()  # the page keeps computed 2 x 2s for the server process
    app = run_app("why_direction")
    assert_clean(app)
    assert {"SVD mean angle", "AE mean angle"} <= {metric.label for metric in app.metric}
    assert any("What the toy shows" in md.value for md in app.markdown)
    app.radio(key="toy_dim").set_value("3-D").run()
    app.slider(key="toy_rank").set_value(3).run()
    assert_clean(app)
    assert any("exactly" in md.value for md in app.markdown)  # full rank: nothing lost
    app.radio(key="toy_dim").set_value("2-D").run()  # rank 3 no longer fits: the slider follows
    assert_clean(app)
    assert app.slider(key="toy_rank").value == 2
    app.select_slider(key="toy_weight").set_value(0.0).run()
    app.checkbox(key="toy_bias").check().run()
    assert_clean(app)

    [button] = [b for b in app.button if b.label == "Compute the 2 x 2"]
    button.click().run()
    assert_clean(app)
    table = app.dataframe[-1].value
    assert list(table["cell"]) == [
        "original",
        "original directions + SVD lengths",
        "SVD directions + original lengths",
        "SVD",
        "original directions + AE lengths",
        "AE directions + original lengths",
        "AE",
    ]
    assert (table["perplexity"] > 0).all() and table["x original"].iloc[0] == 1.0
    assert (table["top 3 for the blank"].str.len() > 0).all()
    assert any("give it back the original directions" in md.value for md in app.markdown)
    # a sentence without a blank: one clear message, the 2 x 2 stays
    app.text_input(key="why_sentence").input("no blank in this sentence").run()
    assert not app.exception
    assert any("blank" in error.value for error in app.error)
    assert len(app.dataframe[-1].value) == 7


def test_neighbours_say_when_an_approximate_index_found_them(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where an exact search is unaffordable the tables come from an index, and the page says so with the
    recall against exact search measured on a sample."""
    from embviz import metrics
    from pages import data

    monkeypatch.setattr(metrics, "EXACT_SEARCH_FLOPS", 1.0)
    data.job_board.clear()
    st.cache_resource.clear()
    app = run_app("neighbours", tok="king", k="5")
    for job in data.job_board().jobs.values():
        assert job.thread is not None
        job.thread.join(timeout=120)
    app.run()
    assert_clean(app)
    warnings = [w.value for w in app.warning if "approximate neighbours (faiss PCA" in w.value]
    assert len(warnings) == 3  # the original and both variants
    assert all("recall@5 against exact search" in w for w in warnings)
    data.job_board.clear()
    st.cache_resource.clear()


@pytest.mark.parametrize("slots", [1, 2])
def test_the_job_board_runs_as_many_jobs_at_once_as_it_has_slots(slots: int) -> None:
    from pages.data import JobBoard

    board = JobBoard(slots=slots)
    inside, most, lock, release = 0, 0, threading.Lock(), threading.Event()

    def work(report: object) -> int:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        release.wait(timeout=0.3)  # long enough for the others to start if a slot is free
        with lock:
            inside -= 1
        return 1

    jobs = [board.start(("job", i), work) for i in range(3)]
    for job in jobs:
        assert job.thread is not None
        job.thread.join(timeout=30)
    assert all(job.done and job.result == 1 for job in jobs)
    assert most == slots


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux's")
def test_a_job_started_nicer_runs_at_a_lower_priority_than_the_page() -> None:
    from pages.data import JobBoard

    board = JobBoard(slots=1)
    before = os.nice(0)
    job = board.start(("nice",), lambda report: os.nice(0), niceness=4)
    assert job.thread is not None
    job.thread.join(timeout=30)
    assert job.result == min(19, before + 4)
    assert os.nice(0) == before  # the page's own thread keeps its priority


def test_one_original_table_serves_the_neighbours_page_and_the_umap(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embviz import projections
    from pages.data import job_board, original_neighbour_table

    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "fresh"))
    st.cache_resource.clear()
    table = original_neighbour_table(str(trained), 5)
    assert table.indices.shape[1] == 5
    [saved] = (tmp_path / "fresh" / "neighbours").glob("*.npz")
    assert f"-k{projections.shared_table_width(5)}-" in saved.name
    searched: list[int] = []
    monkeypatch.setattr(projections, "nearest_neighbours", lambda *a, **kw: searched.append(1))
    run_app("map", map="umap")  # the UMAP's neighbour graph comes from that table, not a new search
    for job in job_board().jobs.values():
        assert job.thread is not None
        job.thread.join(timeout=120)
    assert not searched
    assert len(list((tmp_path / "fresh" / "maps").glob("*-umap-*.npz"))) == 1
