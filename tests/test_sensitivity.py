"""The model's direction metric (embviz.sensitivity): the empirical Fisher w.r.t. the input embedding, its
cache, and what each method gets from the model to fit."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embviz import sensitivity
from embviz.backbones import Backbone
from embviz.compressors import DirectionMetric, get_method
from embviz.corpora import load_texts
from embviz.errors import BadInputError
from embviz.perplexity import build_eval_set
from embviz.sensitivity import CALIBRATION_CORPUS, direction_metric, method_inputs

TOKENS = 256


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sensitivity, "_MEMO", {})
    return tmp_path / "home"


@pytest.mark.parametrize("tiny_backbone", ["causal", "masked"], indirect=True)
def test_input_gradients_are_the_loss_gradient_at_each_position(tiny_backbone: Backbone) -> None:
    """Checked against a finite difference of the summed loss along one row of one position."""
    batch = build_eval_set(tiny_backbone, load_texts(CALIBRATION_CORPUS, "train"), max_tokens=64).batches[0]
    gradients = tiny_backbone.input_gradients(batch.input_ids, batch.attention_mask, batch.labels)
    assert gradients.shape == (*batch.input_ids.shape, tiny_backbone.hidden_size)
    assert bool((gradients[~batch.attention_mask.bool()] == 0).all())

    model = copy.deepcopy(tiny_backbone.model).double()  # float64: a finite difference that means something

    def loss(shift: float) -> float:
        embeds = F.embedding(batch.input_ids, tiny_backbone.embedding).double().clone()
        embeds[0, 1] += shift * direction
        with torch.no_grad():
            logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
        return float(F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="sum"))

    direction = torch.randn(tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(0)).double()
    numeric = (loss(1e-4) - loss(-1e-4)) / 2e-4
    assert float(gradients[0, 1].double() @ direction) == pytest.approx(numeric, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("tiny_backbone", ["causal", "masked"], indirect=True)
def test_the_direction_metric_is_the_mean_outer_product_of_the_gradients(
    tiny_backbone: Backbone, home: Path
) -> None:
    metric = direction_metric(tiny_backbone, tokens=TOKENS)
    hidden = tiny_backbone.hidden_size
    matrix = metric.check(hidden)
    assert matrix.shape == (hidden, hidden) and torch.allclose(matrix, matrix.T)
    assert float(torch.linalg.eigvalsh(matrix).min()) > -1e-8  # positive semi-definite
    assert float(matrix.trace()) == pytest.approx(hidden)  # normalised to mean eigenvalue 1
    eval_set = build_eval_set(tiny_backbone, load_texts(CALIBRATION_CORPUS, "train"), max_tokens=TOKENS)
    total = torch.zeros(hidden, hidden, dtype=torch.float64)
    for batch in eval_set.batches:
        rows = tiny_backbone.input_gradients(batch.input_ids, batch.attention_mask, batch.labels)
        rows = rows[batch.attention_mask.bool()].double()
        total += rows.T @ rows
    assert torch.allclose(DirectionMetric(total, source="here").matrix, matrix, rtol=1e-6, atol=1e-9)
    assert f"{CALIBRATION_CORPUS}:train" in metric.source and "model-generated" in metric.source


def test_the_metric_is_cached_and_a_corrupt_entry_is_recomputed(tiny_causal: Backbone, home: Path) -> None:
    first = direction_metric(tiny_causal, tokens=TOKENS)
    (path,) = list(home.rglob("*-fisher-*.npz"))
    sensitivity._MEMO.clear()
    assert direction_metric(tiny_causal, tokens=TOKENS).sha256 == first.sha256  # read back from the disk
    np.savez(path, fisher=np.full((3, 3), np.nan))
    sensitivity._MEMO.clear()
    assert direction_metric(tiny_causal, tokens=TOKENS).sha256 == first.sha256  # recomputed, same values
    assert direction_metric(tiny_causal, tokens=2 * TOKENS).sha256 != first.sha256  # the budget keys it
    with pytest.raises(BadInputError, match="at least 2 calibration tokens"):
        direction_metric(tiny_causal, tokens=1)


def test_each_method_gets_what_it_needs_from_the_model(tiny_causal: Backbone, home: Path) -> None:
    assert method_inputs(tiny_causal, get_method("svd")) == {}
    assert set(method_inputs(tiny_causal, get_method("svd-freq"))) == {"row_weights"}
    inputs = method_inputs(tiny_causal, get_method("vq-direction"))
    assert set(inputs) == {"row_weights", "direction_metric"}
    assert isinstance(inputs["direction_metric"], DirectionMetric)
    corpora = method_inputs(tiny_causal, get_method("svd-freq"), weights="corpora")["row_weights"]
    assert "train slices" in corpora.source


def test_a_direction_metric_checks_what_it_is_given() -> None:
    with pytest.raises(BadInputError, match="square"):
        DirectionMetric(torch.ones(3, 4), source="x")
    with pytest.raises(BadInputError, match="positive trace"):
        DirectionMetric(torch.zeros(3, 3), source="x")
    with pytest.raises(BadInputError, match="finite"):
        DirectionMetric(torch.full((3, 3), float("nan")), source="x")
    metric = DirectionMetric(torch.diag(torch.tensor([4.0, 1.0, 1.0])), source="x")
    basis, eigenvalues = metric.leading(1)
    assert torch.allclose(basis.abs(), torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(eigenvalues, torch.tensor([2.0, 0.5, 0.5], dtype=torch.float64))
    assert metric.describe()["source"] == "x" and DirectionMetric.euclidean(3).sha256 != metric.sha256


def test_a_sweep_validates_its_sizes_before_measuring_the_metric(
    tiny_causal: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget no method meets is one error at once, not after the metric's gradients (the slow part)."""
    from embviz.evaluation import plan_sweep

    def measured(*args: object, **kwargs: object) -> DirectionMetric:
        raise AssertionError("the metric was measured before the plan was validated")

    monkeypatch.setattr(sensitivity, "direction_metric", measured)
    with pytest.raises(BadInputError, match="no method meets any of the budgets"):
        plan_sweep(tiny_causal, ["vq-direction"], None, None, "fast", bits=[0.01])
