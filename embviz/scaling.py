"""How embviz's cost grows with the vocabulary and the width: synthetic embedding matrices of today's shapes
(V 30k-256k rows, D 576-4096), what each stage needs in memory, and one measured stage at a time.

* :class:`SpectrumProfile` / :func:`synthetic_embedding`: rows that mimic a real embedding's singular-value
  spectrum and spread of row norms (resampled from a packaged matrix), at any shape, deterministically.
* :func:`stage_memory`: the bytes a stage holds beyond the matrix itself, predicted before it starts; the
  scale benchmark refuses a stage whose prediction exceeds the budget, with the numbers.
* :func:`run_stage`: one stage on one matrix (exact SVD, the fast AE, direction VQ, the full-vocabulary
  neighbour table, recall@k of one variant, PCA, the UMAP map), returning what it found.
* :func:`growth_exponents`: the fitted ``seconds ~ V^a D^b`` of each stage from the measured points.

The benchmark stage that drives these in subprocesses (peak memory per stage) is ``embviz bench --stages
scale`` (:mod:`embviz.bench`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embviz.compressors import get_method, make_compressor
from embviz.compressors.base import CompressedEmbedding
from embviz.compressors.weights import DirectionMetric, RowWeights
from embviz.errors import BadInputError
from embviz.metrics import (
    EXACT_SEARCH_FLOPS,
    default_block_rows,
    neighbour_search,
    recall_at_k,
    use_exact_search,
)
from embviz.projections import pca_map, umap_map
from embviz.resources import neighbour_memory

SCALE_VOCABS = (30_000, 64_000, 128_000, 256_000)
SCALE_HIDDENS = (576, 2048, 4096)
SCALE_STAGES = ("svd", "ae", "vq", "neighbours", "recall", "pca", "umap")
"""Stages in the order they run at each shape (``recall`` reuses the ``svd`` variant and ``neighbours``'
table, ``pca`` the ``svd`` variant)."""
MEMORY_BUDGET = 16 * 2**30
"""Peak memory every stage must stay within at every shape, or be refused up front (issue 17)."""
K = 10
UMAP_NEIGHBOURS = 15
TABLE_K = max(K, UMAP_NEIGHBOURS - 1)
"""The original's table holds 14 neighbours per row: recall@10 reads its first 10, UMAP all 14 (as the app)."""
VQ_BITS = 1.0


