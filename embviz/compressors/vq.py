"""Direction-aware vector quantisation (``vq-direction``): each row's unit direction product-quantised in
the model's own metric, its length coded apart, more bits for the rows that matter.

The paper's argument taken to few bits per weight: errors of direction, not of length, are what hurt the
model (the direction/length ablation in :mod:`embviz.perplexity`), so the bits go to directions, and they
go to the directions the model is sensitive to.

* **Length**: ``log |e_i|`` quantised uniformly to 8 bits between the matrix's smallest and largest (both
  stored as float16; codes are computed against the stored values).
* **Metric**: directions are quantised after the transform ``y = u T``, ``T = I + B^T diag(s - 1) B``, whose
  Euclidean error is the model's: ``B`` holds the :data:`METRIC_DIRECTIONS` leading eigenvectors of the
  model's :class:`~embviz.compressors.weights.DirectionMetric` (the empirical Fisher of its loss with
  respect to the input embedding, :mod:`embviz.sensitivity`) and ``s_j = sqrt((l_j + a) / (l_tail + a))``
  their eigenvalues relative to the mean of the others, shrunk by ``a`` = :data:`METRIC_SHRINK` (mean
  eigenvalue 1). ``B`` and ``s`` are stored in float16 (74 KB for D = 576, 0.02 bits per weight) and
  ``T`` is rebuilt from them on both sides. On SmolLM2 at 1 bit per weight the metric takes the perplexity
  ratio from 1.35x to 1.24x in domain, 1.71x to 1.51x on Python's documentation and 1.56x to 1.38x on modern
  English (``scripts/vq_ablation.py``).
* **Direction, stage 1**: the transformed unit rows are product-quantised (faiss's ``ProductQuantizer``):
  D is split into M sub-vectors, each coded by one byte (one of ``2^nbits`` centroids, ``nbits`` = 8 unless
  the vocabulary is too small to train 256 centroids). The codebooks are trained on rows resampled in
  proportion to ``0.5 * w_i / sum(w) + 0.5 / V`` (the row weights mixed with uniform, so rare rows are still
  seen).
* **Direction, stage 2 (variable rate)**: a second product quantiser with the same M on the stage-1 residual
  of the heaviest rows (by row weight), trained on those rows alone; a V-bit mask says which rows have it.
  M is the largest divisor of D within :data:`STAGE1_SHARE` of the bytes per row the budget leaves for codes,
  and the rest of the budget buys stage 2 for as many of the heaviest rows as it reaches (measured on
  SmolLM2: at 1 bit, 48 + 48 bytes beat 64 bytes for every row, 36 + 72 and 32 + 64; at 2 bits 96 + 96 beat
  144 and 72 + 144 in domain and on Python's documentation; re-measured with the line break counted in the
  row weights, KL on ``smollm:valid``, a slice no weight or metric has read: 96 + 96 on 17,086 rows 0.036
  nats per token, 72 + 72 on 39,166 rows 0.046, 64 + 64 on every row 0.061). A budget too small for a useful second stage
  (fewer rows than centroids) gets one stage with the largest M that fits.
* **Decoding**: ``e_i ~ len_i * d_i / |d_i|`` with ``d_i = (sum of the stages' centroids) T^-1``: only the
  direction's error remains, and the length is kept to 8-bit precision.

**Device**: with ``device`` (e.g. ``cuda``) the nearest-centroid assignment of every row (:func:`assign`,
the plain-torch part of the fit) runs there, in chunks, codes back on the CPU. Training
the codebooks stays on the CPU (faiss's CPU ``ProductQuantizer``; embviz does not use faiss-gpu), and so do
lengths, packing and decoding. Distances on another device round differently in their last bits, so a row
whose two nearest centroids are practically tied may pick the other one: the reconstruction agrees with the
CPU fit's within float tolerance, not bit for bit.

Every stored byte is counted: codes, length codes, the mask, the metric's basis and scales, both codebooks
(float16) and the length range. Stored tensors: ``qcodes`` (one flat uint8 buffer: stage-1 codes V x M,
length codes V, the packed mask, stage-2 codes) and ``qscales`` (float16: the length range, the metric's
scales and basis, then the codebooks).
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from embviz.compressors.base import (
    CompressedEmbedding,
    check_device,
    check_seed,
    closed_form_progress,
    float_matrix,
)
from embviz.compressors.budget import check_ratio
from embviz.compressors.registry import MethodSpec, matrix_scale, register_method
from embviz.compressors.weights import DirectionMetric, RowWeights
from embviz.errors import BadInputError
from embviz.progress import ProgressCallback, send

METHOD = "vq-direction"
LAYOUT_VERSION = 2
"""Version of the stored layout, in every configuration: 2 adds the metric and the stage-1 share."""
LENGTH_LEVELS = 255  # 8-bit length codes
MAX_NBITS = 8
MIN_TRAIN_PER_CENTROID = 4
METRIC_DIRECTIONS = 64
"""Leading directions of the model's metric kept (on SmolLM2 32 of 576 hold half its trace; at 1 bit per
weight 16, 32, 64 and 128 directions gave 1.29x, 1.25x, 1.24x and 1.20x the original perplexity in domain,
the whole matrix 1.20x for 0.19 bits per weight of storage)."""
METRIC_SHRINK = 1.0
"""``a`` in the metric's scales (module docstring); among 0.1, 0.5, 1, 2 and 4, 1 and 2 gave the best 1-bit
perplexities, within the measurement's noise of each other."""
BLOCK_ROWS = 8192
"""Rows transformed, decoded and normalised at a time (bounded temporaries at 256k x 4096)."""
STAGE1_SHARE = 0.85
"""Stage 1 takes at most this share of the code bytes per row; the rest buys stage 2 for the heaviest rows
(SmolLM2: 48 of 58 bytes at 1 bit per weight, 96 of 130 at 2)."""


