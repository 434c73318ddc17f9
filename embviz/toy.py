"""A toy for teaching why direction matters: a handful of 2-D or 3-D arrows squeezed to rank r two ways.

The arrows (:func:`toy_vectors`) come in two groups: a few long ones pointing roughly one way and more short
ones pointing another, so lengths vary a lot, as the rows of a real embedding table do. Both compressors keep
the same budget, a rank-``r`` linear map:

* **SVD** (:func:`fit_svd`): the exact truncated SVD, not mean-centred, like :mod:`embviz.compressors.svd`.
  It minimises the squared error, so long arrows count far more than short ones.
* **A direction-loss AutoEncoder** (:func:`fit_direction_ae`): encoder D -> r, decoder r -> D, no
  activation, trained on ``w * cosine term + (1 - w) * |error| term`` (the terms of
  :mod:`embviz.compressors.losses`, the |error| exponent fixed at 1). With ``bias`` it has the real AE's two
  bias vectors; without (the default) it is exactly SVD's kind of map, so only the loss differs.

Everything is deterministic: the arrows come from ``numpy.random.default_rng(seed)``, the AE starts from
the SVD solution plus a few seeded random starts trained side by side, and the one with the lowest final
loss is kept. A fit takes a fraction of a second on one CPU core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from embviz.compressors.losses import LossWeights, weighted_loss
from embviz.compressors.svd import top_right_singular_vectors
from embviz.errors import BadInputError

DIMENSIONS = (2, 3)
DEFAULT_COUNT = 10
DEFAULT_WEIGHT = 0.99
"""The paper's loss puts 0.9975/5 on the cosine term and 0.0025 on the |error| term: about 99% direction."""
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 0.9, DEFAULT_WEIGHT, 1.0)
"""The direction weights the page offers (0: only the |error| term; 1: only the cosine term)."""
STEPS = 200
RESTARTS = 8
LEARNING_RATE = 0.03
ALPHA = 1.0  # the |error| term's exponent: plain mean absolute error


@dataclass(frozen=True)
class ToyFit:
    """One compressor's reconstruction of the toy arrows, with what it got right and wrong."""

    name: str
    target: np.ndarray
    """The arrows, n x D (float64)."""
    reconstruction: np.ndarray
    """n x D, float64."""
    angles: np.ndarray
    """Degrees between each arrow and its reconstruction (0 = same direction; nan for a zero arrow)."""
    length_ratio: np.ndarray
    """||reconstruction|| / ||arrow|| (1 = same length)."""
    basis: np.ndarray
    """D x r orthonormal columns spanning the directions the reconstructions can take (before the offset)."""
    offset: np.ndarray
    """D-vector: where that span is shifted to (zero unless the AE has a bias)."""
    loss: float | None = None
    """The AE's final training loss (None for SVD)."""

    @classmethod
    def of(
        cls,
        name: str,
        target: np.ndarray,
        reconstruction: np.ndarray,
        basis: np.ndarray,
        offset: np.ndarray,
        loss: float | None = None,
    ) -> ToyFit:
        """The fit with its angles and length ratios measured."""
        angles, ratio = angles_and_lengths(target, reconstruction)
        return cls(name, target, reconstruction, angles, ratio, basis, offset, loss)

    @property
    def mean_angle(self) -> float:
        return float(np.nanmean(self.angles))

    @property
    def mean_length_ratio(self) -> float:
        return float(np.nanmean(self.length_ratio))

    @property
    def relative_error(self) -> float:
        """||X - X^||_F / ||X||_F."""
        error = np.linalg.norm(self.target - self.reconstruction)
        return float(error / max(float(np.linalg.norm(self.target)), 1e-300))


