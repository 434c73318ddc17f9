from __future__ import annotations

import math

import pytest
import torch

from embviz.compressors.losses import (
    LossWeights,
    alpha_schedule,
    make_loss,
    paper_loss,
    resolve_weights,
    weighted_loss,
)
from embviz.errors import BadInputError

X = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
X_HAT = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)


def test_paper_loss_matches_a_hand_computed_value() -> None:
    alpha = 0.5
    # Row cosines: 1/sqrt(2) and 1. Absolute errors: 0, 1, 0, 1.
    cosine = ((1 - 1 / math.sqrt(2)) + (1 - 1)) / 2
    abs_power = (2 * (0 + 1e-10) ** alpha + 2 * (1 + 1e-10) ** alpha) / 4
    expected = (0.9975 / 5) * cosine + 0.0025 * abs_power
    total, terms = paper_loss(X_HAT, X, alpha)
    assert float(total) == pytest.approx(expected, rel=1e-12)
    assert float(terms["cosine"]) == pytest.approx(cosine, rel=1e-12)
    assert float(terms["abs_power"]) == pytest.approx(abs_power, rel=1e-12)
    assert set(terms) == {"cosine", "abs_power"} and not any(t.requires_grad for t in terms.values())


def test_alpha_schedule() -> None:
    assert alpha_schedule(0) == pytest.approx(1.0)
    assert alpha_schedule(5) == pytest.approx(0.775)
    assert alpha_schedule(10) == pytest.approx(0.55)
    assert [alpha_schedule(e) for e in (20, 21, 29, 100)] == pytest.approx([0.1] * 4)
    assert alpha_schedule(2, anneal_epochs=4) == pytest.approx(0.55)
    assert alpha_schedule(0, anneal_epochs=0) == pytest.approx(0.1)


def test_single_term_losses() -> None:
    cosine, terms = make_loss("cosine")(X_HAT, X, 1.0)
    assert float(cosine) == pytest.approx((1 - 1 / math.sqrt(2)) / 2) and set(terms) == {"cosine"}
    mse, terms = make_loss("mse")(X_HAT, X, 1.0)
    assert float(mse) == pytest.approx(0.5) and set(terms) == {"mse"}


def test_weighted_loss_combines_the_three_terms() -> None:
    weights = resolve_weights("weighted", {"w_cos": 2.0, "w_abs": 0.5, "mse": 3.0})
    assert weights == LossWeights(cosine=2.0, abs_power=0.5, mse=3.0)
    total, terms = weighted_loss(X_HAT, X, 1.0, weights)
    expected = 2.0 * terms["cosine"] + 0.5 * terms["abs_power"] + 3.0 * terms["mse"]
    assert float(total) == pytest.approx(float(expected))
    # Missing weights default to the paper's.
    assert resolve_weights("weighted", {}) == resolve_weights("paper")


def test_loss_gradients_flow() -> None:
    x_hat = X_HAT.clone().requires_grad_(True)
    total, _ = paper_loss(x_hat, X, 0.1)
    total.backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all()


@pytest.mark.parametrize(
    ("name", "weights"),
    [("huber", None), ("paper", {"cosine": 1.0}), ("weighted", {"bogus": 1.0}), ("weighted", {"w_cos": -1})],
)
def test_bad_losses_are_refused(name: str, weights: dict | None) -> None:
    with pytest.raises(BadInputError):
        make_loss(name, weights)


def test_all_zero_weights_are_refused() -> None:
    with pytest.raises(BadInputError):
        LossWeights()
