"""Direction-aware vector quantisation (``vq-direction``): each row's unit direction product-quantised, its
length coded apart, more bits for the rows that matter.

The paper's argument taken to few bits per weight: errors of direction, not of length, are what hurt the
model (the direction/length ablation in :mod:`embviz.perplexity`), so the bits go to directions.

* **Length**: ``log |e_i|`` quantised uniformly to 8 bits between the matrix's smallest and largest (both
  stored as float16; codes are computed against the stored values).
* **Direction, stage 1**: the unit rows ``u_i = e_i / |e_i|`` are product-quantised (faiss's
  ``ProductQuantizer``): D is split into M sub-vectors of D/M dimensions, each coded by one byte (one of
  ``2^nbits`` centroids, ``nbits`` = 8 unless the vocabulary is too small to train 256 centroids). The
  codebooks are trained on rows resampled in proportion to ``0.5 * w_i / sum(w) + 0.5 / V`` (the row weights,
  e.g. general English word frequencies, mixed with uniform so rare rows are still seen).
* **Direction, stage 2 (variable rate)**: the budget left after stage 1 buys a second product quantiser on
  the stage-1 residual of the heaviest rows (by row weight), trained on those rows alone; a V-bit mask says
  which rows have it.
* **Decoding**: ``e_i ~ len_i * d_i / |d_i|`` with ``d_i`` the sum of the stages' centroids: only the
  direction's error remains, and the length is kept to 8-bit precision.

**Device**: with ``device`` (e.g. ``cuda``) the nearest-centroid assignment of every row (:func:`assign`,
the plain-torch part of the fit) runs there, in chunks, codes back on the CPU. Training
the codebooks stays on the CPU (faiss's CPU ``ProductQuantizer``; embviz does not use faiss-gpu), and so do
lengths, packing and decoding. Distances on another device round differently in their last bits, so a row
whose two nearest centroids are practically tied may pick the other one: the reconstruction agrees with the
CPU fit's within float tolerance, not bit for bit.

M is the largest divisor of D whose stage-1 codes fit the budget; everything else (stage-2 rows) is filled
up to it. Every stored byte is counted: codes, length codes, the mask, both codebooks (float16) and the
length range. Stored tensors: ``qcodes`` (one flat uint8 buffer: stage-1 codes V x M, length codes V, the
packed mask, stage-2 codes) and ``qscales`` (float16: the length range, then the codebooks).
"""

from __future__ import annotations

import math
import time
from typing import Any

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
from embviz.compressors.weights import RowWeights
from embviz.errors import BadInputError
from embviz.progress import ProgressCallback, send

METHOD = "vq-direction"
LENGTH_LEVELS = 255  # 8-bit length codes
MAX_NBITS = 8
MIN_TRAIN_PER_CENTROID = 4


