"""``embviz bench --stages app`` on the tiny model: the benchmark drives the real app through every page."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from embviz.bench import BenchSettings, run_bench
from pages.navigation import PAGES
from tests.e2e.conftest import RANK

pytestmark = pytest.mark.e2e


def test_the_app_stage_times_every_page_and_scenario(
    e2e_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, home = e2e_model
    monkeypatch.setenv("EMBVIZ_HOME", str(home))  # the stage seeds its servers' caches from this one
    settings = BenchSettings(model=str(model), rank=RANK, repeats=1, heavy_repeats=1)
    result = run_bench(settings, ["app"])
    json.dumps(result)
    assert result["errors"] == {}
    figures, details = result["figures"], result["details"]["app"]
    scenarios = details["scenarios"]
    for page in PAGES:
        for scenario in ("warm", "first_visit"):
            entry = scenarios[scenario][page.name]
            assert entry["samples"] and len(entry["samples"]) == 1, (scenario, page.name)
            assert math.isfinite(entry["median_s"]) and entry["median_s"] > 0, (scenario, page.name)
        assert result["targets"][f"app_warm_{page.name}_s"]["met"] in (True, False)
    for name in (
        "app_predictions_s",
        "app_new_rank_s",
        "app_new_rank_first_answer_s",
        "app_neighbours_fresh_variants_first_answer_s",
        "app_umap_first_map_s",
        "app_umap_url_first_map_s",
        "app_umap_cold_s",
    ):
        assert math.isfinite(figures[name]) and figures[name] > 0, name
    assert figures["app_predictions_three_tables"] is True
    assert figures["app_new_rank_both_variants"] is True
    assert figures["app_new_rank_first_answer_s"] <= figures["app_new_rank_s"]
    assert isinstance(figures["app_new_rank_estimate_first"], bool)
    assert isinstance(figures["app_new_rank_train_clicked"], bool)
    assert isinstance(figures["app_umap_pca_first"], bool)
    assert isinstance(figures["app_umap_progress_shown"], bool)
    assert figures["app_umap_first_map_s"] <= figures["app_umap_cold_s"]
    assert details["fresh_rank"] != RANK and details["threads_policy"] == "app"
    assert details["runs"][0]["exceptions"] == []
    assert {"load_average_before", "load_average_after"} <= set(details["runs"][0])
