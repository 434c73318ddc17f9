"""Draw the cost curves of ``embviz bench --stages scale --json`` reports into assets/scale.png, and print
the README's table (seconds and peak memory per stage and shape) and each stage's growth exponents.

Usage:
    .venv/bin/embviz bench --stages scale --json > scale.json
    .venv/bin/python scripts/scale_plot.py scale.json [later.json ...] [--out assets/scale.png]
Several reports are merged point by point (a later report's point replaces an earlier one at the same
stage and shape). The figure is :func:`embviz.figures.cost_curves`; Debian's Chromium (through Playwright,
as the browser tests) renders it, so no static-image package is needed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from embviz.browser import launch_options
from embviz.figures import cost_curves, provenance_line
from embviz.scaling import SCALE_STAGES, growth_exponents


def cell(point: dict | None) -> str:
    """``18.2 s / 1.8 GiB`` (measured), or why not."""
    if point is None:
        return "-"
    if point["status"] != "measured":
        return f"{point['status']}: {point.get('reason', '')}"
    text = f"{point['seconds']:.1f} s / {point['peak_rss_mb'] / 1024:.1f} GiB"
    if point.get("search") and point["search"] != "exact":
        text += f" (approximate, recall {point['search_recall']:.3f} ± {point['search_recall_margin']:.3f})"
    return text


def print_table(points: list[dict], growth: dict) -> None:
    """A markdown table: one row per shape, one column per stage; then the fitted exponents."""
    shapes = sorted({(p["hidden"], p["vocab"]) for p in points})
    print("| V x D | " + " | ".join(SCALE_STAGES) + " |")
    print("|---" * (len(SCALE_STAGES) + 1) + "|")
    for hidden, vocab in shapes:
        found = {p["stage"]: p for p in points if (p["vocab"], p["hidden"]) == (vocab, hidden)}
        print(f"| {vocab:,} x {hidden:,} | " + " | ".join(cell(found.get(s)) for s in SCALE_STAGES) + " |")
    print()
    for stage, fitted in growth.items():
        print(f"- {stage}: {fitted}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "scale.png"
    )
    args = parser.parse_args()
    reports = [json.loads(path.read_text()) for path in args.reports]
    merged: dict[tuple[str, int, int], dict] = {}
    for one in reports:
        for point in one["details"]["scale"]["points"]:
            merged[(point["stage"], point["vocab"], point["hidden"])] = point
    points = list(merged.values())
    growth = growth_exponents(points)
    report, scale = reports[-1], reports[-1]["details"]["scale"]
    machine = report["machine"]
    provenance = provenance_line(
        "synthetic (" + scale["profile"]["source"] + " spectrum)",
        cores=machine.get("cpus_usable") or machine.get("cpu_count"),
        threads=scale["threads"],
        command="embviz bench --stages scale",
    )
    print_table(points, growth)
    figure = cost_curves(points, growth, provenance)
    with tempfile.TemporaryDirectory() as folder:
        page_path = Path(folder) / "scale.html"
        figure.write_html(page_path, include_plotlyjs=True, full_html=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(**launch_options())
            page = browser.new_page(viewport={"width": 1300, "height": 520})
            page.goto(page_path.as_uri())
            page.wait_for_selector(".plot-container", timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
