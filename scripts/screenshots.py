"""Screenshot every page of the running app into assets/ (for the README).

Usage: start `streamlit run app.py` (default backbone), then
    .venv/bin/python scripts/screenshots.py --url http://localhost:8501 [--query "rank=64&tok=king"]
Uses Debian's Chromium through Playwright, as the end-to-end tests do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's pages/
from pages.navigation import PAGES as PAGE_SPECS

PAGES = {page.name: (page.url_path, page.heading) for page in PAGE_SPECS}
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8501")
    parser.add_argument("--query", default="rank=64&tok=king")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets")
    parser.add_argument("--pages", default=",".join(PAGES))
    parser.add_argument("--height", type=int, default=2000, help="viewport height (a long page needs more)")
    parser.add_argument(
        "--click", action="append", default=[], help="PAGE=BUTTON LABEL to click before the shot"
    )
    args = parser.parse_args()
    clicks = dict(item.split("=", 1) for item in args.click)
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"],
        )
        page = browser.new_page(viewport={"width": 1500, "height": args.height})
        for name in args.pages.split(","):
            path, heading = PAGES[name]
            page.goto(f"{args.url}/{path}?{args.query}")
            expect(page.get_by_role("heading", name=heading)).to_be_visible(timeout=600_000)
            page.wait_for_selector(IDLE, timeout=600_000)
            if name in clicks:
                page.get_by_role("button", name=clicks[name]).click()
                page.wait_for_timeout(1000)
                page.wait_for_selector(IDLE, timeout=1_800_000)
            page.wait_for_timeout(2500)  # let Plotly finish drawing
            page.screenshot(path=str(args.out / f"{name}.png"), full_page=True)
            print(f"saved {args.out / f'{name}.png'}")
        browser.close()


if __name__ == "__main__":
    main()
