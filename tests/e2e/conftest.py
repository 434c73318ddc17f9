"""End-to-end fixtures: `streamlit run app.py` on a tiny model, driven by Playwright in Debian's Chromium.

Chromium comes from Debian (`/usr/bin/chromium`, installed by `scripts/setup.sh --browser`); a test tool's
own browser download does not work offline. SwiftShader flags let Plotly's WebGL canvases render headless.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from embviz.artifacts import compress_cached
from embviz.backbones import Backbone
from embviz.compressors import make_compressor
from embviz.testing import build_tiny_model

CHROMIUM = os.environ.get("EMBVIZ_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
RANK = 8  # the tiny model's hidden size is 32


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def browser_type_launch_args() -> dict:
    """Override pytest-playwright's launch options: Debian's Chromium, headless, WebGL via SwiftShader."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `scripts/setup.sh --browser` (make test does)")
    return {
        "executable_path": CHROMIUM,
        "headless": True,
        "args": [
            "--no-sandbox",
            "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    }


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
    """`streamlit run app.py` on a free port until the block ends; yields its URL once healthy."""
    port = _free_port()
    env = {**os.environ, "EMBVIZ_BACKBONE": str(model), "EMBVIZ_HOME": str(home)}
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                "app.py",
                "--server.port",
                str(port),
                "--server.headless",
                "true",
                "--browser.gatherUsageStats",
                "false",
            ],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        url = f"http://localhost:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"streamlit did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


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
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout_ms)
