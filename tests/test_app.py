"""Every page of the app under streamlit's AppTest, on a tiny causal model (seconds, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
from streamlit.runtime.pages_manager import PagesManager
from streamlit.testing.v1 import AppTest

from embviz.artifacts import compress_cached
from embviz.backbones import Backbone
from embviz.compressors import make_compressor

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("compress", "neighbours", "angles", "map", "predictions", "perplexity")
RANK = 8


@pytest.fixture(autouse=True)
def server_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every run through app.py's st.navigation, as a real server does.

    AppTest resets Streamlit's legacy ``pages/`` flag before every run, so each run would first go through
    :func:`pages.common.use_app_router`'s one-off rerun (and lose a button click); a server clears the
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


def run_app(page: str | None = None, **params: str) -> AppTest:
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


def test_train_button_trains_and_caches_the_autoencoder(
    app_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "fresh"))
    st.cache_resource.clear()
    app = run_app(rank="6")
    assert_clean(app)
    assert any("not trained yet" in info.value for info in app.info)
    [button] = [b for b in app.button if b.label == "Train the AutoEncoder now"]
    button.click().run()
    assert_clean(app)
    table = app.dataframe[0].value
    assert set(table["variant"]) == {"SVD", "AE"}
    assert (table["rank"] == 6).all()
    assert list((tmp_path / "fresh" / "artifacts").rglob("manifest.json"))


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_errors(trained: Path, page: str) -> None:
    app = run_app(page)
    assert_clean(app)
    assert app.title, "each page has a title"
    assert app.expander, "each page explains itself"


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
