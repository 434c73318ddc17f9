"""Scalar quantisation of the embedding matrix, alone or on top of a low-rank factorisation (issue 7).

* :class:`RowQuantizer` (``quant-int8`` / ``quant-int4``): every row of E is quantised symmetrically with
  its own float16 scale ``s = max|row| / (2^(bits-1) - 1)``; codes are ``round(row / s)`` clamped to
  ``[-qmax, qmax]``. The result is dense (V x D dequantised rows), so metrics take the dense path.
* :class:`QuantizedLowRank` (``svd-int8`` / ``svd-int4``): the exact SVD, then the V x r codes quantised
  per row the same way and the r x D decoder rounded to float16. It stays low-rank (``codes`` are the
  dequantised codes, ``decoder`` the fp16-rounded decoder, both float32 in memory), so factor paths apply.

Deployable form: the :class:`~embviz.compressors.base.CompressedEmbedding` also carries ``qcodes`` (int8
codes, V x C; for 4 bits two codes per byte, low nibble first, as uint8 V x ceil(C/2)) and ``qscales``
(float16, V). An artifact stores these instead of the float32 ``dense``/``codes`` tensor (and a float16
decoder), so its size on disk reflects the compressed form; loading dequantises them with
:func:`dequantize_rows`, bit-identically to the fit.

Byte counts (``stored_bytes``), packing per row: ``V*ceil(C*bits/8) + 2V`` for the codes and scales, plus
``2*r*D`` for an fp16 decoder. Compared with float32 storage, int8 rows are ~4x and int4 rows ~7.5x smaller.
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Any

import torch

from embviz.compressors.base import CompressedEmbedding, ProgressCallback, TrainingProgress
from embviz.compressors.budget import _check_shape
from embviz.compressors.svd import SVDCompressor
from embviz.errors import BadInputError

BITS = (8, 4)
SCALE_BYTES = 2  # one float16 scale per row
DECODER_BYTES = 2  # float16 decoder entries
BASE_METHODS = ("svd",)


def check_bits(bits: int) -> int:
    """Validate a code width: 8 or 4 bits."""
    if bits not in BITS or isinstance(bits, bool):
        raise BadInputError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    return int(bits)


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def row_bytes(columns: int, bits: int) -> int:
    """Bytes one row of ``columns`` codes takes (4-bit codes packed two per byte, padded per row)."""
    return math.ceil(columns * bits / 8)


def quantized_rows_bytes(rows: int, columns: int, bits: int) -> int:
    """Bytes of a row-quantised ``rows x columns`` matrix: packed codes plus one fp16 scale per row."""
    return rows * row_bytes(columns, bits) + rows * SCALE_BYTES


# -- quantise / pack -----------------------------------------------------------------------------------
def quantize_rows(matrix: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantisation: ``(codes, scales)``, codes int8 (unpacked), scales float16.

    The codes are computed against the stored (fp16-rounded) scale, so ``codes * scale`` is what a loader
    reconstructs. A zero row gets scale 0 and zero codes.

    Raises:
        BadInputError: a non-finite entry, or a row too large for a float16 scale.
    """
    qmax = _qmax(check_bits(bits))
    matrix = matrix.detach().to(torch.float32)
    if not torch.isfinite(matrix).all():
        raise BadInputError("cannot quantise a matrix with NaN or infinite entries")
    scales = (matrix.abs().amax(dim=1) / qmax).to(torch.float16)
    if not torch.isfinite(scales).all():
        raise BadInputError("a row is too large for a float16 quantisation scale")
    divisor = scales.to(torch.float32)
    nonzero = divisor > 0
    codes = torch.round(matrix / torch.where(nonzero, divisor, 1.0).unsqueeze(1)).clamp(-qmax, qmax)
    codes = torch.where(nonzero.unsqueeze(1), codes, 0.0)
    return codes.to(torch.int8), scales


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in ``[-8, 7]`` two per byte (low nibble first, odd rows padded with 0): uint8."""
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    nibbles = codes.to(torch.int16) & 0xF
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes, ``columns`` per row."""
    wide = packed.to(torch.int16)
    nibbles = torch.stack([wide & 0xF, wide >> 4], dim=2).reshape(packed.shape[0], -1)[:, :columns]
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored form of int8 codes: themselves for 8 bits, :func:`pack_int4` for 4."""
    return pack_int4(codes) if check_bits(bits) == 4 else codes


def dequantize_rows(stored: torch.Tensor, scales: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """float32 rows ``codes * scale`` from stored codes (packed for 4 bits) and fp16 scales.

    Raises:
        ValueError: dtypes or shapes do not fit ``bits`` and ``columns``.
    """
    expected = (torch.uint8, row_bytes(columns, 4)) if check_bits(bits) == 4 else (torch.int8, columns)
    if (stored.dtype, stored.ndim, scales.dtype) != (expected[0], 2, torch.float16) or (
        stored.shape[1] != expected[1] or tuple(scales.shape) != (stored.shape[0],)
    ):
        raise ValueError(
            f"quantised codes {stored.dtype} {tuple(stored.shape)} / scales {scales.dtype} "
            f"{tuple(scales.shape)} do not fit {bits}-bit rows of {columns} columns"
        )
    codes = unpack_int4(stored, columns) if bits == 4 else stored
    return codes.to(torch.float32) * scales.to(torch.float32).unsqueeze(1)


def _quantize(matrix: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dequantised float32 rows, stored codes, fp16 scales)`` of ``matrix``."""
    codes, scales = quantize_rows(matrix, bits)
    stored = pack_codes(codes, bits)
    return dequantize_rows(stored, scales, bits, matrix.shape[1]), stored, scales


