"""2-D maps of the vocabulary in one shared frame: fitted on the original matrix, reconstructions transformed.

Fitting one map on the original and pushing every reconstruction through the *same* fitted map is what makes
the panels comparable: a token that moves between panels moved because its vector changed, not because a
second fit laid the map out differently.

* :func:`pca_map` -- exact PCA (eigh of the D x D covariance), full vocabulary, well under a second.
* :func:`umap_map` -- UMAP (umap-learn, cosine distance, exact neighbour graphs) fitted on the original,
  each variant placed in it (:func:`place_in_map`, umap's ``transform`` without its Python loops); optionally on a random sample of rows (always including requested ids),
  reported via ``sampled``.
* :func:`projection_map` -- either of them, cached on disk by the full configuration.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any, Literal, cast

import numpy as np
import scipy.sparse
import torch

from embviz.cache import cached_arrays, config_key, optional_cache_dir
from embviz.compressors.base import CompressedEmbedding
from embviz.errors import BadInputError, EmbvizError
from embviz.metrics import (
    Matrix,
    MatrixLike,
    as_float_matrix,
    cross_neighbours,
    file_safe_name,
    is_linear_low_rank,
    nearest_neighbours,
    neighbour_table_cached,
    variant_fingerprint,
)
from embviz.progress import Progress, ProgressCallback, nested, send
from embviz.threads import exit_when_parent_dies, start_at_lower_priority

logger = logging.getLogger(__name__)

ORIGINAL = "original"
MapMethod = Literal["pca", "umap"]

_CACHE_VERSION = 1
_BLOCK_ROWS = 8192
UMAP_NEIGHBOURS = 15
"""UMAP's default ``n_neighbors``: its graph uses each token's top-(``UMAP_NEIGHBOURS`` - 1) table, which a
full-vocabulary map reuses from :func:`~embviz.metrics.neighbour_table_cached` (see :func:`shared_table_width`)."""


def shared_table_width(k: int) -> int:
    """How many columns to search for the original's top-k table so that a full-vocabulary UMAP (top
    ``UMAP_NEIGHBOURS - 1``) finds it cached too: the same search, one table for both (the app's pages)."""
    return max(k, UMAP_NEIGHBOURS - 1)


@dataclass(frozen=True)
class ProjectionMap:
    """2-D coordinates of the same rows in every variant.

    Attributes:
        method: ``pca`` or ``umap``.
        coords: variant name -> ``len(ids) x 2`` float32 coordinates; ``original`` comes first.
        ids: the vocabulary rows the coordinates belong to (all rows unless ``sampled``), sorted.
        vocab_size: rows in the full vocabulary.
        params: the map's parameters (for provenance).
        seconds: time the computation took (as measured when it was computed, even if loaded from cache).
        from_cache: whether this map was loaded from disk.
    """

    method: MapMethod
    coords: dict[str, np.ndarray]
    ids: np.ndarray
    vocab_size: int
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    from_cache: bool = False

    @property
    def sampled(self) -> bool:
        return len(self.ids) < self.vocab_size

    def position(self, token_id: int) -> int | None:
        """The row of ``token_id`` in the coordinate arrays, or None if it was not sampled."""
        row = int(np.searchsorted(self.ids, token_id))
        return row if row < len(self.ids) and self.ids[row] == token_id else None

    def note(self) -> str | None:
        """A sentence for the UI whenever not every token is shown; None for a full map."""
        if not self.sampled:
            return None
        return (
            f"{self.method.upper()} map of {len(self.ids):,} of {self.vocab_size:,} tokens "
            f"(random sample, seed {self.params.get('seed')}; requested tokens always included)"
        )


# -- shared helpers ------------------------------------------------------------------------------------------
def _check_variants(original: Matrix, variants: Mapping[str, MatrixLike]) -> torch.Tensor:
    original = as_float_matrix(original)
    for name, variant in variants.items():
        if name == ORIGINAL:
            raise BadInputError(f"a variant cannot be called {ORIGINAL!r}")
        if tuple(variant.shape) != tuple(original.shape):
            raise BadInputError(
                f"variant {name!r} has shape {tuple(variant.shape)}, not {tuple(original.shape)}"
            )
    return original


def _take(matrix: MatrixLike, ids: np.ndarray | None) -> torch.Tensor:
    """Rows ``ids`` (all rows if None) of a matrix or of a variant's reconstruction, float32."""
    if isinstance(matrix, CompressedEmbedding):
        rows = None if ids is None else torch.from_numpy(ids)
        return matrix.reconstruct(rows).detach().float()
    tensor = as_float_matrix(matrix)
    return tensor if ids is None else tensor[torch.from_numpy(ids)]


def principal_axes(rows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, axes)``: the row mean and the top-``n`` principal axes (D x n), float64, exact.

    Eigen-decomposition of the D x D covariance; each axis' sign is fixed (largest entry positive) so the
    same matrix always gives the same picture.
    """
    # Blocked in float64 (two passes: the mean, then the centred scatter) so memory stays at one block and a
    # D x D matrix, not two float64 copies of every row.
    vocab, hidden = rows.shape
    total = torch.zeros(hidden, dtype=torch.float64)
    for start in range(0, vocab, _BLOCK_ROWS):
        total += rows[start : start + _BLOCK_ROWS].double().sum(dim=0)
    mean = total / max(vocab, 1)
    scatter = torch.zeros(hidden, hidden, dtype=torch.float64)
    for start in range(0, vocab, _BLOCK_ROWS):
        block = rows[start : start + _BLOCK_ROWS].double() - mean
        scatter.addmm_(block.T, block)
    _, eigenvectors = torch.linalg.eigh(scatter)
    axes = eigenvectors[:, -n:].flip(1)
    signs = torch.sign(axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)))
    return mean, axes * signs


def _project(matrix: MatrixLike, mean: torch.Tensor, axes: torch.Tensor) -> np.ndarray:
    """``(rows - mean) @ axes`` for every row; a low-rank variant is projected through its factors."""
    if is_linear_low_rank(matrix):
        offset = -mean if matrix.decoder_bias is None else matrix.decoder_bias.double() - mean
        codes, decoder = matrix.factors()
        return (codes.double() @ (decoder.double() @ axes) + offset @ axes).float().numpy()
    vocab = matrix.shape[0]
    blocks = [
        (_take(matrix, np.arange(s, min(s + _BLOCK_ROWS, vocab))).double() - mean) @ axes
        for s in range(0, vocab, _BLOCK_ROWS)
    ]
    return torch.cat(blocks).float().numpy()


def sample_ids(vocab_size: int, sample: int | None, seed: int, include: Iterable[int] = ()) -> np.ndarray:
    """Sorted row ids: all rows, or ``sample`` random rows (by ``seed``) plus every id in ``include``."""
    include = np.unique(np.asarray(list(include), dtype=np.int64))
    if include.size and (include.min() < 0 or include.max() >= vocab_size):
        raise BadInputError(f"requested token ids must be in 0..{vocab_size - 1}")
    if sample is None or sample >= vocab_size:
        return np.arange(vocab_size, dtype=np.int64)
    if sample < 2:
        raise BadInputError("a map needs a sample of at least 2 tokens")
    chosen = np.random.default_rng(seed).choice(vocab_size, size=sample, replace=False)
    return np.union1d(chosen, include).astype(np.int64)


def _report(progress: ProgressCallback | None, stage: str, done: float) -> None:
    """A map's progress: ``done`` of 1 at each stage (fit, then one transform per variant)."""
    send(progress, Progress(done, 1.0, stage))


# -- PCA ----------------------------------------------------------------------------------------------------
def pca_map(
    original: Matrix, variants: Mapping[str, MatrixLike], progress: ProgressCallback | None = None
) -> ProjectionMap:
    """Exact 2-D PCA of the original (its own mean and top two axes), every variant in the same frame."""
    started = time.perf_counter()
    original = _check_variants(original, variants)
    _report(progress, "fitting PCA on the original", 0.0)
    mean, axes = principal_axes(original, 2)
    coords = {ORIGINAL: _project(original, mean, axes)}
    for done, (name, variant) in enumerate(variants.items(), start=1):
        coords[name] = _project(variant, mean, axes)
        _report(progress, f"projected {name}", done / len(variants))
    vocab = original.shape[0]
    return ProjectionMap(
        "pca", coords, np.arange(vocab, dtype=np.int64), vocab, {}, time.perf_counter() - started
    )


# -- UMAP ---------------------------------------------------------------------------------------------------
def _cosine_distances(scores: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - scores.astype(np.float32), 0.0, 2.0)


def _subset(matrix: MatrixLike, ids: np.ndarray | None) -> MatrixLike:
    """The rows ``ids`` of a matrix or a variant, keeping a low-rank variant low-rank (shared decoder)."""
    if ids is None:
        return matrix
    if is_linear_low_rank(matrix):
        codes = matrix.factors()[0][torch.from_numpy(ids)]
        return replace(matrix, codes=codes, history=[])
    return _take(matrix, ids)


def _knn_graph(indices: np.ndarray, distances: np.ndarray, width: int) -> scipy.sparse.csr_matrix:
    """A sparse ``len(indices) x width`` matrix holding each row's neighbour distances (explicit zeros kept)."""
    rows, k = indices.shape
    return scipy.sparse.csr_matrix(
        (distances.ravel(), indices.ravel().astype(np.int32), np.arange(0, rows * k + 1, k)),
        shape=(rows, width),
    )


def place_in_map(model: Any, indices: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """New points placed in a fitted precomputed-metric UMAP ``model``, from their neighbours among its
    training rows (``indices``, ``distances``: one row per point, nearest first, ``model.n_neighbors`` wide).

    The same computation as ``model.transform`` on a sparse distance matrix, from umap-learn's own public
    functions, without its two per-row Python loops (over scipy's sparse row indexing: about 10 s per
    49,152 points on one core, a fifth of a cold full-vocabulary map). The coordinates equal ``transform``'s
    (bitwise for SmolLM2's SVD at rank 64; the start positions are summed in umap's order).
    """
    from umap.layouts import optimize_layout_euclidean
    from umap.umap_ import (
        INT32_MAX,
        INT32_MIN,
        compute_membership_strengths,
        find_ab_params,
        make_epochs_per_sample,
        smooth_knn_dist,
    )

    width = int(model.n_neighbors)
    if indices.shape != distances.shape or indices.ndim != 2 or indices.shape[1] < width:
        raise BadInputError(f"place_in_map needs {width} neighbours per point, got shape {indices.shape}")
    indices = np.ascontiguousarray(indices[:, :width], dtype=np.int32)
    distances = np.ascontiguousarray(distances[:, :width], dtype=np.float32)
    embedding = np.asarray(model.embedding_, dtype=np.float32)
    rng_state = np.random.RandomState(model.transform_seed).randint(INT32_MIN, INT32_MAX, 3).astype(np.int64)
    sigmas, rhos = smooth_knn_dist(
        distances, float(width), local_connectivity=max(0.0, float(model.local_connectivity) - 1.0)
    )
    rows, cols, vals, _ = compute_membership_strengths(indices, distances, sigmas, rhos, bipartite=True)
    graph = scipy.sparse.coo_matrix((vals, (rows, cols)), shape=(len(indices), embedding.shape[0]))

    # Start positions (umap's init_graph_transform): each point at the strength-weighted mean of its
    # neighbours', summed in the order of their ids as umap does, or exactly at the first neighbour it is
    # identical to (strength 1); nowhere (NaN) without neighbours.
    by_id = np.argsort(indices, axis=1, kind="stable")
    neighbour_ids = np.take_along_axis(indices, by_id, axis=1)
    strengths = np.take_along_axis(vals.reshape(indices.shape), by_id, axis=1)
    totals = strengths.sum(axis=1, keepdims=True, dtype=np.float32)
    shares = np.divide(strengths, totals, out=np.zeros_like(strengths), where=totals > 0)
    start = np.zeros((len(indices), embedding.shape[1]), dtype=np.float32)
    for column in range(width):
        start += shares[:, column, None] * embedding[neighbour_ids[:, column]]
    identical = strengths == 1
    at_neighbour = identical.any(axis=1)
    start[at_neighbour] = embedding[neighbour_ids[at_neighbour, identical[at_neighbour].argmax(axis=1)]]
    start[totals[:, 0] == 0] = np.nan

    default_epochs = 30 if len(indices) > 10_000 else 100  # umap's transform: a third of n_epochs when set
    epochs = default_epochs if model.n_epochs is None else int(model.n_epochs // 3.0)
    graph.data[graph.data < graph.data.max() / float(epochs)] = 0.0
    graph.eliminate_zeros()
    a, b = (model.a, model.b) if model.a is not None else find_ab_params(model.spread, model.min_dist)
    return np.asarray(
        optimize_layout_euclidean(
            start,
            embedding.copy(),
            graph.row,
            graph.col,
            epochs,
            graph.shape[1],
            make_epochs_per_sample(graph.data, epochs),
            a,
            b,
            rng_state,
            model.repulsion_strength,
            model.learning_rate / 4.0,
            model.negative_sample_rate,
            model.random_state is None,
        ),
        dtype=np.float32,
    )


def umap_map(
    original: Matrix,
    variants: Mapping[str, MatrixLike],
    *,
    n_neighbors: int = UMAP_NEIGHBOURS,
    min_dist: float = 0.1,
    seed: int = 42,
    sample: int | None = None,
    include_ids: Iterable[int] = (),
    original_neighbours: tuple[np.ndarray, np.ndarray] | None = None,
    progress: ProgressCallback | None = None,
) -> ProjectionMap:
    """UMAP fitted on the original's rows by cosine distance, each variant placed in it (:func:`place_in_map`,
    umap's ``transform`` without its Python loops).

    The neighbour graphs are exact (:mod:`embviz.metrics`' blocked search, low-rank variants through their
    factors) and handed to umap-learn as precomputed distances, instead of umap's approximate NN-descent
    search: exact, and about 3x less CPU on SmolLM2's 49k vocabulary (fit + two transforms, 69 vs ~195 s). ``original_neighbours`` may
    pass the original's cached :func:`~embviz.metrics.nearest_neighbours` table (full vocabulary only, at
    least ``n_neighbors - 1`` columns). ``sample`` fits on that many random rows (seeded) plus
    ``include_ids``; the result's ``ids`` / ``sampled`` / ``note()`` say so. The variants' neighbour searches
    (faiss, which releases the GIL) run in a second thread while UMAP fits, which holds it.
    """
    started = time.perf_counter()
    original = _check_variants(original, variants)
    vocab = original.shape[0]
    ids = sample_ids(vocab, sample, seed, include_ids)
    subset = None if len(ids) == vocab else ids
    if len(ids) <= n_neighbors:
        raise BadInputError(f"UMAP with n_neighbors={n_neighbors} needs more than {n_neighbors} tokens")
    steps = 2 + len(variants)
    _report(progress, f"finding the exact {n_neighbors - 1} nearest neighbours of {len(ids):,} tokens", 0.0)
    keys = _take(original, subset)
    if original_neighbours is None or subset is not None or original_neighbours[0].shape[1] < n_neighbors - 1:
        original_neighbours = nearest_neighbours(
            keys, n_neighbors - 1, progress=nested(progress, 0.0, 1 / steps, 1.0)
        )
    neighbours, scores = (table[:, : n_neighbors - 1] for table in original_neighbours)
    # umap-learn's neighbour lists start with the point itself, at distance 0.
    knn_indices = np.hstack([np.arange(len(ids))[:, None], neighbours]).astype(np.int64)
    knn_distances = np.hstack([np.zeros((len(ids), 1), np.float32), _cosine_distances(scores)])
    graph = _knn_graph(knn_indices, knn_distances, len(ids))
    graph = graph.maximum(graph.T).tocsr()  # umap wants a symmetric distance matrix with this metric

    _report(progress, f"fitting UMAP on {len(ids):,} original rows", 1 / steps)
    import umap  # imported here: its import compiles numba code (seconds); only pay that when used

    model = umap.UMAP(
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric="precomputed",
        random_state=seed,
        transform_seed=seed,
        precomputed_knn=(knn_indices, knn_distances),
    )

    def variant_neighbours(variant: MatrixLike) -> tuple[np.ndarray, np.ndarray]:
        found, similarity = cross_neighbours(_subset(variant, subset), keys, n_neighbors)
        return found, _cosine_distances(similarity)

    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=1) as searches:
        warnings.filterwarnings("ignore", message=".*(n_jobs|knn_search_index|precomputed).*")
        found = {name: searches.submit(variant_neighbours, variant) for name, variant in variants.items()}
        coords = {ORIGINAL: model.fit_transform(graph).astype(np.float32)}
        for done, name in enumerate(variants, start=2):
            _report(progress, f"placing {name} in the map", done / steps)
            coords[name] = place_in_map(model, *found[name].result())
    _report(progress, "map ready", 1.0)
    params = {"n_neighbors": n_neighbors, "min_dist": min_dist, "seed": seed, "sample": sample}
    return ProjectionMap("umap", coords, ids, vocab, params, time.perf_counter() - started)


# -- cached entry point -------------------------------------------------------------------------------------
def projection_map(
    method: MapMethod,
    original: Matrix,
    variants: Mapping[str, MatrixLike],
    *,
    backbone_name: str = "matrix",
    fingerprint: str | None = None,
    variant_keys: Mapping[str, str] | None = None,
    progress: ProgressCallback | None = None,
    in_child: bool = False,
    **params: Any,
) -> ProjectionMap:
    """:func:`pca_map` or :func:`umap_map` (``params`` go to it), cached on disk by the full configuration.

    With ``in_child`` a map that is not cached is computed in a child process (:func:`map_in_child`), so a
    server's other threads keep running while UMAP's numba loops hold this process's GIL.

    The key covers the original's ``fingerprint``, one key per variant (``variant_keys``: e.g. artifact
    hashes; default :func:`variant_fingerprint`), the method and its parameters. For a sampled UMAP only the
    requested ids that the seeded sample lacks enter the key, so moving the focus among sampled tokens
    reuses the map.
    """
    if method not in ("pca", "umap"):
        raise BadInputError(f"unknown map method {method!r}; use pca or umap")
    if "include_ids" in params:
        params["include_ids"] = [int(i) for i in params["include_ids"]]
    original = _check_variants(original, variants)
    vocab = original.shape[0]
    settings = _settings(method, original, variants, params)
    keys = dict(variant_keys or {})
    keys.update({n: variant_fingerprint(v) for n, v in variants.items() if n not in keys})
    fingerprint = fingerprint or variant_fingerprint(original)
    key_settings = dict(settings)
    if method == "umap":
        base = set(sample_ids(vocab, settings["sample"], settings["seed"]).tolist())
        key_settings["include_ids"] = sorted(set(map(int, settings["include_ids"])) - base)
    key = config_key(
        {
            "v": _CACHE_VERSION,
            "method": method,
            "original": fingerprint,
            "variants": [[n, keys[n]] for n in variants],
            "settings": key_settings,
        }
    )
    folder = optional_cache_dir("maps")
    path = folder / f"{file_safe_name(backbone_name)}-{method}-{key}.npz" if folder else None
    computed: list[ProjectionMap] = []

    def compute() -> dict[str, np.ndarray]:
        extra: dict[str, Any] = {}
        if method == "umap" and (settings["sample"] is None or settings["sample"] >= vocab):
            # The original's table is cached on its own: a new variant then costs only its own search.
            k = settings["n_neighbors"] - 1  # at the default, the app's table (shared_table_width)
            table = neighbour_table_cached(backbone_name, fingerprint, original, k)
            extra["original_neighbours"] = (table.indices, table.scores)
        if in_child:
            result = map_in_child(method, original, variants, progress=progress, **params, **extra)
        else:
            result = _map_function(method)(original, variants, progress=progress, **params, **extra)
        computed.append(result)
        return _to_arrays(result)

    required = settings.get("include_ids", ())
    arrays = cached_arrays(path, compute, _valid_map([ORIGINAL, *variants], vocab, required))
    return computed[0] if computed else _from_arrays(method, arrays, vocab)


def _map_function(method: MapMethod) -> Callable[..., ProjectionMap]:
    return pca_map if method == "pca" else umap_map


CHILD_NICENESS = 10
"""How much :func:`map_in_child`'s child lowers its scheduling priority (``os.nice``)."""


def map_in_child(
    method: MapMethod,
    original: Matrix,
    variants: Mapping[str, MatrixLike],
    *,
    progress: ProgressCallback | None = None,
    **params: Any,
) -> ProjectionMap:
    """:func:`pca_map` or :func:`umap_map` computed in a spawned child process at this process's torch
    thread count and a lower priority (the page in front of the user comes first); its progress and its map
    come back over a pipe (between two embviz processes; nothing is stored). UMAP's layout loops are numba
    code that holds the GIL for a tenth of a second at a time, which stalled every other thread of the app's
    server while a map was fitted in one of its threads. A progress callback cannot cancel the child.

    Raises:
        BadInputError: bad parameters (checked here, before the child starts).
        EmbvizError: the child ended without a map (its exit code is in the message).
    """
    original = _check_variants(original, variants)
    _settings(method, original, variants, params)
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    arguments = (sender, method, original, dict(variants), params, torch.get_num_threads(), os.getpid())
    child = context.Process(target=_child_map, args=arguments, name=f"embviz-{method}-map", daemon=True)
    start_at_lower_priority(child, CHILD_NICENESS)  # its interpreter start and imports yield too
    sender.close()
    try:
        while True:
            try:
                kind, payload = receiver.recv()
            except EOFError:
                child.join(timeout=5)
                raise EmbvizError(
                    f"the {method} map's process ended without a map (exit code {child.exitcode})"
                ) from None
            if kind == "progress":
                send(progress, payload)
            elif kind == "error":
                raise payload
            else:
                return cast(ProjectionMap, payload)
    finally:
        receiver.close()
        child.join(timeout=5)
        if child.is_alive():
            child.kill()


def _child_map(
    sender: Connection,
    method: MapMethod,
    original: Matrix,
    variants: dict[str, MatrixLike],
    params: dict[str, Any],
    threads: int,
    parent_pid: int,
) -> None:
    """:func:`map_in_child`'s child: compute the map, sending progress, then the map or the error. It runs
    at a lower priority (:data:`CHILD_NICENESS`): a background map yields the cores to interactive work. It
    ends within a second of its parent (the app's server) being killed, instead of mapping on unseen."""
    exit_when_parent_dies(parent_pid)
    with contextlib.suppress(OSError):  # e.g. a platform without nice: the map is just not deprioritised
        os.nice(max(0, CHILD_NICENESS - os.nice(0)))  # started lowered already on Linux
    torch.set_num_threads(threads)
    try:
        result = _map_function(method)(
            original, variants, progress=lambda update: sender.send(("progress", update)), **params
        )
        sender.send(("map", result))
    except Exception as error:  # the parent raises it; an unpicklable one goes as its text
        answer = error if isinstance(error, EmbvizError) else EmbvizError(f"{type(error).__name__}: {error}")
        sender.send(("error", answer))
    finally:
        sender.close()


_SIGNATURES = {"pca": inspect.signature(pca_map), "umap": inspect.signature(umap_map)}


def _settings(
    method: MapMethod, original: torch.Tensor, variants: Mapping[str, MatrixLike], params: dict[str, Any]
) -> dict[str, Any]:
    """The map's full parameter set (defaults filled in), for the cache key; unknown parameters refused."""
    try:
        bound = _SIGNATURES[method].bind(original, variants, **params)
    except TypeError as exc:
        raise BadInputError(f"bad parameters for a {method} map: {exc}") from None
    bound.apply_defaults()
    skip = {"original", "variants", "progress", "original_neighbours"}
    return {name: value for name, value in bound.arguments.items() if name not in skip}


def _to_arrays(result: ProjectionMap) -> dict[str, np.ndarray]:
    arrays = {f"coords_{i}": coords for i, coords in enumerate(result.coords.values())}
    return arrays | {
        "names": np.array(list(result.coords)),
        "ids": result.ids,
        "seconds": np.array(result.seconds),
        "params": np.array(json.dumps(result.params, sort_keys=True, default=str)),
    }


def _from_arrays(method: MapMethod, arrays: dict[str, np.ndarray], vocab: int) -> ProjectionMap:
    coords = {str(name): arrays[f"coords_{i}"] for i, name in enumerate(arrays["names"])}
    params = json.loads(str(arrays["params"]))
    return ProjectionMap(method, coords, arrays["ids"], vocab, params, float(arrays["seconds"]), True)


def _valid_map(
    names: list[str], vocab: int, include_ids: Iterable[int]
) -> Callable[[dict[str, np.ndarray]], bool]:
    required = set(map(int, include_ids))

    def valid(arrays: dict[str, np.ndarray]) -> bool:
        try:
            ids = arrays["ids"]
            if arrays["names"].tolist() != names or ids.ndim != 1 or ids.dtype != np.int64:
                return False
            if ids.size < 2 or ids[0] < 0 or ids[-1] >= vocab or (np.diff(ids) <= 0).any():
                return False
            if not required <= set(ids.tolist()):
                return False
            for i in range(len(names)):
                coords = arrays[f"coords_{i}"]
                if (
                    coords.shape != (ids.size, 2)
                    or coords.dtype != np.float32
                    or not np.isfinite(coords).all()
                ):
                    return False
            json.loads(str(arrays["params"]))
            return arrays["seconds"].shape == ()
        except (KeyError, ValueError, AttributeError):
            return False

    return valid


def neighbourhood_displacement(
    original_xy: np.ndarray, variant_xy: np.ndarray, neighbour_rows: np.ndarray
) -> np.ndarray:
    """How far each point moved on the map relative to its original neighbours, in map units.

    A point's position is taken relative to the centroid of its neighbours (``neighbour_rows``: n x m rows
    into the same point arrays, -1 where a neighbour is not drawn), in the original map and in the variant's;
    the displacement is the distance between the two. A cluster that moves together scores 0; a token that
    leaves its neighbours scores high. NaN for a point with no drawn neighbour.
    """
    rows = np.asarray(neighbour_rows)
    present = rows >= 0
    safe = np.where(present, rows, 0)
    count = present.sum(axis=1, keepdims=True)

    def relative(xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        sums = (xy[safe] * present[..., None]).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return xy - sums / count

    moved = np.linalg.norm(relative(variant_xy) - relative(original_xy), axis=1)
    return np.where(count[:, 0] > 0, moved, np.nan)


def rows_of(ids: np.ndarray, neighbour_ids: np.ndarray) -> np.ndarray:
    """``neighbour_ids`` (token ids) as rows into ``ids`` (the drawn tokens), -1 for tokens not drawn."""
    ids = np.asarray(ids)
    lookup = np.full(int(max(ids.max(initial=0), np.asarray(neighbour_ids).max(initial=0))) + 1, -1, np.int64)
    lookup[ids] = np.arange(len(ids))
    return lookup[np.asarray(neighbour_ids)]


__all__ = [
    "ORIGINAL",
    "ProjectionMap",
    "neighbourhood_displacement",
    "pca_map",
    "principal_axes",
    "projection_map",
    "rows_of",
    "sample_ids",
    "umap_map",
    "variant_fingerprint",
]
