"""End-to-end fixtures: `streamlit run app.py` on a tiny model, driven by Playwright in Debian's Chromium.

Chromium comes from Debian (`/usr/bin/chromium`, installed by `scripts/setup.sh --browser`); a test tool's
own browser download does not work offline. Serving the app, the launch flags and "the page is finished"
live in `embviz/browser.py`, shared with `embviz bench --stages app`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from embviz import browser
from embviz.artifacts import compress_cached
from embviz.backbones import Backbone
from embviz.browser import AppServerError, chromium_path, launch_options
from embviz.compressors import make_compressor
from embviz.testing import build_tiny_model

RANK = 8  # the tiny model's hidden size is 32


@pytest.fixture(scope="session")
def browser_type_launch_args() -> dict:
    """Override pytest-playwright's launch options: Debian's Chromium, headless, WebGL via SwiftShader."""
    if not Path(chromium_path()).exists():
        pytest.fail(f"{chromium_path()} is missing: run `scripts/setup.sh --browser` (make test does)")
    return launch_options()


@pytest.fixture(scope="session")
def e2e_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny causal model and a cache holding the AE the pages show (trained before any server starts)."""
    model = build_tiny_model("causal", tmp_path_factory.mktemp("e2e-model"))
    home = tmp_path_factory.mktemp("e2e-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBVIZ_HOME", str(home))
        backbone = Backbone.from_pretrained(str(model))
        compress_cached(backbone.name, backbone.embedding, make_compressor("ae-paper", RANK, recipe="fast"))
    return model, home


@contextlib.contextmanager
def serve_app(model: Path, home: Path, log: Path) -> Iterator[str]:
    """`streamlit run app.py` on a free port until the block ends (:func:`embviz.browser.serve_app`)."""
    try:
        with browser.serve_app(model, home, log) as url:
            yield url
    except AppServerError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def app_url(e2e_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A live app shared by the browser tests."""
    with serve_app(*e2e_model, tmp_path_factory.mktemp("e2e-log") / "streamlit.log") as url:
        yield url


@pytest.fixture
def fresh_app_url(e2e_model: tuple[Path, Path], tmp_path: Path) -> Iterator[str]:
    """A live app that no browser has opened yet (for shared links landing on a page directly)."""
    with serve_app(*e2e_model, tmp_path / "streamlit.log") as url:
        yield url


def wait_for_idle(page, timeout_ms: int = 120_000) -> None:
    """Wait until Streamlit has finished running the script for the current page."""
    browser.wait_for_idle(page, timeout_ms)


def wait_until_finished(page, heading: str | None = None, timeout_ms: int = 120_000) -> None:
    """Wait until the page is finished, as the benchmark measures it (:func:`embviz.browser.wait_until_finished`)."""
    browser.wait_until_finished(page, heading, timeout_ms=timeout_ms)