def _nbits(vocab: int) -> int:
    """Centroids per sub-quantiser: 256 (one byte) unless the vocabulary cannot train that many."""
    return max(1, min(MAX_NBITS, int(math.log2(max(2, vocab // MIN_TRAIN_PER_CENTROID)))))


def _codebook_entries(nbits: int, hidden: int) -> int:
    """Float16 numbers in one stage's codebooks (M sub-quantisers x 2^nbits centroids x D/M dims)."""
    return (2**nbits) * hidden


def stored_bytes(vocab: int, hidden: int, m: int, nbits: int, stage2_rows: int) -> int:
    """Every stored byte: stage-1 codes, length codes, mask, stage-2 codes, codebooks and length range."""
    codebooks = 2 if stage2_rows else 1
    return (
        vocab * m
        + vocab
        + math.ceil(vocab / 8)
        + stage2_rows * m
        + 2 * (2 + codebooks * _codebook_entries(nbits, hidden))
    )


def plan(vocab: int, hidden: int, ratio: float) -> tuple[int, int, int]:
    """``(M, nbits, stage-2 rows)`` filling the byte budget ``4 V D / ratio``.

    Raises:
        BadInputError: not even one byte of direction per row fits.
    """
    budget = 4 * vocab * hidden / ratio
    nbits = _nbits(vocab)
    divisors = [m for m in range(1, hidden + 1) if hidden % m == 0]
    fitting = [m for m in divisors if stored_bytes(vocab, hidden, m, nbits, 0) <= budget]
    if not fitting:
        smallest = stored_bytes(vocab, hidden, 1, nbits, 0)
        raise BadInputError(
            f"{METHOD} needs at least {8 * smallest / (vocab * hidden):.3g} bits per weight for a "
            f"{vocab} x {hidden} matrix (one byte of direction per row plus codebooks)"
        )
    m = max(fitting)
    left = budget - stored_bytes(vocab, hidden, m, nbits, 0) - 2 * _codebook_entries(nbits, hidden)
    stage2 = min(vocab, int(left // m)) if left > 0 else 0
    if stage2 < 2**nbits:  # too few rows to train a second codebook: spend nothing on it
        stage2 = 0
    return m, nbits, stage2


class DirectionVQ:
    """``vq-direction``: see the module docstring. ``ratio`` is the byte ratio against float32 E; ``device``
    is where rows are assigned to centroids (codebooks are trained by faiss on the CPU); it is not part of
    :meth:`get_config`."""

    method = METHOD

    def __init__(self, ratio: float, row_weights: RowWeights, seed: int = 0, device: str = "cpu") -> None:
        self.ratio = check_ratio(ratio)
        if not isinstance(row_weights, RowWeights):
            raise BadInputError(f"{METHOD} needs row weights (token frequencies)")
        self.row_weights = row_weights
        self.seed = check_seed(seed)
        self.device = check_device(device)

    @property
    def label(self) -> str:
        return f"direction VQ {32 / self.ratio:.3g} bits/weight"

    def get_config(self) -> dict[str, Any]:
        """``method``, ``label``, ``rank`` (None), ``ratio``, ``seed`` and the row weights' provenance."""
        return {
            "method": self.method,
            "label": self.label,
            "rank": None,
            "ratio": self.ratio,
            "seed": self.seed,
            "row_weights": self.row_weights.describe(),
        }

    def fit(self, embedding: torch.Tensor, progress: ProgressCallback | None = None) -> CompressedEmbedding:
        """Code lengths, train and apply the two product quantisers, pack everything."""
        import faiss  # imported here: only fitting needs it, loading decodes with torch

        started = time.perf_counter()
        matrix = float_matrix(embedding)
        vocab, hidden = matrix.shape
        weights = self.row_weights.check(vocab).to(torch.float64)
        m, nbits, stage2 = plan(vocab, hidden, self.ratio)
        lengths = matrix.norm(dim=1).clamp_min(1e-12)
        length_range, length_codes = _code_lengths(lengths)
        units = matrix / lengths[:, None]

        rng = np.random.default_rng(self.seed)
        share = (0.5 * weights / weights.sum() + 0.5 / vocab).numpy()
        size = min(2 * vocab, 256 * 2**nbits)  # faiss trains k-means on at most 256 points per centroid
        sample = units.numpy()[rng.choice(vocab, size=size, p=share / share.sum())]
        book1 = _train(faiss, hidden, m, nbits, sample, self.seed)
        codes1 = assign(book1.float(), units, device=self.device)
        send(progress, closed_form_progress(time.perf_counter() - started))
        heavy = torch.argsort(weights, descending=True, stable=True)[:stage2].sort().values
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[heavy] = True
        books = [book1]
        codes2 = torch.zeros(0, m, dtype=torch.uint8)
        if stage2:
            residual = units[heavy] - _lookup(book1.float(), codes1[heavy].long())
            book2 = _train(faiss, hidden, m, nbits, residual.numpy(), self.seed + 1)
            codes2 = assign(book2.float(), residual, device=self.device)
            books.append(book2)
        packed_mask = torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))
        qcodes = torch.cat([codes1.flatten(), length_codes, packed_mask, codes2.flatten()])
        qscales = torch.cat([length_range, *[book.flatten() for book in books]])
        config = self.get_config()  # the layout (M, nbits, stage-2 rows) follows from (V, D, ratio): plan()
        dense = decode_direction_vq(config, {"qcodes": qcodes, "qscales": qscales}, (vocab, hidden), None)
        return CompressedEmbedding(
            method=self.method,
            config=config,
            dense=dense["dense"],
            qcodes=qcodes,
            qscales=qscales,
            stored_bytes=stored_bytes(vocab, hidden, m, nbits, stage2),
            train_seconds=time.perf_counter() - started,
        )


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


def assign(
    centroids: torch.Tensor, data: torch.Tensor, chunk: int = 4096, *, device: str | None = None
) -> torch.Tensor:
    """Each sub-vector's nearest centroid: ``centroids`` M x K x d, ``data`` N x (M d) -> N x M uint8 codes
    (computed against the stored float16 centroids, so they are what a loader decodes with).

    ``device`` (default: where ``data`` is) is where the distances are computed, one chunk of rows at a time;
    the codes come back on the CPU.
    """
    m, _, sub = centroids.shape
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
    m, nbits, stage2 = plan(vocab, hidden, float(config["ratio"]))
    qcodes, qscales = stored["qcodes"], stored["qscales"]
    books = 2 if stage2 else 1
    entries = _codebook_entries(nbits, hidden)
    if qcodes.dtype != torch.uint8 or qcodes.numel() != vocab * m + vocab + math.ceil(vocab / 8) + stage2 * m:
        raise ValueError("the direction-VQ codes do not match their configuration")
    if qscales.dtype != torch.float16 or qscales.numel() != 2 + books * entries:
        raise ValueError("the direction-VQ codebooks do not match their configuration")
    offsets = np.cumsum([0, vocab * m, vocab, math.ceil(vocab / 8), stage2 * m])
    codes1, length_codes, mask_bytes, codes2 = (qcodes[offsets[i] : offsets[i + 1]] for i in range(4))
    centroids = qscales[2:].to(torch.float32).reshape(books, m, 2**nbits, hidden // m)
    directions = _lookup(centroids[0], codes1.reshape(vocab, m).long())
    if stage2:
        mask = np.unpackbits(mask_bytes.numpy(), count=vocab, bitorder="little").astype(bool)
        rows = torch.from_numpy(np.nonzero(mask)[0])
        if rows.numel() != stage2:
            raise ValueError("the direction-VQ stage-2 mask does not match its row count")
        directions[rows] += _lookup(centroids[1], codes2.reshape(stage2, m).long())
    lo, hi = qscales[:2].to(torch.float32)
    lengths = torch.exp(lo + length_codes.to(torch.float32) / LENGTH_LEVELS * (hi - lo))
    norms = directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return {"dense": directions / norms * lengths[:, None]}


def _lookup(centroids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Rows of concatenated centroids: ``centroids`` M x K x d, ``codes`` N x M -> N x (M d)."""
    m = centroids.shape[0]
    picked = centroids[torch.arange(m)[None, :], codes]  # N x M x d
    return picked.reshape(codes.shape[0], -1)


def _build(rank: int | None, ratio: float, row_weights: RowWeights, **options: Any) -> DirectionVQ:
    return DirectionVQ(ratio, row_weights, **options)


VQ_DIRECTION = register_method(
    MethodSpec(
        id=METHOD,
        label="direction VQ (product-quantised unit rows + 8-bit log length, variable rate)",
        family="vector quantisation",
        sizing="bytes",
        factory=_build,
        stores=("qcodes", "qscales"),
        needs_row_weights=True,
        options=("seed", "device"),
        config_keys=("seed",),
        max_byte_ratio=lambda vocab, hidden: (
            4 * vocab * hidden / stored_bytes(vocab, hidden, 1, _nbits(vocab), 0)
        ),
        decode=decode_direction_vq,
        # Measured on the reference matrix: 40-42 s at 1 bit per weight, 92 s at 0.5 and 135 s at 2 (the
        # residual stage and faiss's codebook training grow with the rate); an estimate, not a bound.
        fit_seconds=lambda vocab, hidden, size, options: (
            matrix_scale(vocab, hidden) * max(45.0, 65.0 * 32 / (size.ratio or 32.0))
        ),
        description="Each row's direction product-quantised (faiss, codebooks trained with row weights), its "
        "length coded apart in 8 bits, a second stage for the heaviest rows; for 0.5-2 bits per weight.",
    )
)
