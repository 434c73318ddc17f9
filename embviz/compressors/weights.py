"""Per-row importance weights for the frequency-aware compressors (issue 7).

A :class:`RowWeights` is a V-vector of non-negative weights plus a description of where it came from.
Compressors take it as a constructor parameter (like scikit-learn's ``class_weight``); its ``describe()``
(source, power and a hash of the values) goes into their configuration, so a cached artifact is keyed by
the exact weights it was fitted with. Computing weights from text lives in :mod:`embviz.frequency`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from embviz.errors import BadInputError


@dataclass(frozen=True, eq=False)
class RowWeights:
    """Importance of each row of the embedding matrix (normalised to mean 1, float64)."""

    values: torch.Tensor
    source: str
    power: float = 1.0

    def __post_init__(self) -> None:
        values = torch.as_tensor(self.values, dtype=torch.float64).detach().cpu().flatten()
        if values.numel() == 0 or not torch.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
            raise BadInputError("row weights must be finite, non-negative and not all zero")
        object.__setattr__(self, "values", values / values.mean())

    def check(self, vocab_size: int) -> torch.Tensor:
        """The weights, after checking that there is one per row of a ``vocab_size``-row matrix."""
        if self.values.numel() != vocab_size:
            raise BadInputError(f"{self.values.numel()} row weights for a matrix of {vocab_size} rows")
        return self.values

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.values.numpy().tobytes()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance: ``source``, ``power`` and a hash of the values (part of cache keys)."""
        return {"source": self.source, "power": self.power, "sha256": self.sha256}
