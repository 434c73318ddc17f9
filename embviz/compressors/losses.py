"""Reconstruction losses for the AutoEncoder (SPEC §2).

Every loss has the signature ``loss(x_hat, x, alpha) -> (total, terms)``: ``total`` is the scalar to
back-propagate and ``terms`` maps each active term's name to its *unweighted* value (a detached 0-d tensor,
so the training loop can accumulate it without a device sync on every step).

The paper's objective (the original code's headline loss), per batch::

    L = (0.9975/5) * mean_i(1 - cos(x^_i, x_i)) + 0.0025 * mean_ij((|x^_ij - x_ij| + 1e-10) ** alpha)

with ``alpha`` annealed linearly from 1.0 to 0.1 over the first 20 epochs and then held at 0.1
(:func:`alpha_schedule`). embviz changes ``alpha`` once per epoch (at its start), as the original code did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embviz.errors import BadInputError

PAPER_COSINE_WEIGHT = 0.9975 / 5
PAPER_ABS_WEIGHT = 0.0025
ABS_EPS = 1e-10
ALPHA_START = 1.0
ALPHA_END = 0.1
ALPHA_ANNEAL_EPOCHS = 20.0

LossFn = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss(x_hat, x, alpha) -> (total, {term name: unweighted value})``."""


def alpha_schedule(
    epoch: float,
    anneal_epochs: float = ALPHA_ANNEAL_EPOCHS,
    start: float = ALPHA_START,
    end: float = ALPHA_END,
) -> float:
    """The exponent of the absolute-error term at (0-based) ``epoch``.

    Linear from ``start`` at epoch 0 to ``end`` at ``anneal_epochs``, then constant: with the defaults
    1.0 at epoch 0, 0.55 at epoch 10 and 0.1 from epoch 20 on. ``epoch`` may be fractional (a recipe with
    fewer epochs compresses the schedule by passing a scaled epoch).
    """
    if anneal_epochs <= 0:
        return end
    fraction = min(max(epoch / anneal_epochs, 0.0), 1.0)
    return start + (end - start) * fraction


def cosine_term(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mean_i(1 - cos(x^_i, x_i))`` over the rows of a batch."""
    return (1.0 - F.cosine_similarity(x_hat, x, dim=1)).mean()


def abs_power_term(x_hat: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean_ij((|x^_ij - x_ij| + 1e-10) ** alpha)`` over every entry of a batch."""
    return ((x_hat - x).abs() + ABS_EPS).pow(alpha).mean()


def mse_term(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mean_ij((x^_ij - x_ij) ** 2)``."""
    return F.mse_loss(x_hat, x)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms of a free-weights loss (a zero weight drops the term)."""

    cosine: float = 0.0
    abs_power: float = 0.0
    mse: float = 0.0

    def __post_init__(self) -> None:
        values = (self.cosine, self.abs_power, self.mse)
        if any(not isinstance(w, int | float) or w < 0 or w != w for w in values) or not any(values):
            raise BadInputError(f"loss weights must be non-negative numbers, not all zero; got {self}")

    def as_dict(self) -> dict[str, float]:
        return {"cosine": float(self.cosine), "abs_power": float(self.abs_power), "mse": float(self.mse)}


PAPER_WEIGHTS = LossWeights(cosine=PAPER_COSINE_WEIGHT, abs_power=PAPER_ABS_WEIGHT)
PRESET_WEIGHTS: dict[str, LossWeights] = {
    "paper": PAPER_WEIGHTS,
    "cosine": LossWeights(cosine=1.0),
    "mse": LossWeights(mse=1.0),
}
LOSS_NAMES = ("paper", "cosine", "mse", "weighted")


def weighted_loss(
    x_hat: torch.Tensor, x: torch.Tensor, alpha: float, weights: LossWeights
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``w_cos * cosine term + w_abs * |err|^alpha term + w_mse * mse``; every other loss is a preset."""
    terms: dict[str, torch.Tensor] = {}
    total = x_hat.new_zeros(())
    if weights.cosine:
        terms["cosine"] = cosine_term(x_hat, x)
        total = total + weights.cosine * terms["cosine"]
    if weights.abs_power:
        terms["abs_power"] = abs_power_term(x_hat, x, alpha)
        total = total + weights.abs_power * terms["abs_power"]
    if weights.mse:
        terms["mse"] = mse_term(x_hat, x)
        total = total + weights.mse * terms["mse"]
    return total, {name: value.detach() for name, value in terms.items()}


def paper_loss(
    x_hat: torch.Tensor, x: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's loss: ``(0.9975/5) * cosine term + 0.0025 * |err|^alpha term``."""
    return weighted_loss(x_hat, x, alpha, PAPER_WEIGHTS)


def resolve_weights(name: str, weights: LossWeights | Mapping[str, float] | None = None) -> LossWeights:
    """The term weights of loss ``name`` (``paper``, ``cosine``, ``mse``, or ``weighted`` with ``weights``).

    ``weights`` for ``weighted`` may name ``cosine``/``w_cos``, ``abs_power``/``w_abs`` and ``mse``/``w_mse``;
    missing ones default to the paper's weights (and 0 for mse).
    """
    if name in PRESET_WEIGHTS:
        if weights is not None:
            raise BadInputError(f"loss {name!r} has fixed weights; use loss 'weighted' to set them")
        return PRESET_WEIGHTS[name]
    if name != "weighted":
        raise BadInputError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    if isinstance(weights, LossWeights):
        return weights
    given = dict(weights or {})
    aliases = {"w_cos": "cosine", "w_abs": "abs_power", "w_mse": "mse"}
    merged = PAPER_WEIGHTS.as_dict()
    for key, value in given.items():
        field_name = aliases.get(key, key)
        if field_name not in merged:
            raise BadInputError(f"unknown loss weight {key!r}; use cosine, abs_power and mse")
        merged[field_name] = value
    return LossWeights(**merged)


def make_loss(name: str, weights: LossWeights | Mapping[str, float] | None = None) -> LossFn:
    """The loss function called ``name`` (see :func:`resolve_weights`)."""
    return loss_with_weights(resolve_weights(name, weights))


def loss_with_weights(weights: LossWeights) -> LossFn:
    """:func:`weighted_loss` with fixed ``weights``."""

    def loss(
        x_hat: torch.Tensor, x: torch.Tensor, alpha: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return weighted_loss(x_hat, x, alpha, weights)

    return loss