def _report(progress: ProgressCallback | None, elapsed: float) -> None:
    if progress is not None:
        progress(TrainingProgress(1, 1, 1, 1, 0.0, {}, elapsed, epoch_end=True))


# -- compressors ---------------------------------------------------------------------------------------
class RowQuantizer:
    """Dense per-row scalar quantisation of E (``quant-int8`` / ``quant-int4``); it has no rank."""

    def __init__(self, bits: int = 8, seed: int = 1) -> None:
        self.bits = check_bits(bits)
        self.seed = seed  # kept for a uniform interface; quantisation is deterministic

    @property
    def method(self) -> str:
        return f"quant-int{self.bits}"

    @property
    def label(self) -> str:
        return f"int{self.bits} rows (per-row scale)"

    def get_config(self) -> dict[str, Any]:
        """Constructor parameters plus ``method``, ``label`` and ``rank`` (None)."""
        return {
            "method": self.method,
            "label": self.label,
            "rank": None,
            "bits": self.bits,
            "seed": self.seed,
        }

    def fit(self, embedding: torch.Tensor, progress: ProgressCallback | None = None) -> CompressedEmbedding:
        """Quantise every row of ``embedding`` (V x D)."""
        started = time.perf_counter()
        if embedding.ndim != 2:
            raise BadInputError(f"expected a V x D matrix, got shape {tuple(embedding.shape)}")
        dense, stored, scales = _quantize(embedding.detach().cpu(), self.bits)
        elapsed = time.perf_counter() - started
        _report(progress, elapsed)
        vocab, hidden = embedding.shape
        return CompressedEmbedding(
            method=self.method,
            config=self.get_config(),
            dense=dense,
            qcodes=stored,
            qscales=scales,
            stored_bytes=quantized_rows_bytes(vocab, hidden, self.bits),
            train_seconds=elapsed,
        )


class QuantizedLowRank:
    """A low-rank factorisation with per-row quantised codes and a float16 decoder (``svd-int8``)."""

    def __init__(self, rank: int, base_method: str = "svd", bits: int = 8) -> None:
        if base_method not in BASE_METHODS:
            raise BadInputError(f"base method must be one of {', '.join(BASE_METHODS)}, got {base_method!r}")
        self.rank = rank
        self.base_method = base_method
        self.bits = check_bits(bits)

    @property
    def method(self) -> str:
        return f"{self.base_method}-int{self.bits}"

    @property
    def label(self) -> str:
        return f"SVD, int{self.bits} codes + fp16 decoder"

    def get_config(self) -> dict[str, Any]:
        """Constructor parameters plus ``method`` and ``label``."""
        return {
            "method": self.method,
            "label": self.label,
            "rank": self.rank,
            "base_method": self.base_method,
            "bits": self.bits,
        }

    @staticmethod
    def stored_bytes(vocab_size: int, hidden_size: int, rank: int, bits: int = 8) -> int:
        """Bytes of the deployed form: quantised codes and scales plus an fp16 decoder."""
        return quantized_rows_bytes(vocab_size, rank, bits) + DECODER_BYTES * rank * hidden_size

    @classmethod
    def rank_for_byte_ratio(cls, vocab_size: int, hidden_size: int, ratio: float, bits: int = 8) -> int:
        """The largest rank whose bytes are at most ``4*V*D / ratio`` (float32 E over ``ratio``).

        That is the byte budget of a float32 method at parameter ratio ``ratio``, so ``svd-int8`` at a
        sweep ratio is compared with ``svd`` at the same ratio at equal bytes (SPEC §2).

        Raises:
            BadInputError: ``ratio`` <= 1 or not a number, or not even rank 1 fits.
        """
        _check_shape(vocab_size, hidden_size)
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio > 1:
            raise BadInputError(f"compression ratio must be a number above 1, got {ratio!r}")
        budget = 4 * vocab_size * hidden_size / ratio
        rank = 0
        while rank + 1 < hidden_size and cls.stored_bytes(vocab_size, hidden_size, rank + 1, bits) <= budget:
            rank += 1
        if rank < 1:
            raise BadInputError(
                f"ratio {ratio} leaves less than rank 1 for a {vocab_size} x {hidden_size} matrix"
            )
        return rank

    def fit(self, embedding: torch.Tensor, progress: ProgressCallback | None = None) -> CompressedEmbedding:
        """Fit the SVD, then quantise its codes per row and round its decoder to float16."""
        started = time.perf_counter()
        factors = SVDCompressor(self.rank).fit(embedding)
        codes, stored, scales = _quantize(factors.codes.cpu(), self.bits)  # type: ignore[union-attr]
        decoder = factors.decoder.cpu().to(torch.float16).to(torch.float32)  # type: ignore[union-attr]
        elapsed = time.perf_counter() - started
        _report(progress, elapsed)
        vocab, hidden = embedding.shape
        return CompressedEmbedding(
            method=self.method,
            config=self.get_config(),
            codes=codes,
            decoder=decoder,
            qcodes=stored,
            qscales=scales,
            stored_bytes=self.stored_bytes(vocab, hidden, self.rank, self.bits),
            train_seconds=elapsed,
        )