class Layout(NamedTuple):
    """How a budget is spent: sub-vectors per stage, bits per code, stage-2 rows, metric directions kept."""

    m: int
    nbits: int
    stage2: int
    directions: int


def _nbits(vocab: int) -> int:
    """Centroids per sub-quantiser: 256 (one byte) unless the vocabulary cannot train that many."""
    return max(1, min(MAX_NBITS, int(math.log2(max(2, vocab // MIN_TRAIN_PER_CENTROID)))))


def metric_directions(hidden: int) -> int:
    """The metric directions kept at width D: :data:`METRIC_DIRECTIONS`, at most D / 4."""
    return max(1, min(METRIC_DIRECTIONS, hidden // 4))


def _codebook_entries(nbits: int, hidden: int) -> int:
    """Float16 numbers in one stage's codebooks (M sub-quantisers x 2^nbits centroids x D/M dims)."""
    return (2**nbits) * hidden


def _scale_entries(hidden: int, directions: int) -> int:
    """Float16 numbers before the codebooks: the length range, the metric's scales and its basis."""
    return 2 + directions + directions * hidden


def stored_bytes(vocab: int, hidden: int, layout: Layout) -> int:
    """Every stored byte: stage-1 codes, length codes, mask, stage-2 codes, the metric, codebooks and the
    length range."""
    m, nbits, stage2, directions = layout
    codebooks = 2 if stage2 else 1
    return (
        vocab * m
        + vocab
        + math.ceil(vocab / 8)
        + stage2 * m
        + 2 * (_scale_entries(hidden, directions) + codebooks * _codebook_entries(nbits, hidden))
    )


def plan(vocab: int, hidden: int, ratio: float) -> Layout:
    """The :class:`Layout` filling the byte budget ``4 V D / ratio`` (see the module docstring).

    Raises:
        BadInputError: not even one byte of direction per row fits.
    """
    budget = 4 * vocab * hidden / ratio
    nbits, directions = _nbits(vocab), metric_directions(hidden)
    divisors = [m for m in range(1, hidden + 1) if hidden % m == 0]
    one_stage = stored_bytes(vocab, hidden, Layout(0, nbits, 0, directions))
    codebook = 2 * _codebook_entries(nbits, hidden)
    per_row = (budget - one_stage - codebook) / vocab

    def stage2_rows(m: int) -> int:  # what the budget left after stage 1 buys of stage 2 (its codebook paid)
        return min(vocab, int((budget - one_stage - codebook - vocab * m) // m))

    shared = [m for m in divisors if m <= STAGE1_SHARE * per_row]
    if shared and stage2_rows(max(shared)) >= 2**nbits:
        return Layout(max(shared), nbits, stage2_rows(max(shared)), directions)
    fitting = [m for m in divisors if one_stage + vocab * m <= budget]
    if not fitting:
        smallest = stored_bytes(vocab, hidden, Layout(1, nbits, 0, directions))
        raise BadInputError(
            f"{METHOD} needs at least {8 * smallest / (vocab * hidden):.3g} bits per weight for a "
            f"{vocab} x {hidden} matrix (one byte of direction per row plus codebooks)"
        )
    m = max(fitting)
    stage2 = stage2_rows(m)
    return Layout(m, nbits, stage2 if stage2 >= 2**nbits else 0, directions)


def metric_factors(
    metric: DirectionMetric, hidden: int, directions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales, basis)`` in float16, as stored: the leading ``directions`` eigenvectors of ``metric`` and
    their scales ``sqrt((l_j + a) / (l_tail + a))``."""
    metric.check(hidden)
    basis, eigenvalues = metric.leading(directions)
    tail = float(eigenvalues[directions:].mean()) if directions < hidden else 1.0
    scales = ((eigenvalues[:directions] + METRIC_SHRINK) / (tail + METRIC_SHRINK)).sqrt()
    return scales.to(torch.float16), basis.to(torch.float16)


def metric_transform(scales: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, T^-1)`` in float32 from the stored float16 ``scales`` (k) and ``basis`` (k x D)."""
    rows = basis.to(torch.float64)
    transform = torch.eye(rows.shape[1], dtype=torch.float64) + rows.T @ (
        (scales.to(torch.float64) - 1.0)[:, None] * rows
    )
    return transform.float(), torch.linalg.inv(transform).float()


class DirectionVQ:
    """``vq-direction``: see the module docstring. ``ratio`` is the byte ratio against float32 E; ``device``
    is where rows are assigned to centroids (codebooks are trained by faiss on the CPU); it is not part of
    :meth:`get_config`."""

    method = METHOD

    def __init__(
        self,
        ratio: float,
        row_weights: RowWeights,
        direction_metric: DirectionMetric,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        self.ratio = check_ratio(ratio)
        if not isinstance(row_weights, RowWeights):
            raise BadInputError(f"{METHOD} needs row weights (token frequencies)")
        if not isinstance(direction_metric, DirectionMetric):
            raise BadInputError(f"{METHOD} needs the model's direction metric")
        self.row_weights = row_weights
        self.direction_metric = direction_metric
        self.seed = check_seed(seed)
        self.device = check_device(device)

    @property
    def label(self) -> str:
        return f"direction VQ {32 / self.ratio:.3g} bits/weight"

    def get_config(self) -> dict[str, Any]:
        """``method``, ``label``, ``rank`` (None), ``ratio``, ``seed``, the layout version and the provenance of
        the row weights and the direction metric."""
        return {
            "method": self.method,
            "label": self.label,
            "rank": None,
            "ratio": self.ratio,
            "seed": self.seed,
            "layout": LAYOUT_VERSION,
            "row_weights": self.row_weights.describe(),
            "direction_metric": self.direction_metric.describe(),
        }

    def fit(self, embedding: torch.Tensor, progress: ProgressCallback | None = None) -> CompressedEmbedding:
        """Code lengths, transform into the metric, train and apply the two product quantisers, pack."""
        import faiss  # imported here: only fitting needs it, loading decodes with torch

        started = time.perf_counter()
        matrix = float_matrix(embedding)
        vocab, hidden = matrix.shape
        weights = self.row_weights.check(vocab).to(torch.float64)
        layout = plan(vocab, hidden, self.ratio)
        m, nbits, stage2, directions = layout
        lengths = matrix.norm(dim=1).clamp_min(1e-12)
        length_range, length_codes = _code_lengths(lengths)
        scales, basis = metric_factors(self.direction_metric, hidden, directions)
        transform, _ = metric_transform(scales, basis)
        rows = torch.empty_like(matrix)  # the unit rows in the metric, a block at a time (memory: one copy)
        for start in range(0, vocab, BLOCK_ROWS):
            block = slice(start, start + BLOCK_ROWS)
            torch.matmul(matrix[block] / lengths[block, None], transform, out=rows[block])

        rng = np.random.default_rng(self.seed)
        share = (0.5 * weights / weights.sum() + 0.5 / vocab).numpy()
        size = min(2 * vocab, 256 * 2**nbits)  # faiss trains k-means on at most 256 points per centroid
        sample = rows.numpy()[rng.choice(vocab, size=size, p=share / share.sum())]
        book1 = _train(faiss, hidden, m, nbits, sample, self.seed)
        del sample
        codes1 = assign(book1.float(), rows, device=self.device)
        send(progress, closed_form_progress(time.perf_counter() - started))
        heavy = torch.argsort(weights, descending=True, stable=True)[:stage2].sort().values
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[heavy] = True
        books = [book1]
        codes2 = torch.zeros(0, m, dtype=torch.uint8)

        if stage2:
            heavy_share = share[heavy.numpy()]
            picked = rng.choice(
                stage2, size=min(2 * stage2, 256 * 2**nbits), p=heavy_share / heavy_share.sum()
            )
            sample = _residual(rows, book1, codes1, heavy[picked]).numpy()
            book2 = _train(faiss, hidden, m, nbits, sample, self.seed + 1)
            del sample
            books.append(book2)
            codes2 = torch.cat(
                [
                    assign(
                        book2.float(),
                        _residual(rows, book1, codes1, heavy[start : start + BLOCK_ROWS]),
                        device=self.device,
                    )
                    for start in range(0, stage2, BLOCK_ROWS)
                ]
            )
        del rows  # decoding below needs its own copy of the matrix
        packed_mask = torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))
        qcodes = torch.cat([codes1.flatten(), length_codes, packed_mask, codes2.flatten()])
        qscales = torch.cat([length_range, scales, basis.flatten(), *[book.flatten() for book in books]])
        config = self.get_config()  # the layout follows from (V, D, ratio): plan()
        dense = decode_direction_vq(config, {"qcodes": qcodes, "qscales": qscales}, (vocab, hidden), None)
        return CompressedEmbedding(
            method=self.method,
            config=config,
            dense=dense["dense"],
            qcodes=qcodes,
            qscales=qscales,
            stored_bytes=stored_bytes(vocab, hidden, layout),
            train_seconds=time.perf_counter() - started,
        )


def _residual(rows: torch.Tensor, book: torch.Tensor, codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """What stage 1 (``book``, ``codes``) leaves of ``rows[ids]``, a block at a time (bounded temporaries)."""
    found = torch.empty(len(ids), rows.shape[1])
    for start in range(0, len(ids), BLOCK_ROWS):
        block = ids[start : start + BLOCK_ROWS]
        found[start : start + BLOCK_ROWS] = rows[block] - _lookup(book.float(), codes[block].long())
    return found


def _code_lengths(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(range, codes)``: the float16 ``[lo, hi]`` of ``log |e|`` and each row's 8-bit code against it."""
    logs = lengths.log()
    span = torch.stack([logs.min(), logs.max()]).to(torch.float16)
    lo, hi = span.to(torch.float32)
    width = (hi - lo).clamp_min(1e-6)
    codes = ((logs - lo) / width * LENGTH_LEVELS).round().clamp(0, LENGTH_LEVELS).to(torch.uint8)
    return span, codes


def _train(faiss: Any, hidden: int, m: int, nbits: int, data: np.ndarray, seed: int) -> torch.Tensor:
    """The centroids (float16, M x 2^nbits x D/M) of a product quantiser trained on ``data`` by faiss."""
    quantizer = faiss.ProductQuantizer(hidden, m, nbits)
    quantizer.cp.seed = seed
    quantizer.cp.min_points_per_centroid = 1  # small vocabularies: train anyway, without faiss's warning
    quantizer.train(np.ascontiguousarray(data, dtype=np.float32))
    rounded = faiss.vector_to_array(quantizer.centroids).astype(np.float16)
    return torch.from_numpy(rounded.reshape(m, 2**nbits, hidden // m))


ASSIGN_DISTANCES = 2**24
"""Distances (M x rows x K) :func:`assign` computes at a time: 64 MB of float32, whatever M is."""


def assign(
    centroids: torch.Tensor, data: torch.Tensor, chunk: int | None = None, *, device: str | None = None
) -> torch.Tensor:
    """Each sub-vector's nearest centroid: ``centroids`` M x K x d, ``data`` N x (M d) -> N x M uint8 codes
    (computed against the stored float16 centroids, so they are what a loader decodes with).

    ``device`` (default: where ``data`` is) is where the distances are computed, ``chunk`` rows at a time
    (default: as many as keep :data:`ASSIGN_DISTANCES` distances); the codes come back on the CPU.
    """
    m, count, sub = centroids.shape
    chunk = chunk or max(64, ASSIGN_DISTANCES // (m * count))
    target = data.device if device is None else torch.device(device)
    centroids = centroids.to(target)
    codes = torch.empty(data.shape[0], m, dtype=torch.uint8)
    for start in range(0, data.shape[0], chunk):
        parts = data[start : start + chunk].to(target).reshape(-1, m, sub).transpose(0, 1)  # M x n x d
        distances = torch.cdist(parts, centroids)  # M x n x K
        codes[start : start + chunk] = distances.argmin(dim=2).transpose(0, 1).to(torch.uint8).cpu()
    return codes


def decode_direction_vq(
    config: dict[str, Any], stored: dict[str, torch.Tensor], shape: tuple[int, int], rank: int | None
) -> dict[str, torch.Tensor]:
    """``dense`` rows from ``qcodes`` / ``qscales`` (layout in the module docstring).

    Raises:
        ValueError: the tensors do not fit the configuration.
    """
    vocab, hidden = shape
    if config.get("layout") != LAYOUT_VERSION:
        raise ValueError(f"a direction-VQ artifact of layout {config.get('layout', 1)}; this embviz reads "
                         f"layout {LAYOUT_VERSION} (compress it again)")  # fmt: skip
    m, nbits, stage2, directions = plan(vocab, hidden, float(config["ratio"]))
    qcodes, qscales = stored["qcodes"], stored["qscales"]
    books = 2 if stage2 else 1
    entries, head = _codebook_entries(nbits, hidden), _scale_entries(hidden, directions)
    if qcodes.dtype != torch.uint8 or qcodes.numel() != vocab * m + vocab + math.ceil(vocab / 8) + stage2 * m:
        raise ValueError("the direction-VQ codes do not match their configuration")
    if qscales.dtype != torch.float16 or qscales.numel() != head + books * entries:
        raise ValueError("the direction-VQ codebooks do not match their configuration")
    offsets = np.cumsum([0, vocab * m, vocab, math.ceil(vocab / 8), stage2 * m])
    codes1, length_codes, mask_bytes, codes2 = (qcodes[offsets[i] : offsets[i + 1]] for i in range(4))
    scales = qscales[2 : 2 + directions]
    basis = qscales[2 + directions : head].reshape(directions, hidden)
    _, inverse = metric_transform(scales, basis)
    centroids = qscales[head:].to(torch.float32).reshape(books, m, 2**nbits, hidden // m)
    directions_found = _lookup(centroids[0], codes1.reshape(vocab, m).long())
    if stage2:
        mask = np.unpackbits(mask_bytes.numpy(), count=vocab, bitorder="little").astype(bool)
        rows = torch.from_numpy(np.nonzero(mask)[0])
        if rows.numel() != stage2:
            raise ValueError("the direction-VQ stage-2 mask does not match its row count")
        for start in range(0, stage2, BLOCK_ROWS):
            block = rows[start : start + BLOCK_ROWS]
            directions_found[block] += _lookup(
                centroids[1], codes2.reshape(stage2, m)[start : start + BLOCK_ROWS].long()
            )
    lo, hi = qscales[:2].to(torch.float32)
    lengths = torch.exp(lo + length_codes.to(torch.float32) / LENGTH_LEVELS * (hi - lo))
    for start in range(0, vocab, BLOCK_ROWS):  # in place, a block at a time: one V x D copy in all
        block = directions_found[start : start + BLOCK_ROWS]
        block.copy_(block @ inverse)
        block.mul_((lengths[start : start + BLOCK_ROWS] / block.norm(dim=1).clamp_min(1e-12))[:, None])
    return {"dense": directions_found}


def _lookup(centroids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Rows of concatenated centroids: ``centroids`` M x K x d, ``codes`` N x M -> N x (M d)."""
    m = centroids.shape[0]
    picked = centroids[torch.arange(m)[None, :], codes]  # N x M x d
    return picked.reshape(codes.shape[0], -1)


FIT_SECONDS = ((0.5, 11.0), (1.0, 22.0), (2.0, 43.0), (4.0, 305.0))
"""Fit times on the reference matrix (SmolLM2, one thread, machine shared with other work) at budgets in bits
per weight: at 4 bits 192 sub-quantisers of 3 numbers each are trained twice."""


def expected_fit_seconds(bits: float) -> float:
    """About how long a fit takes on the reference matrix at ``bits`` per weight (log-linear between the
    measured :data:`FIT_SECONDS`, flat beyond them); an estimate, not a bound."""
    budgets, seconds = zip(*FIT_SECONDS, strict=True)
    return float(np.exp(np.interp(np.log(bits), np.log(budgets), np.log(seconds))))


def _build(rank: int | None, ratio: float, row_weights: RowWeights, **options: Any) -> DirectionVQ:
    return DirectionVQ(ratio, row_weights, **options)


def _smallest(vocab: int, hidden: int) -> int:
    """The fewest bytes a V x D matrix can be coded in: one byte of direction per row, one stage."""
    return stored_bytes(vocab, hidden, Layout(1, _nbits(vocab), 0, metric_directions(hidden)))


VQ_DIRECTION = register_method(
    MethodSpec(
        id=METHOD,
        label="direction VQ (unit rows product-quantised in the model's metric + 8-bit log length, variable "
        "rate)",
        family="vector quantisation",
        sizing="bytes",
        factory=_build,
        stores=("qcodes", "qscales"),
        needs_row_weights=True,
        needs_direction_metric=True,
        options=("seed", "device"),
        config_keys=("seed",),
        max_byte_ratio=lambda vocab, hidden: 4 * vocab * hidden / _smallest(vocab, hidden),
        decode=decode_direction_vq,
        fit_seconds=lambda vocab, hidden, size, options: (
            matrix_scale(vocab, hidden) * expected_fit_seconds(32 / (size.ratio or 32.0))
        ),
        description="Each row's direction product-quantised (faiss, codebooks trained with row weights) in the "
        "model's own metric (its loss's sensitivity to each direction), its length coded apart in 8 bits, a "
        "second stage for the heaviest rows; for 0.5-4 bits per weight.",
    )
)
