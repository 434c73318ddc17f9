from __future__ import annotations

from tests.e2e.conftest import wait_for_idle


def test_overview_renders_backbone_facts(page, app_url: str) -> None:
    page.goto(app_url)
    wait_for_idle(page)
    assert page.get_by_text("embviz").first.is_visible()
    assert page.locator("[data-testid='stMetric']").count() == 4
    assert page.locator("[data-testid='stException']").count() == 0
