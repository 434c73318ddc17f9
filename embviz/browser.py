"""The app in a real browser: serve ``streamlit run app.py`` and tell when a page is finished.

Shared by the browser tests (``tests/e2e``) and ``embviz bench --stages app``, so both measure "finished"
the same way: the page's heading is drawn, Streamlit's script state is idle (``notRunning``), no spinner,
skeleton or running-status widget is left, and every Plotly figure has drawn its SVG layer.

Chromium comes from Debian (``/usr/bin/chromium``, or ``$EMBVIZ_CHROMIUM``); SwiftShader flags let
Plotly's WebGL canvases render headless. Playwright is a test / benchmark dependency, imported lazily by
the caller; this module only types against it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embviz.cache import HOME_ENV

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM_ENV = "EMBVIZ_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
BACKBONE_ENV = "EMBVIZ_BACKBONE"
TRAIN_BUTTON = re.compile(r"^Fit now \(about ")
"""The button a page shows while a compared variant that takes long to fit is not fitted yet
(``pages/widgets.py``; quicker ones are fitted without asking)."""

IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"

RUN_COUNTER_JS = """
(() => {
  if (window.__embvizRuns !== undefined) return;
  window.__embvizRuns = 0;
  const attribute = 'data-test-script-state';
  new MutationObserver((records) => {
    // One callback can hold a whole run (running, then notRunning): a record's new value is the next
    // record's old value for the same element, the element's current value only for its last record.
    records.forEach((record, index) => {
      const later = records.slice(index + 1).find((next) => next.target === record.target);
      const value = later ? later.oldValue : record.target.getAttribute(attribute);
      if (value === 'running' && record.oldValue !== 'running') window.__embvizRuns += 1;
    });
  }).observe(document, {subtree: true, attributes: true, attributeOldValue: true, attributeFilter: [attribute]});
})();
"""
"""Init script: ``window.__embvizRuns`` counts the script runs this document has seen start. A run so short
that the page never drew it as running is not counted: waits that must not depend on seeing it (a sidebar
click to another page) wait for the new page's heading instead."""

PAGE_STATE_JS = """
() => {
  const app = document.querySelector("[data-testid='stApp']");
  const busy = (selector) => document.querySelectorAll(selector).length;
  return {
    url: location.href,
    script_state: app ? app.getAttribute('data-test-script-state') : null,
    script_runs: window.__embvizRuns || 0,
    headings: [...document.querySelectorAll('h1')].map((h) => h.textContent),
    spinners: busy("[data-testid='stSpinner']"),
    skeletons: busy("[data-testid='stSkeleton'], [data-testid='stAppSkeleton']"),
    running_icons: busy("[data-testid='stStatusWidgetRunningIcon'], [data-testid='stStatusWidgetRunningManIcon']"),
    background_jobs: busy('.st-key-background-jobs'),
    figures: busy('.js-plotly-plot'),
    figures_undrawn: [...document.querySelectorAll('.js-plotly-plot')].filter((p) => !p.querySelector('.main-svg')).length,
    exceptions: busy("[data-testid='stException']"),
  };
}
"""
"""What a page shows of its progress, as one object: :data:`FINISHED_JS` is decided from it, and a failed
wait reports it (why the page was not finished)."""


FINISHED_JS = (
    """
([heading, afterRuns]) => {
  const s = ("""
    + PAGE_STATE_JS
    + """)();
  return s.script_state === 'notRunning'
    && (afterRuns === null || s.script_runs > afterRuns)
    && (heading === null || s.headings.some((h) => h.includes(heading)))
    && !s.spinners && !s.skeletons && !s.running_icons && !s.background_jobs && !s.figures_undrawn;
}
"""
)
"""Predicate for ``page.wait_for_function``: ``[heading or null, script runs to wait past or null]``. A page
whose background jobs still run (the app's ``background-jobs`` panel, ``pages/widgets.py``) is not finished."""

FIRST_FIGURE_JS = """
() => {
  const drawn = [...document.querySelectorAll('.js-plotly-plot')].some((p) => p.querySelector('.main-svg'));
  if (!drawn) return false;
  const app = document.querySelector("[data-testid='stApp']");
  const background = document.querySelector('.st-key-background-jobs') !== null;
  return {running: background || !app || app.getAttribute('data-test-script-state') !== 'notRunning'};
}
"""
"""Predicate: the first drawn Plotly figure, and whether the script or a background job was still running
when it appeared."""


RECALL_ANSWER_JS = """
(afterRuns) => {
  if (afterRuns !== null && (window.__embvizRuns || 0) <= afterRuns) return false;
  const labels = [...document.querySelectorAll("[data-testid='stMetricLabel']")].map((l) => l.textContent);
  if (labels.some((text) => text.includes('(estimate)'))) return 'estimate';
  const app = document.querySelector("[data-testid='stApp']");
  const idle = app && app.getAttribute('data-test-script-state') === 'notRunning';
  if (idle && !document.querySelector('.st-key-background-jobs')
      && labels.some((text) => text.includes('mean recall@'))) return 'exact';
  return false;
}
"""
"""Predicate: the Neighbours page's first recall answer, ``'estimate'`` (a sampled recall shown while the
exact tables run) or ``'exact'``, after ``afterRuns`` script runs (null: any)."""


BACKGROUND_PROGRESS_JS = """
(afterRuns) => {
  if ((window.__embvizRuns || 0) <= afterRuns) return false;
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  if (!plots.length || !plots.every((plot) => plot.querySelector('.main-svg'))) return false;
  const panel = document.querySelector('.st-key-background-jobs');
  if (panel) return panel.querySelector("[data-testid='stProgress']") ? 'progress' : false;
  const app = document.querySelector("[data-testid='stApp']");
  return app && app.getAttribute('data-test-script-state') === 'notRunning' ? 'finished' : false;
}
"""
"""Predicate: after ``afterRuns`` script runs, every Plotly figure drawn and either a background job's
progress bar shown (the app's ``background-jobs`` panel): ``'progress'``, or the page finished without
one (the job was done at once): ``'finished'``."""


