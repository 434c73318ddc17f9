"""Geometry of a compressed embedding against the original, over the whole vocabulary.

Everything here is blocked: no V x V matrix is ever held in memory, only faiss's search tiles (4,096 x 1,024
similarities). Searches are exact unless exact search is unaffordable (then an approximate index with its
recall against exact measured). Results are plain numpy arrays, so the app, the CLI and the exports all
share them.

* :func:`reconstruction_angles` -- per-token angle between each original row and its reconstruction.
* :func:`nearest_neighbours` -- exact top-k cosine neighbours (full dimension, full vocabulary). A low-rank
  variant is searched through its r-dimensional factors, which gives the same cosines as the dense
  reconstruction at a fraction of the cost.
* :func:`recall_at_k`, :func:`neighbour_comparison` -- how much of each token's neighbourhood survives;
  :func:`sampled_recall` -- the same measured on a random sample of tokens, with its standard error.
* :func:`token_classes`, :func:`frequency_bands` -- labels to split every figure by.
* :func:`summary` -- the JSON-ready numbers behind the figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any, Literal, NamedTuple, TypeGuard

import numpy as np
import torch

from embviz.cache import (
    cached_arrays,
    config_key,
    matrix_fingerprint,
    optional_cache_dir,
    sha256_bytes,
)
from embviz.compressors.base import CompressedEmbedding
from embviz.corpora import load_texts
from embviz.errors import BadInputError
from embviz.progress import Progress, ProgressCallback, send
from embviz.resources import SEARCH_TILE, neighbour_memory, reserve_memory

logger = logging.getLogger(__name__)

Matrix = torch.Tensor | np.ndarray
MatrixLike = Matrix | CompressedEmbedding
NeighbourMethod = Literal["auto", "factors", "dense"]
SearchKind = Literal["auto", "exact", "approximate"]

MAX_BLOCK_ROWS = 4096
EXACT_SEARCH_FLOPS = 2e13
"""Under ``search="auto"`` a neighbour search whose exact cost (``2 x queries x keys x width`` flops) is above
this uses an approximate index: about 5 minutes at the ~70 Gflop/s faiss reaches on the 2-core reference
machine. SmolLM2's full dense table is 2.8e12 (exact); a 128k x 2048 matrix's is 6.7e13 (approximate)."""
SEARCH_TARGET_RECALL = 0.99
"""The recall@k against exact search an approximate index is tuned to (on a calibration sample)."""
SEARCH_QUERY_ROWS = SEARCH_TILE[0]
"""Fewest queries per faiss call: its brute-force search runs several times slower per query on smaller
blocks (8,192 queries of a 64,000 x 72 factor table: 3.07 s in blocks of 1,032 rows, 0.53 s in blocks of
4,096, 2 threads). Its own tiles bound the memory, so this costs only the block's results."""
SEARCH_CHECK_SAMPLE = 1024
"""Tokens on which an approximate table's recall against exact search is measured (apart from calibration)."""
_CACHE_VERSION = 1  # bump when a cached table's layout or meaning changes


# -- small helpers -----------------------------------------------------------------------------------------
def as_float_matrix(matrix: Matrix) -> torch.Tensor:
    """A 2-D tensor or array as a detached float32 tensor.

    Raises:
        BadInputError: not 2-D.
    """
    tensor = torch.from_numpy(np.asarray(matrix)) if isinstance(matrix, np.ndarray) else matrix
    if tensor.ndim != 2:
        raise BadInputError(f"expected a 2-D matrix, got shape {tuple(tensor.shape)}")
    return tensor.detach().float()


def _shape(matrix: MatrixLike) -> tuple[int, int]:
    return tuple(matrix.shape)


