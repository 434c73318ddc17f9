"""Sweeps on a local two-worker Ray cluster: the same rows as the serial sweep, failures kept apart."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from embviz import cluster
from embviz.cli import main
from embviz.cluster import UNCOMPRESSED_TASK, ray_sweep, run_task, worker_threads
from embviz.errors import BadInputError
from embviz.evaluation import sweep
from embviz.sources import load_model

pytest.importorskip(
    "ray", reason="the optional extra embviz[ray] is not installed (scripts/setup.sh installs it)"
)

METHODS = ["svd", "ae-paper", "quant-int8"]
SETTINGS: dict[str, Any] = {"ratios": [2.0, 4.0], "text": "bible:test", "max_tokens": 256}
VARYING = {"seconds", "train_seconds", "cached", "artifact"}  # timings and where the cache put things


def _comparable(row: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in VARYING}


def test_a_ray_sweep_gives_the_serial_sweeps_rows(
    tiny_causal_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit for bit at equal thread counts (KL sums differ in the 7th digit between 1 and 2 threads)."""
    monkeypatch.setenv("EMBVIZ_THREADS", "1")  # each local task's torch threads on this machine
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "serial"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = sweep(load_model(str(tiny_causal_path)), METHODS, **SETTINGS)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "ray"))  # a cold cache: every task computes
    seen: list[str] = []
    result = ray_sweep(
        str(tiny_causal_path), METHODS, workers=2, progress=lambda p: seen.append(p.message), **SETTINGS
    )
    assert result.failures == []
    assert [_comparable(row.to_dict()) for row in result.rows] == [
        _comparable(row.to_dict()) for row in serial
    ]
    assert len(seen) == 1 + len(serial) and seen[-1].endswith("done")
    assert result.cluster["slots"] == 2 and result.cluster["threads_per_task"] == 1
    assert list((tmp_path / "ray" / "artifacts").rglob("*.safetensors")), "tasks share EMBVIZ_HOME"


def test_a_failed_task_is_reported_with_its_variant_and_the_others_kept(tiny_causal_path: Path) -> None:
    def flaky(model: str, settings: Mapping[str, Any], index: int) -> dict[str, Any]:
        if index == 1:
            raise RuntimeError("disk on fire")
        return run_task(model, settings, index)

    result = ray_sweep(str(tiny_causal_path), METHODS, workers=2, task=flaky, **SETTINGS)
    [failure] = result.failures
    assert failure.index == 1 and failure.variant.startswith("[2/5] svd r=")
    assert "disk on fire" in failure.error
    assert [row.method for row in result.rows] == [
        "uncompressed",
        "svd",
        "ae-paper",
        "ae-paper",
        "quant-int8",  # a fixed size: one row
    ]
    assert any(row.frontier for row in result.rows)
    json.dumps(failure.to_dict())


def test_the_uncompressed_row_is_a_task_too(tiny_causal_path: Path) -> None:
    row = run_task(str(tiny_causal_path), {"methods": ["svd"], **SETTINGS}, UNCOMPRESSED_TASK)
    assert row["method"] == "uncompressed" and row["vs_original"] == 1.0


def test_bad_input_is_refused_before_the_cluster_starts(
    tiny_causal_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster, "_import_ray", lambda: pytest.fail("the cluster must not start"))
    with pytest.raises(BadInputError, match="unknown"):
        ray_sweep(str(tiny_causal_path), ["no-such-method"], **SETTINGS)
    with pytest.raises(BadInputError, match="workers"):
        ray_sweep(str(tiny_causal_path), METHODS, workers=0, **SETTINGS)


def test_without_the_extra_the_message_says_how_to_get_it(
    tiny_causal_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # an import of ray now fails
    with pytest.raises(BadInputError, match=r"embviz\[ray\]"):
        ray_sweep(str(tiny_causal_path), ["svd"], **SETTINGS)


def test_worker_threads_share_the_cores_out() -> None:
    assert worker_threads(2, 2) == 1 and worker_threads(2, 8) == 4 and worker_threads(4, 2) == 1


def test_the_cli_runs_a_sweep_on_ray_and_refuses_workers_without_it(
    tiny_causal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tiny_causal_path)
    common = ["--methods", "svd", "--ratios", "2", "--max-tokens", "256"]
    assert main(["sweep", model, *common, "--workers", "2"]) == 2
    assert "--ray" in capsys.readouterr().err
    assert main(["sweep", model, *common, "--ray", "--workers", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["method"] for row in rows] == ["uncompressed", "svd"]