def scale_rank(hidden: int) -> int:
    """The SVD / AE rank at width D: D / 8 (8x fewer float32 numbers per row, 64 at SmolLM2's 576 ... 512 at
    4096), so every width is compared at the same compression."""
    return max(1, hidden // 8)


# -- synthetic matrices ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpectrumProfile:
    """What a synthetic matrix copies from a real one: its singular values relative to the largest (descending,
    any count), the spread of its row norms relative to their median, and the root mean square entry."""

    singular_values: np.ndarray
    relative_norms: np.ndarray
    entry_rms: float
    source: str

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, source: str) -> SpectrumProfile:
        """The profile of a V x D matrix (exact singular values from its float64 Gram matrix)."""
        rows = matrix.detach().double()
        eigenvalues = torch.linalg.eigvalsh(rows.T @ rows).clamp_min(0).flip(0)
        values = eigenvalues.sqrt().numpy()
        norms = rows.norm(dim=1).numpy()
        median = float(np.median(norms[norms > 0])) if (norms > 0).any() else 1.0
        return cls(
            singular_values=values / max(float(values[0]), 1e-30),
            relative_norms=norms / median,
            entry_rms=float(rows.pow(2).mean().sqrt()),
            source=source,
        )

    def spectrum(self, hidden: int) -> np.ndarray:
        """``hidden`` singular values with this profile's shape: log-interpolated at the same relative
        positions (the k-th of D values sits where the k-th of the source's sat, scaled by D)."""
        source = np.log(np.clip(self.singular_values, 1e-12, None))
        positions = (np.arange(len(source)) + 0.5) / len(source)
        wanted = (np.arange(hidden) + 0.5) / hidden
        return np.exp(np.interp(wanted, positions, source))

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts: the source, its width, and the spread the synthetic rows copy."""
        values, norms = self.singular_values, self.relative_norms
        return {
            "source": self.source,
            "source_singular_values": len(values),
            "top_to_median_singular_value": round(float(values[0] / np.median(values)), 3),
            "row_norm_p5_p95_over_median": [round(float(np.percentile(norms, q)), 3) for q in (5, 95)],
            "entry_rms": round(self.entry_rms, 6),
        }


def synthetic_embedding(
    vocab: int, hidden: int, profile: SpectrumProfile, *, seed: int = 0, block_rows: int = 8192
) -> torch.Tensor:
    """A V x D float32 matrix whose singular values follow ``profile.spectrum(D)`` and whose row norms are
    resampled from the profile's, at the profile's root mean square entry.

    Rows are ``z diag(s) R`` with Gaussian ``z`` (so the columns are near-orthogonal for V >> D) and ``R`` a
    random orthogonal rotation (random signs, an orthonormal DCT, a random column permutation: O(D log D)
    per row instead of a dense D x D product), then each row rescaled to its drawn norm. Deterministic for a
    seed; built in blocks of ``block_rows`` rows, so memory is the result plus one block.
    """
    if vocab < 2 or hidden < 2:
        raise BadInputError(f"a synthetic embedding needs at least 2 x 2, got {vocab} x {hidden}")
    from scipy.fft import dct

    rng = np.random.default_rng(seed)
    spectrum = profile.spectrum(hidden)
    signs = rng.choice(np.array([-1.0, 1.0]), size=hidden)
    permutation = rng.permutation(hidden)
    norms = rng.choice(profile.relative_norms, size=vocab, replace=True)
    # Scale so the mean square entry equals the profile's: sum of squared row norms = V D rms^2.
    norms *= profile.entry_rms * math.sqrt(vocab * hidden / float(np.sum(norms**2)))
    result = torch.empty(vocab, hidden, dtype=torch.float32)
    workers = max(1, torch.get_num_threads())
    for start in range(0, vocab, block_rows):
        stop = min(start + block_rows, vocab)
        block = rng.standard_normal((stop - start, hidden)) * (spectrum * signs)
        block = dct(block, type=2, norm="ortho", axis=1, workers=workers)[:, permutation]
        lengths = np.linalg.norm(block, axis=1)
        block *= (norms[start:stop] / np.where(lengths > 0, lengths, 1.0))[:, None]
        result[start:stop] = torch.from_numpy(block.astype(np.float32))
    return result


# -- memory ------------------------------------------------------------------------------------------------
def stage_memory(stage: str, vocab: int, hidden: int) -> int:
    """Bytes ``stage`` holds at its peak beyond the V x D float32 matrix itself (which the caller holds),
    from what the code allocates; checked against measured peaks by the scale benchmark."""
    matrix = 4 * vocab * hidden
    rank = scale_rank(hidden)
    gram = 8 * hidden * hidden
    block = 8 * 8192 * hidden
    if stage == "svd":  # float64 Gram + eigh workspace, one float64 block, float32 codes
        return 4 * gram + 2 * block + 4 * vocab * rank
    if stage == "ae":  # what the method registry says a fit holds (validation rows, warm start, codes)
        return get_method("ae-paper").memory_to_fit(vocab, hidden, rank)
    # direction VQ: the unit rows in the metric (then the decoded rows), the training sample and faiss's copy
    if stage == "vq":
        sample = 4 * min(2 * vocab, 2**16) * hidden  # faiss trains on at most 256 rows per centroid
        return matrix + 2 * sample + 64 * 2**20
    if stage == "neighbours":
        exact = use_exact_search(vocab, vocab, hidden)
        return neighbour_memory(
            vocab, hidden, vocab, TABLE_K, default_block_rows(vocab), separate_keys=False, index=not exact
        )
    if stage == "recall":  # the variant's factor rows and table, the original's table
        width = rank + 1
        exact = use_exact_search(vocab, vocab, width)
        search = neighbour_memory(
            vocab,
            width,
            vocab,
            K,
            default_block_rows(vocab),
            separate_keys=False,
            factors=True,
            index=not exact,
        )
        return search + 8 * vocab * K + 4 * vocab * rank
    if stage == "pca":  # blocked float64 covariance and projections
        return 4 * gram + 2 * block + 16 * vocab
    if stage == "umap":  # on the neighbours stage's table: umap-learn's graph and layout (~260 B per edge
        # measured at 128k x 576; 400 counted), and the similarity gather of 1,024 rows at a time
        return 400 * vocab * UMAP_NEIGHBOURS + 2 * 4 * 1024 * TABLE_K * hidden + 8 * vocab * TABLE_K
    raise BadInputError(f"unknown scale stage {stage!r}; choose from {', '.join(SCALE_STAGES)}")


def exact_search_seconds(vocab: int, width: int, flops_per_second: float = 7e10) -> float:
    """About how long an exact full-vocabulary search takes at ``flops_per_second`` (faiss on 2 cores)."""
    return 2.0 * vocab * vocab * width / flops_per_second


# -- one stage ---------------------------------------------------------------------------------------------
def _save_variant(folder: Path, compressed: CompressedEmbedding) -> None:
    codes, decoder = compressed.factors()
    np.save(folder / "svd_codes.npy", codes.detach().float().numpy())
    np.save(folder / "svd_decoder.npy", decoder.detach().float().numpy())


def _load_variant(folder: Path) -> CompressedEmbedding:
    codes = torch.from_numpy(np.load(folder / "svd_codes.npy", allow_pickle=False))
    decoder = torch.from_numpy(np.load(folder / "svd_decoder.npy", allow_pickle=False))
    return CompressedEmbedding(
        method="svd", config={"method": "svd", "label": "SVD (exact)", "rank": codes.shape[1]},
        codes=codes, decoder=decoder,
    )  # fmt: skip


def run_stage(stage: str, matrix: torch.Tensor, work: Path) -> dict[str, Any]:
    """Run ``stage`` on ``matrix``; ``work`` holds what later stages reuse (the SVD variant, the original's
    neighbour table). Returns ``seconds`` (the stage alone) and what it found."""
    vocab, hidden = matrix.shape
    rank = scale_rank(hidden)
    facts: dict[str, Any] = {}
    started = time.perf_counter()
    if stage == "svd":
        compressed = make_compressor("svd", rank).fit(matrix)
        seconds = time.perf_counter() - started
        _save_variant(work, compressed)
        facts.update(rank=rank)
    elif stage == "ae":
        fitted = make_compressor("ae-paper", rank, recipe="fast").fit(matrix)
        seconds = time.perf_counter() - started
        facts.update(rank=rank, epochs=len(fitted.history))
    elif stage == "vq":
        uniform = RowWeights(torch.ones(vocab, dtype=torch.float64), source="uniform")
        spec = get_method("vq-direction")
        size = spec.size(vocab, hidden, bits=VQ_BITS)
        metric = DirectionMetric.euclidean(hidden)  # a synthetic matrix has no model to measure a metric on
        fitted = spec.build(size, row_weights=uniform, direction_metric=metric).fit(matrix)
        seconds = time.perf_counter() - started
        facts.update(bits_per_weight=round(fitted.bits_per_weight, 4))
    elif stage == "neighbours":
        found = neighbour_search(matrix, TABLE_K)
        seconds = time.perf_counter() - started
        np.save(work / "original_neighbours.npy", found.indices)
        facts.update(_search_facts(found.quality, vocab, hidden))
    elif stage == "recall":
        variant = _load_variant(work)
        # rows sorted: the top-10 lead
        original = np.load(work / "original_neighbours.npy", allow_pickle=False)[:, :K]
        started = time.perf_counter()  # the original's table is the neighbours stage's (cached, as the app's)
        found = neighbour_search(variant, K)
        recall = recall_at_k(original, found.indices).mean
        seconds = time.perf_counter() - started
        facts.update(recall_at_k=round(recall, 6), variant=f"SVD r={rank} (factors, {rank + 1} columns)")
        facts.update(_search_facts(found.quality, vocab, rank + 1))
    elif stage == "pca":
        variant = _load_variant(work)
        started = time.perf_counter()
        pca_map(matrix, {"SVD": variant})
        seconds = time.perf_counter() - started
    elif stage == "umap":
        original = np.load(work / "original_neighbours.npy", allow_pickle=False)
        similarities = _table_scores(matrix, original[:, : UMAP_NEIGHBOURS - 1])
        warm = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
        umap_map(warm, {})  # numba compiles umap's kernels once per process (the app's server: once)
        started = time.perf_counter()
        umap_map(matrix, {}, n_neighbors=UMAP_NEIGHBOURS, original_neighbours=(original, similarities))
        seconds = time.perf_counter() - started
        facts.update(
            note="original rows only, on the neighbours stage's table (as the app reuses it), numba warm"
        )
    else:
        raise BadInputError(f"unknown scale stage {stage!r}; choose from {', '.join(SCALE_STAGES)}")
    return {"seconds": seconds, **facts}


def _table_scores(matrix: torch.Tensor, indices: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row to each of its listed neighbours (blocked, float32)."""
    norms = matrix.norm(dim=1).clamp_min(1e-12)
    scores = np.empty(indices.shape, dtype=np.float32)
    for start in range(0, len(indices), 1024):  # 1,024 rows x k neighbours x D gathered at a time
        stop = min(start + 1024, len(indices))
        rows = matrix[start:stop] / norms[start:stop, None]
        ids = torch.from_numpy(indices[start:stop].astype(np.int64))
        keys = matrix[ids] / norms[ids][..., None]
        scores[start:stop] = torch.einsum("rd,rkd->rk", rows, keys).numpy()
    return scores