@dataclass(frozen=True)
class ToyResult:
    """The arrows and both reconstructions, with the settings that made them."""

    vectors: np.ndarray
    """n x D, float64."""
    rank: int
    weight: float
    bias: bool
    seed: int
    fits: dict[str, ToyFit]
    """``{"SVD": ..., "AE": ...}``."""

    @property
    def lengths(self) -> np.ndarray:
        return np.linalg.norm(self.vectors, axis=1)

    def table(self) -> list[dict[str, float | int]]:
        """One row per arrow: its length, and each fit's angle and length ratio."""
        rows: list[dict[str, float | int]] = []
        for i, length in enumerate(self.lengths):
            row: dict[str, float | int] = {"arrow": i + 1, "length": round(float(length), 3)}
            for name, fit in self.fits.items():
                row[f"{name} angle (°)"] = round(float(fit.angles[i]), 1)
                row[f"{name} length ratio"] = round(float(fit.length_ratio[i]), 3)
            rows.append(row)
        return rows

    def summary(self) -> str:
        """What the toy shows, in plain words, from its numbers."""
        svd, ae = self.fits["SVD"], self.fits["AE"]
        if self.rank >= self.vectors.shape[1]:
            return (
                f"Rank {self.rank} keeps every dimension of these {self.vectors.shape[1]}-D arrows, so both "
                "reconstruct them exactly: nothing has to give. Lower the rank to see a choice being made."
            )
        lengths = self.lengths
        short = lengths < np.median(lengths)
        parts = [
            f"SVD is off by {svd.mean_angle:.1f}° on average, the AE by {ae.mean_angle:.1f}°.",
            f"On the shorter half of the arrows: SVD {np.nanmean(svd.angles[short]):.1f}°, "
            f"AE {np.nanmean(ae.angles[short]):.1f}°; on the longer half: SVD "
            f"{np.nanmean(svd.angles[~short]):.1f}°, AE {np.nanmean(ae.angles[~short]):.1f}°.",
            f"Lengths: SVD keeps {svd.mean_length_ratio:.0%} of an arrow's length on average, the AE "
            f"{ae.mean_length_ratio:.0%}; overall error (what SVD minimises): SVD {svd.relative_error:.0%}, "
            f"AE {ae.relative_error:.0%}.",
        ]
        return " ".join(parts)


def check_toy(dim: int, rank: int, weight: float, count: int = DEFAULT_COUNT) -> None:
    """Raise :class:`BadInputError` with one clear message for settings the toy cannot use."""
    if dim not in DIMENSIONS:
        raise BadInputError(f"the toy is 2-D or 3-D, not {dim}-D")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= dim:
        raise BadInputError(f"rank must be between 1 and {dim} for {dim}-D arrows, got {rank!r}")
    if not isinstance(weight, int | float) or not 0.0 <= weight <= 1.0:
        raise BadInputError(f"the direction weight must be between 0 and 1, got {weight!r}")
    if not isinstance(count, int) or not 3 <= count <= 200:
        raise BadInputError(f"the toy needs between 3 and 200 arrows, got {count!r}")


