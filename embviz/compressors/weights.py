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


@dataclass(frozen=True, eq=False)
class DirectionMetric:
    """Which directions of a row matter to the model: a D x D positive semi-definite matrix ``M`` (float64)
    such that a row error ``e`` costs about ``e^T M e`` (e.g. the empirical Fisher of the model's loss with
    respect to its input embedding, :mod:`embviz.sensitivity`).

    A compressor that takes one measures its error in this metric instead of the Euclidean one; its
    ``describe()`` goes into the compressor's configuration, so a cached artifact is keyed by it.
    """

    matrix: torch.Tensor
    source: str

    def __post_init__(self) -> None:
        matrix = torch.as_tensor(self.matrix, dtype=torch.float64).detach().cpu()
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
            raise BadInputError(
                f"a direction metric must be a square matrix, got shape {tuple(matrix.shape)}"
            )
        if not torch.isfinite(matrix).all() or matrix.trace() <= 0:
            raise BadInputError("a direction metric must be finite with a positive trace")
        symmetric = (matrix + matrix.T) / 2
        object.__setattr__(self, "matrix", symmetric / (symmetric.trace() / symmetric.shape[0]))

    @classmethod
    def euclidean(cls, hidden_size: int) -> DirectionMetric:
        """Every direction alike (the identity): what a compressor without a model's metric minimises."""
        return cls(torch.eye(hidden_size, dtype=torch.float64), source="euclidean (identity)")

    def check(self, hidden_size: int) -> torch.Tensor:
        """The matrix (normalised to mean eigenvalue 1), after checking it is ``hidden_size`` wide."""
        if self.matrix.shape[0] != hidden_size:
            raise BadInputError(f"a {self.matrix.shape[0]}-wide direction metric for {hidden_size}-wide rows")
        return self.matrix

    def leading(self, directions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(basis, eigenvalues)``: the ``directions`` most costly orthonormal directions (rows of a
        ``directions`` x D basis, largest first) and the mean-1-normalised eigenvalues of every direction
        (descending)."""
        eigenvalues, vectors = torch.linalg.eigh(self.matrix)
        order = torch.argsort(eigenvalues, descending=True, stable=True)
        return vectors[:, order[:directions]].T.contiguous(), eigenvalues[order].clamp_min(0.0)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.matrix.numpy().tobytes()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance: ``source`` and a hash of the matrix (part of cache keys)."""
        return {"source": self.source, "sha256": self.sha256}