def _search_facts(quality: Any, vocab: int, width: int) -> dict[str, Any]:
    if quality is None:
        return {"search": "exact", "exact_flops": 2.0 * vocab * vocab * width}
    return {
        "search": quality.method,
        "search_recall": round(quality.recall.mean, 4),
        "search_recall_margin": round(quality.recall.margin, 4),
        "exact_flops": 2.0 * vocab * vocab * width,
        "exact_limit_flops": EXACT_SEARCH_FLOPS,
    }


# -- growth ------------------------------------------------------------------------------------------------
def growth_exponents(points: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Per stage, the least-squares fit of ``log seconds = c + a log V + b log D`` over its measured points
    (``a`` alone when every point has one D; nothing with fewer than two shapes)."""
    fitted: dict[str, dict[str, float | int]] = {}
    for stage in SCALE_STAGES:
        chosen = [p for p in points if p["stage"] == stage and p.get("seconds")]
        if len(chosen) < 2:
            continue
        vocab = np.log([p["vocab"] for p in chosen])
        hidden = np.log([p["hidden"] for p in chosen])
        seconds = np.log([p["seconds"] for p in chosen])
        columns = [np.ones_like(vocab), vocab]
        both = len(set(hidden.tolist())) > 1 and len(set(vocab.tolist())) > 1
        if both:
            columns.append(hidden)
        elif len(set(vocab.tolist())) == 1:
            columns = [np.ones_like(vocab), hidden]
        solution, *_ = np.linalg.lstsq(np.stack(columns, axis=1), seconds, rcond=None)
        entry: dict[str, float | int] = {"points": len(chosen)}
        if len(set(vocab.tolist())) == 1:
            entry["hidden_exponent"] = round(float(solution[1]), 2)
        else:
            entry["vocab_exponent"] = round(float(solution[1]), 2)
            if both:
                entry["hidden_exponent"] = round(float(solution[2]), 2)
        fitted[stage] = entry
    return fitted


def search_is_exact(stage: str, vocab: int, hidden: int) -> bool | None:
    """Whether the stage's neighbour search at (V, D) is exact (None for a stage without one)."""
    if stage == "neighbours":
        return use_exact_search(vocab, vocab, hidden)
    if stage == "recall":
        return use_exact_search(vocab, vocab, scale_rank(hidden) + 1)
    return None


def predict_seconds(points: Sequence[Mapping[str, Any]], stage: str, vocab: int, hidden: int) -> float | None:
    """The stage's time at (V, D) extrapolated from its measured points at the same D (a power law in V
    through the two largest, at least linear), or None without two such points. A neighbour search is only
    extrapolated from points searched the same way (exact or approximate): the two grow differently."""
    exact = search_is_exact(stage, vocab, hidden)
    same = sorted(
        (
            p
            for p in points
            if p["stage"] == stage
            and p["hidden"] == hidden
            and p.get("seconds")
            and (exact is None or (p.get("search") == "exact") == exact)
        ),
        key=lambda p: p["vocab"],
    )
    if len(same) < 2 or same[-1]["vocab"] == same[-2]["vocab"]:
        return None
    small, large = same[-2], same[-1]
    exponent = math.log(large["seconds"] / small["seconds"]) / math.log(large["vocab"] / small["vocab"])
    return float(large["seconds"] * (vocab / large["vocab"]) ** max(exponent, 1.0))


__all__ = [
    "MEMORY_BUDGET",
    "SCALE_HIDDENS",
    "SCALE_STAGES",
    "SCALE_VOCABS",
    "SpectrumProfile",
    "exact_search_seconds",
    "growth_exponents",
    "predict_seconds",
    "run_stage",
    "scale_rank",
    "search_is_exact",
    "stage_memory",
    "synthetic_embedding",
]
