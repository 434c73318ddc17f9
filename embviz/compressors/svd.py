"""Truncated SVD of the embedding matrix, not mean-centred (SPEC §2): codes A = U_r S_r = E V_r, decoder V_r^T.

With row weights w (``svd-freq``, issue 7) the basis minimises the weighted error sum_i w_i |x_i - x^_i|^2:
it is the top right singular space of diag(sqrt(w)) E, and every row's code is still its orthogonal
projection E V_r, the best code for that basis whatever the row's weight.

The exact variant eigen-decomposes the D x D Gram matrix E^T E in float64 (well under a second for
D <= 1024, memory bounded by accumulating it over row blocks), kept on disk per matrix
(:func:`cached_gram_matrix`): it does not depend on the rank, so a new rank costs only a projection. The randomised variant reproduces the
original code's weaker baseline (``torch.svd_lowrank`` with ``n_iter`` power iterations), labelled as such.
Components are sorted by descending singular value and signed so that the largest-magnitude entry of every
right singular vector is positive, which makes results deterministic.

The exact variants run on the ``device`` they are given (Gram matrix, ``eigh`` and projection; e.g.
``cuda``) and hand back CPU tensors equal to the CPU fit's within float tolerance (float64 throughout, so
about 1e-6 relative in the codes for a well-separated spectrum). The randomised baseline always fits on the
CPU: its random test matrix comes from the CPU generator there, so a device would change its numbers under
the same configuration; it ignores ``device`` (its spec does not list it, see
:data:`~embviz.compressors.registry.DEVICE_OPTION`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from embviz.cache import cached_arrays, config_key, matrix_fingerprint, optional_cache_dir, sha256_bytes
from embviz.compressors.base import CompressedEmbedding, check_device, check_seed, closed_form_progress
from embviz.compressors.registry import MethodSpec, matrix_scale, register_method
from embviz.compressors.weights import RowWeights
from embviz.errors import BadInputError
from embviz.progress import ProgressCallback, send
from embviz.rng import seeded

BLOCK_ROWS = 8192
RANDOMIZED_OVERSAMPLES = 10


def _check_matrix(embedding: torch.Tensor, rank: int) -> None:
    if embedding.ndim != 2:
        raise BadInputError(f"expected a V x D matrix, got shape {tuple(embedding.shape)}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(embedding.shape):
        raise BadInputError(f"rank must be between 1 and {min(embedding.shape)}, got {rank!r}")


def _sign_fix(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    pivots = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivots, torch.arange(vectors.shape[1], device=vectors.device)])
    signs[signs == 0] = 1
    return vectors * signs


def row_blocks(
    embedding: torch.Tensor, rows: torch.Tensor | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``embedding``'s rows (or only ``rows``, in that order) in float64 blocks of :data:`BLOCK_ROWS`, each with
    its position in the row order; a row subset is gathered block by block, never copied whole."""
    count = embedding.shape[0] if rows is None else rows.shape[0]
    for start in range(0, count, BLOCK_ROWS):
        where = slice(start, start + BLOCK_ROWS)
        block = embedding[where] if rows is None else embedding[rows[where].to(embedding.device)]
        yield where, block.to(torch.float64)