def toy_vectors(dim: int = 2, count: int = DEFAULT_COUNT, seed: int = 0) -> np.ndarray:
    """``count`` arrows in ``dim`` dimensions (float64): a third long (2 to 3) and close to one direction,
    the rest short (0.3 to 0.9) and spread around a direction 60 to 100 degrees away."""
    check_toy(dim, 1, DEFAULT_WEIGHT, count)
    rng = np.random.default_rng(seed)
    first = _unit(rng.normal(size=dim))
    other = rng.normal(size=dim)
    other = _unit(other - (other @ first) * first)
    turn = math.radians(rng.uniform(60.0, 100.0))
    second = math.cos(turn) * first + math.sin(turn) * other
    long_count = max(1, count // 3)
    centres = np.array([first] * long_count + [second] * (count - long_count))
    spread = np.array([0.15] * long_count + [0.45] * (count - long_count))[:, None]
    directions = centres + spread * rng.normal(size=(count, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    lengths = np.concatenate([rng.uniform(2.0, 3.0, long_count), rng.uniform(0.3, 0.9, count - long_count)])
    return directions * lengths[:, None]


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-12 else np.eye(len(vector))[0]


def angles_and_lengths(vectors: np.ndarray, reconstruction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Degrees between matching rows and the ratio of their lengths (nan where the original row is zero)."""
    norms = np.linalg.norm(vectors, axis=1)
    rebuilt = np.linalg.norm(reconstruction, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.einsum("ij,ij->i", vectors, reconstruction) / (norms * rebuilt)
        ratio = rebuilt / norms
    cosine = np.where(rebuilt > 0, cosine, 0.0)
    degrees = np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))
    return np.where(norms > 0, degrees, np.nan), np.where(norms > 0, ratio, np.nan)


def fit_svd(vectors: np.ndarray, rank: int) -> ToyFit:
    """The rank-``rank`` truncated SVD of the arrows (not mean-centred): each arrow's projection."""
    matrix = torch.as_tensor(np.asarray(vectors, dtype=np.float64))
    check_toy(matrix.shape[1], rank, DEFAULT_WEIGHT, matrix.shape[0])
    basis, _ = top_right_singular_vectors(matrix, rank)
    reconstruction = (matrix @ basis @ basis.T).numpy()
    return ToyFit.of(
        "SVD", np.asarray(vectors, dtype=np.float64), reconstruction, basis.numpy(), np.zeros(matrix.shape[1])
    )


def fit_direction_ae(
    vectors: np.ndarray,
    rank: int,
    weight: float = DEFAULT_WEIGHT,
    *,
    bias: bool = False,
    steps: int = STEPS,
    restarts: int = RESTARTS,
    seed: int = 0,
) -> ToyFit:
    """A rank-``rank`` linear AutoEncoder trained on ``weight * cosine + (1 - weight) * |error|``.

    ``restarts`` copies train side by side (full batch, Adam, cosine-decayed learning rate): the first
    starts from the SVD solution, the others from seeded random weights; the lowest final loss wins.
    """
    target = np.asarray(vectors, dtype=np.float64)
    count, dim = target.shape
    check_toy(dim, rank, weight, count)
    if steps < 0 or restarts < 1:
        raise BadInputError("steps must be at least 0 and restarts at least 1")
    weights = LossWeights(cosine=float(weight), abs_power=1.0 - float(weight))
    x = torch.as_tensor(target)
    start, _ = top_right_singular_vectors(x, rank)
    generator = torch.Generator().manual_seed(seed)
    encoders = torch.randn(restarts, rank, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    decoders = torch.randn(restarts, dim, rank, generator=generator, dtype=torch.float64) / math.sqrt(rank)
    encoders[0], decoders[0] = start.T, start
    parameters = [encoders.requires_grad_(), decoders.requires_grad_()]
    if bias:
        parameters.append(torch.zeros(restarts, 1, rank, dtype=torch.float64, requires_grad=True))
        parameters.append(torch.zeros(restarts, 1, dim, dtype=torch.float64, requires_grad=True))
    optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / max(steps, 1)))
    )
    stacked = x.expand(restarts, count, dim).reshape(-1, dim)

    def reconstruct() -> torch.Tensor:
        codes = x @ parameters[0].transpose(1, 2)
        if bias:
            codes = codes + parameters[2]
        out = codes @ parameters[1].transpose(1, 2)
        return out + parameters[3] if bias else out

    for _ in range(steps):
        optimizer.zero_grad()
        # The mean over every copy's rows is the copies' mean loss: each copy gets its own gradient / restarts.
        total, _ = weighted_loss(reconstruct().reshape(-1, dim), stacked, ALPHA, weights)
        (total * restarts).backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        outputs = reconstruct()
        losses = [float(weighted_loss(out, x, ALPHA, weights)[0]) for out in outputs]
    best = int(np.argmin(losses))
    decoder = parameters[1][best].detach()
    offset = (parameters[3][best, 0] + parameters[2][best, 0] @ decoder.T).detach() if bias else None
    basis, _ = torch.linalg.qr(decoder)
    return ToyFit.of(
        "AE",
        target,
        outputs[best].numpy(),
        basis.numpy(),
        np.zeros(dim) if offset is None else offset.numpy(),
        losses[best],
    )


def toy_comparison(
    dim: int = 2,
    rank: int = 1,
    weight: float = DEFAULT_WEIGHT,
    *,
    count: int = DEFAULT_COUNT,
    seed: int = 0,
    bias: bool = False,
) -> ToyResult:
    """The toy arrows (``seed``) reconstructed at ``rank`` by SVD and by the direction-loss AE.

    Raises:
        BadInputError: a dimension other than 2 or 3, a rank outside 1..dim, a weight outside [0, 1].
    """
    check_toy(dim, rank, weight, count)
    vectors = toy_vectors(dim, count, seed)
    fits = {
        "SVD": fit_svd(vectors, rank),
        "AE": fit_direction_ae(vectors, rank, weight, bias=bias, seed=seed),
    }
    return ToyResult(vectors, rank, float(weight), bias, seed, fits)


__all__ = [
    "DEFAULT_WEIGHT",
    "DIMENSIONS",
    "WEIGHTS",
    "ToyFit",
    "ToyResult",
    "angles_and_lengths",
    "check_toy",
    "fit_direction_ae",
    "fit_svd",
    "toy_comparison",
    "toy_vectors",
]