def _rows(matrix: MatrixLike, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a matrix or of a compressed variant's reconstruction, float32."""
    if isinstance(matrix, CompressedEmbedding):
        return matrix.reconstruct(slice(start, stop)).detach().float()
    return as_float_matrix(matrix)[start:stop]


def default_block_rows(vocab_size: int) -> int:
    """Query rows per search call: faiss's query tile (:data:`SEARCH_QUERY_ROWS`), or the whole vocabulary
    when smaller. No ``rows x V`` block is ever held (faiss's own tiles bound the memory), and fewer queries
    per call make its search several times slower per query."""
    return int(max(1, min(SEARCH_QUERY_ROWS, vocab_size)))


def variant_fingerprint(matrix: MatrixLike) -> str:
    """A sha256 of what a matrix or variant stores: :func:`embviz.cache.matrix_fingerprint` for a plain
    matrix, else of its codes, decoder, bias, activation or dense rows."""
    if not isinstance(matrix, CompressedEmbedding):
        return matrix_fingerprint(as_float_matrix(matrix))
    digest = hashlib.sha256(f"{matrix.method}:{getattr(matrix, 'decoder_activation', None)}".encode())
    for tensor in (matrix.codes, matrix.decoder, matrix.decoder_bias, matrix.dense):
        if tensor is not None:
            array = np.ascontiguousarray(tensor.detach().float().numpy())
            digest.update(f"{array.shape}".encode())
            digest.update(array.data.cast("B"))
    return digest.hexdigest()


# -- on-disk array cache -----------------------------------------------------------------------------------
# -- angles ------------------------------------------------------------------------------------------------
class Angles(NamedTuple):
    """Per-token reconstruction geometry (length-V float64 arrays)."""

    degrees: np.ndarray
    """Angle between original row and reconstruction, in degrees; nan where either row is zero."""
    norm_ratio: np.ndarray
    """``||x^|| / ||x||``; nan where the original row is zero."""


def reconstruction_angles(
    original: Matrix, compressed: MatrixLike, block_rows: int = MAX_BLOCK_ROWS
) -> Angles:
    """Angle (degrees) and norm ratio between every original row and its reconstruction.

    The angle is computed as ``2 asin(||u - v|| / 2)`` on the unit rows (float64), which stays accurate for
    tiny angles where ``acos`` of a cosine near 1 would not.
    """
    original = as_float_matrix(original)
    if _shape(compressed) != tuple(original.shape):
        raise BadInputError(f"shapes differ: {tuple(original.shape)} vs {_shape(compressed)}")
    vocab = original.shape[0]
    degrees, ratio = np.empty(vocab), np.empty(vocab)
    for start in range(0, vocab, block_rows):
        stop = min(start + block_rows, vocab)
        x, y = original[start:stop].double(), _rows(compressed, start, stop).double()
        nx, ny = x.norm(dim=1, keepdim=True), y.norm(dim=1, keepdim=True)
        chord = (x / nx - y / ny).norm(dim=1)
        angle = torch.rad2deg(2 * torch.asin((chord / 2).clamp(0, 1)))
        angle[(nx.squeeze(1) == 0) | (ny.squeeze(1) == 0)] = math.nan
        degrees[start:stop] = angle.numpy()
        ratio[start:stop] = torch.where(nx > 0, ny / nx, math.nan).squeeze(1).numpy()
    return Angles(degrees, ratio)


# -- nearest neighbours ------------------------------------------------------------------------------------
def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length; zero rows stay zero (cosine 0 with everything)."""
    norms = rows.norm(dim=1, keepdim=True)
    return rows / torch.where(norms > 0, norms, 1.0)


def is_linear_low_rank(matrix: MatrixLike) -> TypeGuard[CompressedEmbedding]:
    """Whether ``matrix`` is a compressed variant whose rows are exactly ``codes @ decoder (+ bias)``."""
    return (
        isinstance(matrix, CompressedEmbedding)
        and matrix.low_rank
        and getattr(matrix, "decoder_activation", None) is None
    )


def _augmented_factors(compressed: CompressedEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, M)`` in float64 with ``C @ M`` the reconstruction: the bias becomes a column of ones and a row."""
    if not is_linear_low_rank(compressed):
        raise BadInputError(f"{compressed.label} has no linear factors (dense rows or a non-linear decoder)")
    codes, factor = compressed.factors()
    codes, factor = codes.detach().double(), factor.detach().double()
    if compressed.decoder_bias is not None:
        codes = torch.cat([codes, torch.ones(codes.shape[0], 1, dtype=codes.dtype)], dim=1)
        factor = torch.cat([factor, compressed.decoder_bias.detach().double().reshape(1, -1)], dim=0)
    return codes, factor


def factor_embedding(compressed: CompressedEmbedding) -> torch.Tensor:
    """V x (r+1) rows ``Y`` with ``Y Y^T`` equal to the Gram matrix of the reconstruction (float64).

    The reconstruction is ``[codes, 1] @ [[decoder], [bias]] = C M``, so its Gram matrix is
    ``C (M M^T) C^T``. Factoring the small ``M M^T = Q diag(w) Q^T`` gives ``Y = C Q diag(sqrt(w))``: the
    same inner products, hence the same cosines, from r+1 instead of D columns. ``eigh`` rather than
    Cholesky so a rank-deficient ``M`` (e.g. a bias inside the decoder's row space) is fine.
    """
    codes, factor = _augmented_factors(compressed)
    eigenvalues, eigenvectors = torch.linalg.eigh(factor @ factor.T)
    return codes @ (eigenvectors * eigenvalues.clamp(min=0).sqrt())


def _factor_variant(matrix: MatrixLike, method: NeighbourMethod) -> CompressedEmbedding | None:
    """``matrix`` when a neighbour search goes through its factors (per ``method``), else None."""
    if method == "dense":
        return None
    if method == "factors":
        if not is_linear_low_rank(matrix):
            raise BadInputError("method='factors' needs a linear low-rank CompressedEmbedding")
        return matrix
    if is_linear_low_rank(matrix) and (matrix.rank or 0) + 1 < matrix.shape[1]:
        return matrix
    return None


def _dense_unit_rows(matrix: MatrixLike, block_rows: int) -> torch.Tensor:
    """Float32 unit rows, filled block by block (one V x D copy, not a list of blocks and their concatenation)."""
    vocab, hidden = _shape(matrix)
    unit = torch.empty(vocab, hidden, dtype=torch.float32)
    for start in range(0, vocab, block_rows):
        stop = min(start + block_rows, vocab)
        unit[start:stop] = _unit_rows(_rows(matrix, start, stop))
    return unit


def _exact_inner_product_topk(queries: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries @ keys.T`` per row (faiss's brute-force search: BLAS products in cache-sized
    tiles with a fused heap, 1.6x faster than a torch product plus ``topk`` at one thread on SmolLM2's
    49k x 65 factors, and memory-bounded by its tiles). Runs on this thread's torch thread count."""
    import faiss  # imported here: its import loads its own OpenMP and BLAS

    # faiss has its own OpenMP runtime, whose thread count is per calling thread: follow torch's choice.
    faiss.omp_set_num_threads(torch.get_num_threads())
    scores, indices = faiss.knn(queries, keys, k, metric=faiss.METRIC_INNER_PRODUCT)
    return indices, scores


def _drop_own_ids(
    found: np.ndarray, similarity: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Of k+1 results per query, drop the query's own id wherever it ranks (an exact duplicate row may
    outrank it), else the last."""
    own = found == ids[:, None]
    own[~own.any(axis=1), -1] = True  # not found among k+1: drop the last instead
    keep = np.argsort(own, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(found, keep, axis=1), np.take_along_axis(similarity, keep, axis=1)


BlockSearch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""``search(query_rows, wanted) -> (ids, scores)``: the top ``wanted`` keys of each query row."""


def _blocked_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    exclude_self: bool,
    block_rows: int,
    query_ids: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    search_block: BlockSearch | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``queries @ keys.T`` row by row, ``block_rows`` queries at a time (for progress): exact, or
    through ``search_block`` (an approximate index over the same keys).

    With ``exclude_self`` each query's own key (query i is key ``query_ids[i]``, default i) is dropped: k+1
    are found and that key removed wherever it ranks (an exact duplicate row may outrank it), else the last.
    """
    count = queries.shape[0]
    query_rows = np.ascontiguousarray(queries.detach().float().numpy())
    key_rows = np.ascontiguousarray(keys.detach().float().numpy())
    wanted = k + 1 if exclude_self else k
    indices = np.empty((count, k), dtype=np.int32)
    scores = np.empty((count, k), dtype=np.float32)
    for start in range(0, count, block_rows):
        stop = min(start + block_rows, count)
        block = query_rows[start:stop]
        if search_block is None:
            found, similarity = _exact_inner_product_topk(block, key_rows, wanted)
        else:
            found, similarity = search_block(block, wanted)
            short = (found < 0).any(axis=1)  # an index that found fewer than wanted: exact for those rows
            if short.any():
                found[short], similarity[short] = _exact_inner_product_topk(block[short], key_rows, wanted)
        if exclude_self:
            ids = np.arange(start, stop) if query_ids is None else query_ids[start:stop]
            found, similarity = _drop_own_ids(found, similarity, ids, k)
        indices[start:stop] = found
        scores[start:stop] = similarity
        send(progress, Progress(stop, count, f"nearest neighbours of {stop:,} of {count:,} rows"))
    return indices, scores


# -- approximate search ------------------------------------------------------------------------------------
def exact_search_flops(queries: int, keys: int, width: int) -> float:
    """Floating-point operations of an exact search: one multiply-add per query, key and dimension."""
    return 2.0 * queries * keys * width


def use_exact_search(queries: int, keys: int, width: int, search: SearchKind = "auto") -> bool:
    """Whether a search runs exactly: always for ``"exact"``, never for ``"approximate"``, and for ``"auto"``
    while its cost stays within :data:`EXACT_SEARCH_FLOPS` (exact is the default wherever it is affordable)."""
    if search not in ("auto", "exact", "approximate"):
        raise BadInputError(f"unknown neighbour search {search!r}; use auto, exact or approximate")
    if search == "auto":
        return exact_search_flops(queries, keys, width) <= EXACT_SEARCH_FLOPS
    return search == "exact"


class SearchQuality(NamedTuple):
    """How an approximate neighbour table was found, and its recall@k against exact search on random tokens
    apart from those the index was tuned on."""

    method: str
    recall: RecallEstimate

    def describe(self, k: int | None = None) -> str:
        """One line for a caption: the index and its measured recall with the 95% margin."""
        at = f"@{k}" if k else ""
        return (
            f"approximate neighbours ({self.method}): recall{at} against exact search "
            f"{self.recall.mean:.3f} ± {self.recall.margin:.3f} on {len(self.recall.ids):,} random tokens"
        )


class ReducedSearch:
    """A faiss index that searches the keys' top principal directions exactly (BLAS products, like the exact
    search but over ``dims`` instead of D columns), then re-ranks ``k_factor x wanted`` candidates per query
    by their exact full-width similarity (``index_factory("PCA<dims>,Flat,RFlat")``, inner product).

    ``dims`` and ``k_factor`` are tuned on a calibration sample of queries until recall@k against exact
    search reaches :data:`SEARCH_TARGET_RECALL`: from D/8 directions and 4x candidates, more candidates
    first (cheap), then more directions, up to D/2 (beyond which exact search costs little more). Measured
    on a 64,000 x 2,048 synthetic matrix: 256 directions and 8x candidates gave recall 0.995 in about 24 s
    where the exact table takes about 95 s; an inverted-file index (IVF-Flat) tuned to the same recall was
    slower than exact search (its per-list scans do not use BLAS).
    """

    K_FACTORS = (4, 8, 16)

    def __init__(
        self,
        keys: np.ndarray,
        k: int,
        *,
        exclude_self: bool,
        seed: int = 0,
        calibration: int = 512,
        progress: ProgressCallback | None = None,
    ) -> None:
        count, width = keys.shape
        self.keys = keys
        self.width = width
        rng = np.random.default_rng(seed)
        self.training_ids = np.sort(rng.choice(count, size=min(count, 20_000), replace=False))
        self.calibration_ids = np.sort(rng.choice(count, size=min(count, calibration), replace=False))
        wanted = k + 1 if exclude_self else k
        queries = keys[self.calibration_ids]
        exact, exact_scores = _exact_inner_product_topk(queries, keys, wanted)
        if exclude_self:
            exact, _ = _drop_own_ids(exact, exact_scores, self.calibration_ids, k)
        self.calibration_recall = 0.0
        dims = max(8, width // 8)
        while True:
            self._build(dims, progress)
            for k_factor in self.K_FACTORS:
                self.k_factor = k_factor
                found, scores = self(queries, wanted)
                if exclude_self:
                    found, _ = _drop_own_ids(found, scores, self.calibration_ids, k)
                self.calibration_recall = recall_at_k(exact, found).mean
                send(
                    progress,
                    Progress(0, 1, f"tuning the index: {dims} directions, {k_factor}x candidates, "
                             f"recall {self.calibration_recall:.3f}"),
                )  # fmt: skip
                if self.calibration_recall >= SEARCH_TARGET_RECALL:
                    return
            if 2 * dims > width // 2:
                return
            dims *= 2

    def _build(self, dims: int, progress: ProgressCallback | None) -> None:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        send(progress, Progress(0, 1, f"building an approximate index ({dims} principal directions)"))
        self.dims = dims
        # An IndexRefineFlat (full-width re-rank) around IndexPreTransform(PCA, IndexFlatIP); its k_factor
        # sets the candidates re-ranked per result.
        self.index: Any = faiss.index_factory(self.width, f"PCA{dims},Flat,RFlat", faiss.METRIC_INNER_PRODUCT)
        self.index.train(np.ascontiguousarray(self.keys[self.training_ids]))
        self.index.add(self.keys)

    def __call__(self, queries: np.ndarray, wanted: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        self.index.k_factor = float(self.k_factor)
        scores, found = self.index.search(np.ascontiguousarray(queries), wanted)
        return found.astype(np.int32, copy=False), scores

    @property
    def description(self) -> str:
        return f"faiss PCA{self.dims} + exact re-rank of {self.k_factor}x candidates"


def _estimate(ids: np.ndarray, per_token: np.ndarray, vocab: int) -> RecallEstimate:
    """A :class:`RecallEstimate` from per-token recalls on ``ids`` of ``vocab`` tokens (finite-population
    corrected standard error)."""
    count = len(ids)
    spread = float(per_token.std(ddof=1)) if count > 1 else 0.0
    correction = math.sqrt(max(0.0, (vocab - count) / max(1, vocab - 1)))
    return RecallEstimate(ids, per_token, float(per_token.mean()), spread / math.sqrt(count) * correction)


def _check_against_exact(
    queries: np.ndarray,
    keys: np.ndarray,
    found: np.ndarray,
    k: int,
    *,
    exclude_self: bool,
    query_ids: np.ndarray | None,
    avoid: np.ndarray,
    seed: int = 1,
) -> RecallEstimate:
    """Recall@k of an approximate table ``found`` against exact search on :data:`SEARCH_CHECK_SAMPLE` random
    queries not among ``avoid`` (the calibration sample)."""
    count = queries.shape[0]
    pool = np.setdiff1d(np.arange(count), avoid) if len(avoid) < count else np.arange(count)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(pool, size=min(len(pool), SEARCH_CHECK_SAMPLE), replace=False))
    wanted = k + 1 if exclude_self else k
    exact, scores = _exact_inner_product_topk(queries[picked], keys, wanted)
    if exclude_self:
        own = picked if query_ids is None else query_ids[picked]
        exact, _ = _drop_own_ids(exact, scores, own, k)
    return _estimate(picked, recall_at_k(exact, found[picked]).per_token, count)


def _check_k(k: int, candidates: int) -> None:
    if not 1 <= k <= candidates:
        raise BadInputError(f"k must be between 1 and {candidates} here (the candidate tokens)")


def _search_reservation(
    queries: MatrixLike,
    keys: int,
    k: int,
    block_rows: int,
    factors: CompressedEmbedding | None,
    *,
    separate_keys: bool = True,
    index: bool = False,
    rows: int | None = None,
) -> contextlib.AbstractContextManager[None]:
    """The memory a neighbour search needs, reserved for as long as the block it opens runs (refused with
    :class:`~embviz.errors.ResourceError` when it does not fit); ``factors`` is the variant searched through
    its factors, if it is; ``rows`` the queries when fewer than the matrix's rows."""
    count, width = _shape(queries)
    if factors is not None:
        width = (factors.rank or 0) + 1
    needed = neighbour_memory(
        count,
        width,
        keys,
        k,
        block_rows,
        separate_keys=separate_keys,
        factors=factors is not None,
        index=index,
    )
    return reserve_memory(f"the {k} nearest neighbours of {rows or count:,} tokens among {keys:,}", needed)


class NeighbourSearch(NamedTuple):
    """A top-k table: ids and cosine similarities per row (int32 / float32), and, when an approximate index
    found them, how (``quality``; None for an exact search)."""

    indices: np.ndarray
    scores: np.ndarray
    quality: SearchQuality | None = None


def _search_width(matrix: MatrixLike, factors: CompressedEmbedding | None) -> int:
    return (factors.rank or 0) + 1 if factors is not None else _shape(matrix)[1]


def full_table_is_exact(matrix: MatrixLike, search: SearchKind = "auto") -> bool:
    """Whether the full-vocabulary table of ``matrix`` (through its factors when low-rank) is searched exactly."""
    vocab = _shape(matrix)[0]
    return use_exact_search(vocab, vocab, _search_width(matrix, _factor_variant(matrix, "auto")), search)


def neighbour_search(
    matrix: MatrixLike,
    k: int = 10,
    *,
    method: NeighbourMethod = "auto",
    search: SearchKind = "auto",
    block_rows: int | None = None,
    rows: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
) -> NeighbourSearch:
    """The k nearest neighbours of every row (or of the row ids ``rows`` only, still among the whole
    vocabulary) by cosine similarity, excluding the row itself.

    ``matrix`` is a V x D matrix or a compressed variant. ``method="factors"`` searches a low-rank variant
    through :func:`factor_embedding` (same cosines, r+1 columns); ``"dense"`` reconstructs the rows;
    ``"auto"`` uses factors whenever they are narrower than D (and the decoder is linear).

    ``search="exact"`` compares every pair; ``"approximate"`` uses a :class:`ReducedSearch` index, whose
    recall@k against exact search is measured on :data:`SEARCH_CHECK_SAMPLE` random rows and returned as
    ``quality``; ``"auto"`` (default) is exact unless the exact cost exceeds :data:`EXACT_SEARCH_FLOPS`.
    Each row of the result is sorted by decreasing similarity (order among exact ties is arbitrary); zero
    rows have cosine 0 with everything. ``progress`` counts rows done. Memory is checked before any work.
    """
    vocab = _shape(matrix)[0]
    _check_k(k, vocab - 1)
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (len(rows) and not (rows.min() >= 0 and rows.max() < vocab)):
            raise BadInputError(f"rows must be token ids between 0 and {vocab - 1}")
    block_rows = block_rows or default_block_rows(vocab)
    factors = _factor_variant(matrix, method)
    queries_count = vocab if rows is None else len(rows)
    exact = use_exact_search(queries_count, vocab, _search_width(matrix, factors), search)
    with _search_reservation(
        matrix, vocab, k, block_rows, factors, separate_keys=False, index=not exact, rows=queries_count
    ):
        return _search_all(matrix, k, factors, exact, block_rows, rows, progress)


def _search_all(
    matrix: MatrixLike,
    k: int,
    factors: CompressedEmbedding | None,
    exact: bool,
    block_rows: int,
    rows: np.ndarray | None,
    progress: ProgressCallback | None,
) -> NeighbourSearch:
    """:func:`neighbour_search` once its arguments are checked and its memory reserved."""
    unit = (
        _unit_rows(factor_embedding(factors)).float()
        if factors is not None
        else _dense_unit_rows(matrix, block_rows)
    )
    queries = unit if rows is None else unit[torch.from_numpy(rows)]
    if exact:
        indices, scores = _blocked_topk(
            queries, unit, k, exclude_self=True, block_rows=block_rows, query_ids=rows, progress=progress
        )
        return NeighbourSearch(indices, scores)
    key_rows = np.ascontiguousarray(unit.numpy())
    index = ReducedSearch(key_rows, k, exclude_self=True, progress=progress)
    indices, scores = _blocked_topk(
        queries,
        unit,
        k,
        exclude_self=True,
        block_rows=block_rows,
        query_ids=rows,
        progress=progress,
        search_block=index,
    )
    query_rows = key_rows if rows is None else np.ascontiguousarray(queries.numpy())
    recall = _check_against_exact(
        query_rows,
        key_rows,
        indices,
        k,
        exclude_self=True,
        query_ids=rows,
        avoid=index.calibration_ids if rows is None else np.empty(0, dtype=np.int64),
    )
    return NeighbourSearch(indices, scores, SearchQuality(index.description, recall))


def nearest_neighbours(
    matrix: MatrixLike,
    k: int = 10,
    *,
    method: NeighbourMethod = "auto",
    search: SearchKind = "auto",
    block_rows: int | None = None,
    rows: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`neighbour_search`'s ``(indices, scores)``: V x k (``len(rows)`` x k), int32 and float32.

    Exact unless ``search`` asks otherwise or (``"auto"``) the exact search is unaffordable; use
    :func:`neighbour_search` where a figure must say how close an approximate table is to exact.
    """
    found = neighbour_search(
        matrix, k, method=method, search=search, block_rows=block_rows, rows=rows, progress=progress
    )
    return found.indices, found.scores


def cross_neighbours(
    queries: MatrixLike,
    keys: Matrix,
    k: int,
    *,
    method: NeighbourMethod = "auto",
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For every row of ``queries`` (e.g. a variant), its k most cosine-similar rows of ``keys`` (e.g. the
    original), nothing excluded. Same return convention as :func:`nearest_neighbours`.

    A low-rank ``queries`` is searched through its factors: with the reconstruction ``C M``,
    ``x^_i . x_j = c_i . (M x_j)``, so projecting the keys once by ``M`` turns every product into an
    (r+1)-dimensional one, exactly.
    """
    keys = as_float_matrix(keys)
    _check_k(k, keys.shape[0])
    block_rows = block_rows or default_block_rows(keys.shape[0])
    factors = _factor_variant(queries, method)
    with _search_reservation(queries, keys.shape[0], k, block_rows, factors):
        if factors is not None:
            codes, factor = _augmented_factors(factors)
            norms = factor_embedding(factors).norm(dim=1, keepdim=True)
            query_rows = (codes / torch.where(norms > 0, norms, 1.0)).float()
            key_norms = keys.double().norm(dim=1, keepdim=True)
            key_rows = ((keys.double() @ factor.T) / torch.where(key_norms > 0, key_norms, 1.0)).float()
        else:
            query_rows, key_rows = _dense_unit_rows(queries, block_rows), _unit_rows(keys)
        return _blocked_topk(query_rows, key_rows, k, exclude_self=False, block_rows=block_rows)


def token_neighbours(matrix: Matrix, token_id: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar rows to row ``token_id`` of a V x D matrix, itself excluded: one row of
    :func:`nearest_neighbours` (same ordering, int32 / float32), in one matrix-vector product."""
    matrix = as_float_matrix(matrix)
    vocab = matrix.shape[0]
    _check_k(k, vocab - 1)
    if not 0 <= token_id < vocab:
        raise BadInputError(f"token id {token_id} is outside the vocabulary (0..{vocab - 1})")
    norms = matrix.norm(dim=1)
    query = matrix[token_id] / norms[token_id].clamp_min(torch.finfo(matrix.dtype).tiny)
    similarities = (matrix @ query) / torch.where(norms > 0, norms, 1.0)
    similarities[token_id] = -math.inf
    top = torch.topk(similarities.float(), k)
    return top.indices.numpy().astype(np.int32), top.values.numpy().astype(np.float32)


def _valid_table(vocab: int, k: int, approximate: bool) -> Callable[[dict[str, np.ndarray]], bool]:
    def valid(arrays: dict[str, np.ndarray]) -> bool:
        indices, scores = arrays.get("indices"), arrays.get("scores")
        table_ok = (
            indices is not None
            and scores is not None
            and indices.shape == (vocab, k)
            and scores.shape == (vocab, k)
            and indices.dtype == np.int32
            and scores.dtype == np.float32
            and bool(((indices >= 0) & (indices < vocab)).all())
            and bool(np.isfinite(scores).all())
        )
        if not table_ok or not approximate:
            return table_ok
        check_ids, check_recall = arrays.get("check_ids"), arrays.get("check_recall")
        return (
            arrays.get("search_index") is not None
            and check_ids is not None
            and check_recall is not None
            and check_ids.ndim == 1
            and len(check_ids) > 0
            and check_ids.shape == check_recall.shape
            and bool(((check_ids >= 0) & (check_ids < vocab)).all())
            and bool(((check_recall >= 0) & (check_recall <= 1)).all())
        )

    return valid


def neighbour_table_cached(
    backbone_name: str,
    fingerprint: str | None,
    embedding: MatrixLike,
    k: int = 10,
    *,
    search: SearchKind = "auto",
    progress: ProgressCallback | None = None,
) -> NeighbourSearch:
    """:func:`neighbour_search` of the original matrix (or of a variant), computed once per matrix, k and
    kind of search (``progress`` hears from the computation, when there is one).

    Stored under ``cache_dir("neighbours")`` keyed by ``fingerprint`` (a hash of ``embedding``;
    :func:`variant_fingerprint` when None) and k; an approximate table keeps its index description and its
    measured recall against exact search beside it. A corrupt or mismatched file is recomputed.
    """
    vocab = _shape(embedding)[0]
    exact = full_table_is_exact(embedding, search)
    fingerprint = fingerprint or variant_fingerprint(embedding)
    settings: dict[str, Any] = {
        "v": _CACHE_VERSION,
        "fingerprint": fingerprint,
        "k": k,
        "shape": _shape(embedding),
    }
    if not exact:  # exact tables keep the keys they always had
        settings["search"] = "approximate"
    folder = optional_cache_dir("neighbours")
    path = folder / f"{file_safe_name(backbone_name)}-k{k}-{config_key(settings)}.npz" if folder else None

    def compute() -> dict[str, np.ndarray]:
        found = neighbour_search(embedding, k, search="exact" if exact else "approximate", progress=progress)
        arrays = {"indices": found.indices, "scores": found.scores}
        if found.quality is not None:
            arrays.update(
                search_index=np.array(found.quality.method),
                check_ids=found.quality.recall.ids.astype(np.int64),
                check_recall=found.quality.recall.per_token.astype(np.float64),
            )
        return arrays

    arrays = cached_arrays(path, compute, _valid_table(vocab, k, approximate=not exact))
    quality = None
    if not exact:
        ids, per_token = arrays["check_ids"], arrays["check_recall"]
        quality = SearchQuality(str(arrays["search_index"]), _estimate(ids, per_token, vocab))
    return NeighbourSearch(arrays["indices"], arrays["scores"], quality)


def file_safe_name(name: str) -> str:
    """``name`` reduced to a short string that is safe as part of a file name (never empty, ``.`` or ``..``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60] or "matrix"


class Recall(NamedTuple):
    """Neighbour recall: per-token fraction of the original top-k kept by the variant, and its mean."""

    per_token: np.ndarray
    mean: float


def recall_at_k(original: np.ndarray, variant: np.ndarray, block_rows: int = 8192) -> Recall:
    """``|top-k(original) ∩ top-k(variant)| / k`` for every token (two V x k index tables)."""
    if original.shape != variant.shape:
        raise BadInputError(f"neighbour tables differ in shape: {original.shape} vs {variant.shape}")
    vocab, k = original.shape
    recall = np.empty(vocab, dtype=np.float64)
    for start in range(0, vocab, block_rows):
        a, b = original[start : start + block_rows], variant[start : start + block_rows]
        # Indices within a row are distinct, so counting pairwise matches counts the intersection.
        recall[start : start + len(a)] = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1) / k
    return Recall(recall, float(recall.mean()) if vocab else math.nan)


class RecallEstimate(NamedTuple):
    """Recall@k measured exactly on a seeded random sample of tokens (each one's neighbours searched over the
    whole vocabulary): per sampled token, the mean and the standard error of that mean."""

    ids: np.ndarray
    per_token: np.ndarray
    mean: float
    standard_error: float

    @property
    def margin(self) -> float:
        """Half-width of the 95% confidence interval of the mean (normal approximation)."""
        return 1.96 * self.standard_error


RECALL_SAMPLE = 2048
"""Tokens a :func:`sampled_recall` draws by default: a 95% margin near +-0.01 on SmolLM2's variants, in a
twenty-fourth of the full table's time."""


def sampled_recall(
    original: np.ndarray,
    variant: MatrixLike,
    sample: int = RECALL_SAMPLE,
    *,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> RecallEstimate:
    """Recall@k of ``variant`` against the original's full V x k table on ``sample`` random tokens (seeded,
    without replacement): a first answer while the full table is computed.

    The standard error includes the finite-population correction, so it is 0 when every token is sampled.
    """
    vocab, k = original.shape
    if _shape(variant)[0] != vocab:
        raise BadInputError(f"variant has {_shape(variant)[0]} rows, the original's table {vocab}")
    count = min(max(1, sample), vocab)
    ids = np.sort(np.random.default_rng(seed).choice(vocab, size=count, replace=False))
    found, _ = nearest_neighbours(variant, k, search="exact", rows=ids, progress=progress)
    per_token = recall_at_k(original[ids], found).per_token
    return _estimate(ids, per_token, vocab)


def neighbour_comparison(
    original_indices: np.ndarray,
    original_scores: np.ndarray,
    variant_indices: np.ndarray,
    variant_scores: np.ndarray,
    token_id: int,
    tokens: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per neighbour of ``token_id`` in either top-k, marked ``kept`` / ``lost`` / ``new``.

    Rows follow the original's ranking (each neighbour ``kept`` if the variant also has it, else ``lost``),
    then the variant's ``new`` neighbours in its ranking. Ranks are 1-based; a rank or score is None where
    the token is not in that top-k.
    """
    original = [int(i) for i in original_indices[token_id]]
    variant = [int(i) for i in variant_indices[token_id]]
    variant_rank = {t: r for r, t in enumerate(variant)}
    original_rank = {t: r for r, t in enumerate(original)}

    def row(token: int, status: str) -> dict[str, Any]:
        o, v = original_rank.get(token), variant_rank.get(token)
        entry: dict[str, Any] = {
            "token_id": token,
            "status": status,
            "original_rank": None if o is None else o + 1,
            "original_score": None if o is None else float(original_scores[token_id, o]),
            "variant_rank": None if v is None else v + 1,
            "variant_score": None if v is None else float(variant_scores[token_id, v]),
        }
        if tokens is not None:
            entry["token"] = tokens[token]
        return entry

    rows = [row(t, "kept" if t in variant_rank else "lost") for t in original]
    return rows + [row(t, "new") for t in variant if t not in original_rank]


# -- token classes -----------------------------------------------------------------------------------------
TOKEN_CLASSES: tuple[str, ...] = ("special", "byte", "digits", "punctuation", "non-latin", "subword", "word")
Convention = Literal["wordpiece", "byte-bpe", "sentencepiece", "plain"]

_SPECIAL_PATTERN = re.compile(r"^(\[unused\d+\]|<\|[^|]*\|>)$")
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted (printable character -> byte)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


def detect_convention(tokens: Sequence[str]) -> Convention:
    """Which sub-word convention a vocabulary uses, from its token strings.

    ``##`` continuation pieces mean WordPiece (BERT); ``Ġ`` word-start pieces mean byte-level BPE (GPT-2,
    Llama-3, SmolLM2); ``▁`` word-start pieces mean SentencePiece (T5, Llama-2). The marker has to start at
    least 1% of the tokens; otherwise every token is read as plain text.
    """
    threshold = max(1, len(tokens) // 100)
    markers: tuple[tuple[str, Convention], ...] = (
        ("##", "wordpiece"),
        ("Ġ", "byte-bpe"),
        ("▁", "sentencepiece"),
    )
    for prefix, convention in markers:
        if sum(token.startswith(prefix) for token in tokens) >= threshold:
            return convention
    return "plain"


def _surface(token: str, convention: Convention) -> tuple[str | None, bool]:
    """``(text, word_start)``: the token's text without its marker, or None for an undecodable byte piece."""
    if convention == "wordpiece":
        return (token[2:], False) if token.startswith("##") and len(token) > 2 else (token, True)
    if convention == "sentencepiece":
        return (token[1:], True) if token.startswith("▁") else (token, False)
    if convention == "byte-bpe":
        table = _byte_decoder()
        if all(char in table for char in token):
            try:
                token = bytes(table[char] for char in token).decode("utf-8")
            except UnicodeDecodeError:
                return None, False  # part of a multi-byte character
        return (token[1:], True) if token.startswith(" ") else (token, False)
    return token, True


def _classify(text: str | None, word_start: bool) -> str:
    if not text or not text.isprintable() or text.isspace():
        return "byte"
    letters = [char for char in text if char.isalpha()]
    if not letters:
        return "digits" if any(char.isdigit() for char in text) else "punctuation"
    if any(not unicodedata.name(char, "").startswith("LATIN") for char in letters):
        return "non-latin"
    return "word" if word_start else "subword"


def token_classes(
    tokens: Sequence[str],
    special_ids: Iterable[int] = (),
    convention: Convention | None = None,
) -> np.ndarray:
    """A class label (one of :data:`TOKEN_CLASSES`) for every token, as a numpy string array.

    Rules, first match wins:

    1. ``special`` -- the id is in ``special_ids`` (see :func:`embviz.backbones.reserved_token_ids`), or the token looks
       reserved (``[unused7]``, ``<|x|>``).
    2. ``byte`` -- a byte piece: ``<0x0A>`` byte fallback, a byte-level piece that is not whole UTF-8 (part
       of a multi-byte character), or nothing printable left after the word marker (``Ġ`` alone,
       whitespace, control characters).
    3. ``digits`` -- no letter but at least one digit (``42``, ``1,200``, ``3.5``).
    4. ``punctuation`` -- no letter and no digit (punctuation and symbols).
    5. ``non-latin`` -- has a letter outside the Latin script (Cyrillic, Greek, CJK, ...).
    6. ``subword`` -- a continuation piece: ``##x`` in WordPiece; in byte-level BPE and SentencePiece a
       piece *without* the word-start marker (``Ġ`` / ``▁``). So a word at the very start of a text with no
       leading space counts as a subword there: the vocabulary cannot tell the two apart.
    7. ``word`` -- everything else: a word-start piece with Latin letters.

    ``convention`` is detected from the tokens when None (:func:`detect_convention`).
    """
    convention = convention or detect_convention(tokens)
    special = set(special_ids)
    labels = []
    for token_id, token in enumerate(tokens):
        if token_id in special or _SPECIAL_PATTERN.match(token):
            labels.append("special")
        elif _BYTE_FALLBACK.match(token):
            labels.append("byte")
        else:
            labels.append(_classify(*_surface(token, convention)))
    return np.array(labels, dtype=f"<U{max(map(len, TOKEN_CLASSES))}")


# -- frequency bands ---------------------------------------------------------------------------------------
FREQUENCY_BANDS: tuple[str, ...] = ("unseen", "rare", "medium", "frequent")
BAND_QUANTILES: tuple[float, float] = (0.5, 0.9)


def token_frequencies(
    tokenizer: Any, texts: Iterable[str], vocab_size: int | None = None, batch_size: int = 1000
) -> np.ndarray:
    """How often each token id occurs when ``texts`` are tokenized (no special tokens added), int64."""
    vocab_size = vocab_size or len(tokenizer)
    counts = np.zeros(vocab_size, dtype=np.int64)
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"]
        ids = np.fromiter((i for row in encoded for i in row), dtype=np.int64)
        counts += np.bincount(ids[ids < vocab_size], minlength=vocab_size)
    return counts


def line_break_ids(tokenizer: Any, vocab_size: int) -> list[int]:
    """The token ids of one line break (none where the tokenizer treats it as whitespace, as BERT's does)."""
    return [i for i in tokenizer("\n", add_special_tokens=False)["input_ids"] if i < vocab_size]


def corpus_frequencies(
    tokenizer: Any, tokens: Sequence[str], corpus: str = "bible", split: str = "train"
) -> np.ndarray:
    """How often each token occurs in a named corpus split read as a model reads it, cached per vocabulary and
    corpus slice: :func:`token_frequencies` of its units (verses, paragraphs) plus one line break per join,
    since every text given to a model, and the perplexity protocol, joins the units with line breaks.
    Counting the units alone left the line break, 1-3% of the tokens of every scored text, uncounted."""
    vocab_hash = sha256_bytes("\x00".join(tokens).encode())
    key = config_key(
        {"v": _CACHE_VERSION, "vocab": vocab_hash, "corpus": corpus, "split": split, "joined_by": "\n"}
    )
    folder = optional_cache_dir("frequencies")
    path = folder / f"{file_safe_name(corpus)}-{split}-{key}.npz" if folder else None

    def compute() -> dict[str, np.ndarray]:
        texts = load_texts(corpus, split)
        counts = token_frequencies(tokenizer, texts, len(tokens))
        np.add.at(counts, line_break_ids(tokenizer, len(tokens)), max(0, len(texts) - 1))
        return {"counts": counts}

    def valid(arrays: dict[str, np.ndarray]) -> bool:
        counts = arrays.get("counts")
        return counts is not None and counts.shape == (len(tokens),) and bool((counts >= 0).all())

    return cached_arrays(path, compute, valid)["counts"]


def frequency_thresholds(
    counts: np.ndarray, quantiles: tuple[float, float] = BAND_QUANTILES
) -> tuple[float, float]:
    """The count thresholds between rare / medium / frequent: quantiles of the counts of *seen* tokens."""
    seen = counts[counts > 0]
    if seen.size == 0:
        return (math.inf, math.inf)
    low, high = np.quantile(seen, quantiles)
    return float(low), float(high)


def frequency_bands(counts: np.ndarray, quantiles: tuple[float, float] = BAND_QUANTILES) -> np.ndarray:
    """A band (one of :data:`FREQUENCY_BANDS`) per token from its corpus count.

    ``unseen``: count 0. Among seen tokens, with ``(q_lo, q_hi)`` the 50th and 90th percentiles of their
    counts (:func:`frequency_thresholds`): ``rare`` if count <= q_lo, ``medium`` if <= q_hi, else
    ``frequent`` (so roughly the top tenth of seen tokens are frequent; ties at a threshold go to the lower
    band).
    """
    low, high = frequency_thresholds(counts, quantiles)
    band = np.where(counts <= 0, 0, np.where(counts <= low, 1, np.where(counts <= high, 2, 3)))
    return np.asarray(FREQUENCY_BANDS)[band]


# -- summary -----------------------------------------------------------------------------------------------
def _stat(values: np.ndarray, reduce: Callable[[np.ndarray], Any]) -> float | None:
    values = values[~np.isnan(values)]
    return round(float(reduce(values)), 6) if values.size else None


def _stats(angles: np.ndarray, norm_ratio: np.ndarray, recall: np.ndarray | None) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "count": int(angles.size),
        "mean_angle": _stat(angles, np.mean),
        "median_angle": _stat(angles, np.median),
        "mean_norm_ratio": _stat(norm_ratio, np.mean),
    }
    if recall is not None:
        stats["recall"] = _stat(recall, np.mean)
    return stats


def summary(
    angles: np.ndarray,
    norm_ratio: np.ndarray,
    recall: np.ndarray | None = None,
    groups: dict[str, np.ndarray] | None = None,
    **facts: Any,
) -> dict[str, Any]:
    """JSON-ready numbers for one variant: overall and per group label (e.g. token class, frequency band).

    ``groups`` maps a grouping name to a per-token label array; each gets ``{label: stats}`` with count,
    mean and median angle (degrees), mean norm ratio and mean recall. NaN angles (zero rows) are left out of
    the statistics; an empty statistic is None. ``facts`` (e.g. ``k=10, method="svd"``) are copied in.
    """
    result: dict[str, Any] = {**facts, **_stats(angles, norm_ratio, recall)}
    for name, labels in (groups or {}).items():
        result[f"by_{name}"] = {
            str(label): _stats(
                angles[labels == label],
                norm_ratio[labels == label],
                None if recall is None else recall[labels == label],
            )
            for label in dict.fromkeys(labels.tolist())
        }
    return result


__all__ = [
    "EXACT_SEARCH_FLOPS",
    "FREQUENCY_BANDS",
    "RECALL_SAMPLE",
    "SEARCH_CHECK_SAMPLE",
    "SEARCH_TARGET_RECALL",
    "TOKEN_CLASSES",
    "Angles",
    "NeighbourSearch",
    "Recall",
    "RecallEstimate",
    "ReducedSearch",
    "SearchKind",
    "SearchQuality",
    "as_float_matrix",
    "corpus_frequencies",
    "cross_neighbours",
    "default_block_rows",
    "detect_convention",
    "exact_search_flops",
    "factor_embedding",
    "file_safe_name",
    "frequency_bands",
    "frequency_thresholds",
    "full_table_is_exact",
    "group_means",
    "is_linear_low_rank",
    "line_break_ids",
    "nearest_neighbours",
    "neighbour_comparison",
    "neighbour_search",
    "neighbour_table_cached",
    "recall_at_k",
    "reconstruction_angles",
    "sampled_recall",
    "summary",
    "token_classes",
    "token_frequencies",
    "token_neighbours",
    "use_exact_search",
    "variant_fingerprint",
]


def group_means(values: np.ndarray, groups: np.ndarray, order: Sequence[str]) -> dict[str, float | None]:
    """The mean of the finite ``values`` in each group of ``order`` (None for a group with none)."""
    values = np.asarray(values, dtype=np.float64)
    means: dict[str, float | None] = {}
    for group in order:
        chosen = values[(groups == group) & np.isfinite(values)]
        means[group] = float(chosen.mean()) if chosen.size else None
    return means