def row_mean(
    embedding: torch.Tensor, rows: torch.Tensor | None = None, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The float64 mean of ``embedding``'s rows (or of ``rows``), weighted by ``weights`` (one per row used)."""
    total = torch.zeros(embedding.shape[1], dtype=torch.float64, device=embedding.device)
    for where, block in row_blocks(embedding, rows):
        total += block.sum(dim=0) if weights is None else weights[where].to(block) @ block
    if weights is not None:
        return total / weights.sum(dtype=torch.float64)
    return total / (embedding.shape[0] if rows is None else rows.shape[0])


def gram_matrix(
    embedding: torch.Tensor,
    center: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(E - c)^T W (E - c)`` in float64, accumulated over row blocks (``c`` a D-vector, ``W`` diagonal);
    over ``rows`` only when given (``weights`` then has one entry per row in ``rows``)."""
    hidden = embedding.shape[1]
    gram = torch.zeros(hidden, hidden, dtype=torch.float64, device=embedding.device)
    for where, block in row_blocks(embedding, rows):
        if center is not None:
            block = block - center
        weighted = block if weights is None else block * weights[where, None].to(block)
        gram.addmm_(weighted.T, block)
    return gram


GRAM_CACHE_VERSION = 1


def _bytes_of(tensor: torch.Tensor | None, dtype: torch.dtype) -> bytes:
    if tensor is None:
        return b"none"
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous().numpy().tobytes()


def gram_key(
    embedding: torch.Tensor,
    center: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> str:
    """The cache key of :func:`gram_matrix`'s inputs: the matrix's fingerprint and hashes of the centre,
    weights and rows, exactly as they enter the float64 sum."""
    parts = {
        "v": GRAM_CACHE_VERSION,
        "matrix": matrix_fingerprint(embedding),
        "center": sha256_bytes(_bytes_of(center, torch.float64)),
        "weights": sha256_bytes(_bytes_of(weights, torch.float64)),
        "rows": sha256_bytes(_bytes_of(rows, torch.int64)),
    }
    return config_key(parts, length=24)


def cached_gram_matrix(
    embedding: torch.Tensor,
    center: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`gram_matrix`, computed once per input and kept on disk (``cache_dir("gram")``, D x D float64).

    It does not depend on the rank, so an SVD or an AE warm start at a new rank of a matrix fitted before
    costs a projection instead of a pass over all V x D numbers (about 1.2 s of every new rank on SmolLM2
    at one thread, per decomposition). A corrupt entry is recomputed; without a usable cache it is computed.
    """
    folder = optional_cache_dir("gram")
    if folder is None:
        return gram_matrix(embedding, center, weights, rows)
    hidden = embedding.shape[1]

    def compute() -> dict[str, np.ndarray]:
        return {"gram": gram_matrix(embedding, center, weights, rows).cpu().numpy()}

    def valid(arrays: dict[str, np.ndarray]) -> bool:
        gram = arrays.get("gram")
        return (
            gram is not None
            and gram.shape == (hidden, hidden)
            and gram.dtype == np.float64
            and bool(np.isfinite(gram).all())
        )

    path = folder / f"gram-{gram_key(embedding, center, weights, rows)}.npz"
    return torch.from_numpy(cached_arrays(path, compute, valid)["gram"]).to(embedding.device)


def top_right_singular_vectors(
    embedding: torch.Tensor,
    rank: int,
    center: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``rank`` right singular vectors (D x r, float64) and singular values of ``sqrt(W) (E - c)``
    (``E`` restricted to ``rows`` when given).

    Exact, via ``eigh`` of the float64 Gram matrix; sorted by descending singular value, sign-normalised.
    """
    _check_matrix(embedding, rank)
    eigenvalues, eigenvectors = torch.linalg.eigh(cached_gram_matrix(embedding, center, weights, rows))
    order = torch.argsort(eigenvalues, descending=True)[:rank]
    singular_values = eigenvalues[order].clamp_min(0).sqrt()
    return _sign_fix(eigenvectors[:, order]), singular_values


def project(embedding: torch.Tensor, basis: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Codes ``(E - c) @ basis`` computed in float64 over row blocks, returned as float32."""
    codes = torch.empty(embedding.shape[0], basis.shape[1], dtype=torch.float32, device=embedding.device)
    for start in range(0, embedding.shape[0], BLOCK_ROWS):
        block = embedding[start : start + BLOCK_ROWS].to(torch.float64)
        if center is not None:
            block = block - center
        codes[start : start + BLOCK_ROWS] = (block @ basis).to(torch.float32)
    return codes


class SVDCompressor:
    """Truncated SVD: exact (default), frequency-weighted (``row_weights``), or the original randomised one.

    ``device`` is where the exact variants compute (the randomised one fits on the CPU whatever it says); it
    is not part of :meth:`get_config`, so it changes where the fit runs, not what it computes or its cache key.
    """

    def __init__(
        self,
        rank: int,
        randomized: bool = False,
        n_iter: int = 5,
        seed: int = 1,
        row_weights: RowWeights | None = None,
        device: str = "cpu",
    ) -> None:
        if randomized and row_weights is not None:
            raise BadInputError("the randomised SVD baseline does not take row weights")
        self.device = check_device(device)
        self.rank = rank
        self.randomized = randomized
        self.n_iter = n_iter
        self.seed = check_seed(seed)
        self.row_weights = row_weights

    @property
    def method(self) -> str:
        if self.row_weights is not None:
            return "svd-freq"
        return "svd-randomized" if self.randomized else "svd"

    @property
    def label(self) -> str:
        if self.row_weights is not None:
            return "SVD, frequency-weighted"
        return "randomised SVD (original baseline)" if self.randomized else "SVD (exact)"

    def get_config(self) -> dict[str, Any]:
        """Constructor parameters plus ``method`` and ``label`` (JSON-serialisable)."""
        config: dict[str, Any] = {"method": self.method, "label": self.label, "rank": self.rank}
        if self.randomized:
            config.update(n_iter=self.n_iter, seed=self.seed, oversamples=RANDOMIZED_OVERSAMPLES)
        if self.row_weights is not None:
            config["row_weights"] = self.row_weights.describe()
        return config

    def _basis(self, embedding: torch.Tensor) -> torch.Tensor:
        if not self.randomized:
            weights = None if self.row_weights is None else self.row_weights.check(embedding.shape[0])
            weights = None if weights is None else weights.to(embedding.device)
            return top_right_singular_vectors(embedding, self.rank, weights=weights)[0]
        _check_matrix(embedding, self.rank)
        columns = min(self.rank + RANDOMIZED_OVERSAMPLES, *embedding.shape)
        with seeded(self.seed):
            _, values, right = torch.svd_lowrank(embedding.to(torch.float64), q=columns, niter=self.n_iter)
        order = torch.argsort(values, descending=True)[: self.rank]
        return _sign_fix(right[:, order])

    def fit(self, embedding: torch.Tensor, progress: ProgressCallback | None = None) -> CompressedEmbedding:
        """Factorise ``embedding`` (V x D) into codes ``E V_r`` (V x r) and decoder ``V_r^T`` (r x D), computed
        on :attr:`device` and returned on the CPU."""
        started = time.perf_counter()
        embedding = embedding.detach().to("cpu" if self.randomized else self.device)
        basis = self._basis(embedding)
        codes = project(embedding, basis).cpu()
        decoder = basis.T.to(torch.float32).cpu().contiguous()
        elapsed = time.perf_counter() - started
        send(progress, closed_form_progress(elapsed))
        return CompressedEmbedding(
            method=self.method, config=self.get_config(), codes=codes, decoder=decoder, train_seconds=elapsed
        )


# -- registration ------------------------------------------------------------------------------------------
def _exact(rank: int, ratio: float | None, row_weights: RowWeights | None, **options: Any) -> SVDCompressor:
    return SVDCompressor(rank, row_weights=row_weights, **options)


def _randomized(
    rank: int, ratio: float | None, row_weights: RowWeights | None, **options: Any
) -> SVDCompressor:
    return SVDCompressor(rank, randomized=True, **options)


SVD = register_method(
    MethodSpec(
        id="svd",
        label="SVD (exact)",
        family="svd",
        sizing="rank",
        factory=_exact,
        stores=("codes", "decoder"),
        options=("device",),
        description="Truncated SVD, not mean-centred: the Euclidean optimum at each rank (the paper's baseline).",
    )
)
SVD_RANDOMIZED = register_method(
    MethodSpec(
        id="svd-randomized",
        label="randomised SVD (original baseline)",
        family="svd",
        sizing="rank",
        factory=_randomized,
        stores=("codes", "decoder"),
        options=("n_iter", "seed"),
        config_keys=("n_iter", "seed"),
        description="The original code's randomised SVD (power iterations): a weaker baseline, kept for comparison.",
    )
)
SVD_FREQ = register_method(
    MethodSpec(
        id="svd-freq",
        label="SVD, frequency-weighted",
        family="svd",
        sizing="rank",
        factory=_exact,
        stores=("codes", "decoder"),
        needs_row_weights=True,
        options=("device",),
        description="SVD of the rows weighted by token frequency: the basis favours the tokens text uses.",
        fit_seconds=lambda vocab, hidden, size, options: (
            6.0 * matrix_scale(vocab, hidden)
        ),  # measured 5.5-9 s
    )
)
