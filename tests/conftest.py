"""Shared fixtures: tiny random backbones (seconds, no download) and an isolated cache per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from embviz.backbones import Backbone
from embviz.testing import build_tiny_model
from embviz.threads import THREADS_ENV

# The app leaves one core to the browser (embviz.threads). Inside one test process (AppTest runs app.py in
# a thread) that would change torch's thread count midway, and threads initialised before and after then
# reduce in different orders, so a result computed serially and in threads differs in its last bits. The
# suite keeps one thread count; tests of the policy itself set the variable as they need.
os.environ.setdefault(THREADS_ENV, str(torch.get_num_threads()))


@pytest.fixture(autouse=True)
def isolated_cache(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast tests get an empty cache; slow tests keep the real one so the converted backbone is reused."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "embviz-home"))


@pytest.fixture(scope="session")
def tiny_masked_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("masked", tmp_path_factory.mktemp("tiny-masked"))


@pytest.fixture(scope="session")
def tiny_causal_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("causal", tmp_path_factory.mktemp("tiny-causal"))


@pytest.fixture(scope="session")
def tiny_masked(tiny_masked_path: Path) -> Backbone:
    return Backbone.from_pretrained(str(tiny_masked_path))


@pytest.fixture(scope="session")
def tiny_causal(tiny_causal_path: Path) -> Backbone:
    return Backbone.from_pretrained(str(tiny_causal_path))


@pytest.fixture(params=["masked", "causal"])
def tiny_backbone(request: pytest.FixtureRequest) -> Backbone:
    return request.getfixturevalue(f"tiny_{request.param}")