class AppServerError(RuntimeError):
    """``streamlit run app.py`` did not become healthy (its log tail is in the message)."""


def app_root() -> Path:
    """The source checkout that holds ``app.py`` and ``pages/`` (the app is not part of the package)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "app.py").is_file():
        raise AppServerError(
            f"no app.py beside the embviz package in {root}: the app needs a source checkout"
        )
    return root


def chromium_path() -> str:
    """Debian's Chromium (``$EMBVIZ_CHROMIUM`` overrides)."""
    return os.environ.get(CHROMIUM_ENV, DEFAULT_CHROMIUM)


def launch_options() -> dict[str, Any]:
    """Playwright ``chromium.launch`` options: Debian's Chromium, headless, WebGL through SwiftShader."""
    return {
        "executable_path": chromium_path(),
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


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_app(
    model: str | Path,
    home: str | Path,
    log: Path,
    *,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 90.0,
) -> Iterator[str]:
    """``streamlit run app.py`` on a free port (backbone ``model``, cache ``home``) until the block ends.

    Yields the app's URL once ``/_stcore/health`` answers; the server's output goes to ``log``.

    Raises:
        AppServerError: the server exited or was not healthy within ``timeout_s``.
    """
    port = free_port()
    environment = {**os.environ, **(env or {}), BACKBONE_ENV: str(model), HOME_ENV: str(home)}
    command = [
        python, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            command, cwd=app_root(), env=environment, stdout=log_file, stderr=subprocess.STDOUT
        )
        url = f"http://localhost:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AppServerError(f"streamlit did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.25)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@dataclass(frozen=True)
class AppPage:
    """One page of the app as the browser reaches it (from ``pages/navigation.py``'s ``PAGES``)."""

    name: str
    url_path: str
    title: str
    heading: str


PAGES_CHILD = (
    "import json\n"
    "from pages.navigation import PAGES\n"
    "print(json.dumps([{'name': p.name, 'url_path': p.url_path, 'title': p.title, 'heading': p.heading}\n"
    "                  for p in PAGES]))\n"
)


def app_pages(python: str = sys.executable) -> list[AppPage]:
    """The app's pages, read from ``pages/navigation.py`` in a child process (the core never imports it)."""
    done = subprocess.run(
        [python, "-c", PAGES_CHILD], cwd=app_root(), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise AppServerError(f"could not list the app's pages: {done.stderr.strip()[-500:]}")
    return [AppPage(**entry) for entry in json.loads(done.stdout.strip().splitlines()[-1])]


def page_url(base: str, path: str = "", **query: Any) -> str:
    """``base/path?key=value...`` (values URL-encoded; None values left out)."""
    params = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    return f"{base}/{path}" + (f"?{params}" if params else "")


def install_run_counter(page: Page) -> None:
    """Count script runs in every document ``page`` loads from now on (see :func:`script_runs`)."""
    page.add_init_script(RUN_COUNTER_JS)


def script_runs(page: Page) -> int:
    """How many script runs the current document has seen start (0 without :func:`install_run_counter`)."""
    return int(page.evaluate("window.__embvizRuns || 0"))


def wait_for_idle(page: Page, timeout_ms: float = 120_000) -> None:
    """Wait until Streamlit has finished running the script for the current page."""
    page.wait_for_selector(IDLE, timeout=timeout_ms)


def page_state(page: Page) -> dict[str, Any]:
    """:data:`PAGE_STATE_JS` on ``page`` (script state, spinners, undrawn figures, background jobs...)."""
    return dict(page.evaluate(PAGE_STATE_JS))


def wait_until_finished(
    page: Page, heading: str | None = None, *, after_runs: int | None = None, timeout_ms: float = 120_000
) -> None:
    """Wait until the page is finished: ``heading`` drawn, script idle, no spinner, every figure drawn.

    ``after_runs`` (a :func:`script_runs` count taken before an action): also wait until a later script run
    has started, so a page that was finished before the action is not taken for the answer.
    """
    page.wait_for_function(FINISHED_JS, arg=[heading, after_runs], timeout=timeout_ms)


def wait_for_first_figure(page: Page, timeout_ms: float = 120_000) -> bool:
    """Wait for the first drawn Plotly figure; True when the script was still running as it appeared."""
    handle = page.wait_for_function(FIRST_FIGURE_JS, timeout=timeout_ms)
    return bool(handle.json_value()["running"])


def wait_for_background_progress(page: Page, after_runs: int, timeout_ms: float = 120_000) -> str:
    """Wait until a script run later than ``after_runs`` shows its figures beside a background job's
    progress (``'progress'``, e.g. the Map page's PCA while UMAP runs) or finished with none running
    (``'finished'``)."""
    handle = page.wait_for_function(BACKGROUND_PROGRESS_JS, arg=after_runs, timeout=timeout_ms)
    return str(handle.json_value())


def wait_for_recall_answer(page: Page, after_runs: int | None = None, timeout_ms: float = 120_000) -> str:
    """Wait for the Neighbours page's first recall figures; ``'estimate'`` or ``'exact'``."""
    handle = page.wait_for_function(RECALL_ANSWER_JS, arg=after_runs, timeout=timeout_ms)
    return str(handle.json_value())


def train_button_visible(page: Page) -> bool:
    """Whether the page offers to train the AE (the chosen rank is not trained yet)."""
    button = page.get_by_role("button", name=TRAIN_BUTTON)
    return button.count() > 0 and button.first.is_visible()
