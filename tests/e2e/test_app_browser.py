"""The real app in a real browser: `streamlit run app.py` on a tiny model, Debian's Chromium, Playwright."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from playwright.sync_api import expect

from embviz.browser import RUN_COUNTER_JS, page_state, script_runs
from pages.navigation import PAGES as PAGE_SPECS
from tests.e2e.conftest import RANK, wait_for_idle, wait_until_finished

pytestmark = pytest.mark.e2e

PAGES = {page.url_path: page.heading for page in PAGE_SPECS}
"""URL path -> the heading each page draws (``pages/navigation.py`` lists them)."""


def open_page(page, app_url: str, path: str = "", query: str = "") -> None:
    """Open a page by URL and wait until it is finished (heading, idle script, figures drawn)."""
    page.goto(f"{app_url}/{path}?rank={RANK}{'&' + query if query else ''}")
    expect(page.get_by_role("heading", name=PAGES[path])).to_be_visible(timeout=120_000)
    wait_until_finished(page, PAGES[path])


def assert_no_exception(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0, page.locator(
        "[data-testid='stException']"
    ).first.inner_text()


@pytest.mark.parametrize("path", list(PAGES))
def test_every_page_loads(page, app_url: str, path: str) -> None:
    open_page(page, app_url, path)
    assert_no_exception(page)


def test_focus_token_typed_on_one_page_shows_on_the_others(page, app_url: str) -> None:
    open_page(page, app_url, "neighbours")
    box = page.locator("input[aria-label='Focus token']")
    box.fill("went")
    box.press("Enter")
    expect(page.get_by_text("Neighbours of '␣went'")).to_be_visible(timeout=60_000)
    assert "tok=went" in page.url
    page.get_by_role("link", name="Map").first.click()
    expect(page.get_by_role("heading", name="Map of the vocabulary")).to_be_visible(timeout=60_000)
    wait_for_idle(page)
    expect(page.locator("input[aria-label='Focus token']")).to_have_value("went")
    assert "tok=went" in page.url
    assert_no_exception(page)


def test_map_draws_a_webgl_canvas_that_is_not_blank(page, app_url: str) -> None:
    open_page(page, app_url, "map", "tok=king")
    canvas = page.locator(".js-plotly-plot canvas").first
    canvas.wait_for(state="visible", timeout=60_000)
    page.wait_for_timeout(1500)  # let WebGL finish drawing
    image = Image.open(io.BytesIO(page.locator(".js-plotly-plot").first.screenshot())).convert("L")
    low, high = image.getextrema()
    assert high - low > 50, "the map is blank"
    colours = sum(1 for count in image.histogram() if count)
    assert colours > 20, f"only {colours} grey levels: nothing drawn"


def test_the_page_state_describes_a_finished_page(page, app_url: str) -> None:
    open_page(page, app_url, "map")
    state = page_state(page)  # what a failed benchmark run reports
    assert state["script_state"] == "notRunning" and PAGES["map"] in " ".join(state["headings"])
    assert state["figures"] >= 1 and state["figures_undrawn"] == 0
    assert state["spinners"] == state["background_jobs"] == state["exceptions"] == 0
    assert "/map" in state["url"]


def test_the_run_counter_counts_a_run_that_started_and_ended_between_two_observations(page) -> None:
    # A fast run: Streamlit marks the app running and idle again before the observer is called once.
    page.set_content("<div data-testid='stApp' data-test-script-state='notRunning'></div>")
    page.add_script_tag(content=RUN_COUNTER_JS)
    set_state = "(state) => document.querySelector(\"[data-testid='stApp']\").setAttribute('data-test-script-state', state)"
    page.evaluate(f"() => {{ const set = {set_state}; set('running'); set('notRunning'); }}")
    assert script_runs(page) == 1
    page.evaluate(set_state, "running")
    assert script_runs(page) == 2
    page.evaluate(set_state, "notRunning")
    assert script_runs(page) == 2


def test_predictions_appear_for_all_three_variants(page, app_url: str) -> None:
    open_page(page, app_url, "predictions")
    # the three tables are drawn after the predictions are computed: wait for them, don't sample once
    expect(page.locator("[data-testid='stDataFrame']").nth(2)).to_be_visible(timeout=120_000)
    assert_no_exception(page)
    for name in ("original", "svd", "ae-paper"):
        expect(page.get_by_text(name, exact=True).first).to_be_visible()


def test_a_shared_link_to_a_page_keeps_its_settings_on_a_fresh_server(page, fresh_app_url: str) -> None:
    # Streamlit runs a `pages/` file bare until some session has used st.navigation; the app reroutes it.
    open_page(page, fresh_app_url, "neighbours", "tok=went&k=5")
    assert_no_exception(page)
    expect(page.get_by_text("Neighbours of '␣went'")).to_be_visible(timeout=60_000)
    expect(page.locator("input[aria-label='Focus token']")).to_have_value("went")
    assert "k=5" in page.url


def _drag_box(page, plot, fraction: tuple[float, float, float, float] = (0.05, 0.05, 0.95, 0.95)) -> None:
    """Drag a selection box over a Plotly chart's plotting area (fractions of its drag layer)."""
    plot.scroll_into_view_if_needed()
    area = plot.locator(".nsewdrag").first
    box = area.bounding_box()
    assert box is not None, "the chart has no plotting area"
    x0, y0 = box["x"] + fraction[0] * box["width"], box["y"] + fraction[1] * box["height"]
    x1, y1 = box["x"] + fraction[2] * box["width"], box["y"] + fraction[3] * box["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()


def test_brushing_the_recall_histogram_fills_the_token_table(page, app_url: str) -> None:
    open_page(page, app_url, "neighbours")
    plot = page.locator(".st-key-recall_histogram .js-plotly-plot").first
    plot.wait_for(state="visible", timeout=60_000)
    _drag_box(page, plot, (0.02, 0.02, 0.98, 0.99))
    expect(page.get_by_text("selected tokens", exact=False).first).to_be_visible(timeout=60_000)
    wait_for_idle(page)
    assert_no_exception(page)


def test_brushing_the_map_lists_tokens_and_a_row_focuses_one(page, app_url: str) -> None:
    open_page(page, app_url, "map")
    plot = page.locator(".st-key-map_chart .js-plotly-plot").first
    plot.wait_for(state="visible", timeout=60_000)
    page.wait_for_timeout(1000)
    _drag_box(page, plot, (0.01, 0.05, 0.3, 0.95))  # the original's panel
    expect(page.get_by_text("selected tokens", exact=False).first).to_be_visible(timeout=60_000)
    wait_for_idle(page)
    assert_no_exception(page)


def test_a_shared_link_with_chosen_variants_reproduces_them(page, app_url: str) -> None:
    open_page(page, app_url, "angles", "cmp=svd&cmp=quant-int4&cmp=svd%404")
    for name in ("svd", "quant-int4", "svd@4"):
        expect(page.get_by_text(f"{name} median angle").first).to_be_visible(timeout=60_000)
    assert_no_exception(page)


def test_why_direction_draws_the_toy_and_the_2x2_with_predictions(page, app_url: str) -> None:
    open_page(page, app_url, "why_direction")
    assert_no_exception(page)
    expect(page.get_by_text("SVD mean angle")).to_be_visible(timeout=60_000)
    plots = page.locator(".js-plotly-plot")
    expect(plots).to_have_count(2, timeout=60_000)  # the toy's arrows and its angle-by-length chart
    expect(plots.first.locator("text", has_text="SVD: mean angle")).to_have_count(1)
    page.get_by_text("3-D", exact=True).click()  # the toy redraws in 3-D
    wait_for_idle(page)
    expect(plots.first.locator(".gl-container")).to_have_count(1, timeout=60_000)
    assert_no_exception(page)

    page.get_by_role("button", name="Compute the 2 x 2").click()
    expect(page.get_by_text("In plain words")).to_be_visible(timeout=120_000)
    wait_for_idle(page)
    assert_no_exception(page)
    expect(plots).to_have_count(3)
    grid = plots.nth(2)
    for label in ("original directions", "SVD directions", "AE lengths"):
        expect(grid.locator("text", has_text=label).first).to_be_visible()
    expect(page.get_by_text("give it back the original directions").first).to_be_visible()


def test_the_map_downloads_are_written_when_clicked(page, app_url: str) -> None:
    # The files are built on the click (a callable each), not on every run of the page.
    open_page(page, app_url, "map")
    for label, start in (("CSV", "token,id,original_x"), ("JSON", "["), ("Figure (HTML)", "<!doctype html>")):
        with page.expect_download(timeout=60_000) as started:
            page.get_by_role("button", name=label, exact=True).click()
        path = started.value.path()
        text = path.read_text(encoding="utf-8")
        assert text.lstrip().lower().startswith(start), (label, text[:80])
        assert "king" in text, label
        wait_for_idle(page)
    assert_no_exception(page)
