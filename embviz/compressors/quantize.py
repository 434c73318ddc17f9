"""Scalar quantisation of the embedding matrix, alone or on top of a low-rank factorisation (issue 7).

* :class:`RowQuantizer` (``quant-int8`` / ``quant-int4``): every row of E is quantised symmetrically with
  its own float16 scale ``s = max|row| / (2^(bits-1) - 1)``; codes are ``round(row / s)`` clamped to
  ``[-qmax, qmax]``. The result is dense (V x D dequantised rows), so metrics take the dense path.
* :class:`QuantizedLowRank` (``svd-int8``, ``svd-freq-int8``, ``ae-paper-int8``, ...): a low-rank
  compressor (exact or frequency-weighted SVD, or the AE), then its V x r codes quantised per row the same
  way and the r x D decoder rounded to float16 (an AE's decoder bias stays float32). It stays low-rank
  (``codes`` are the dequantised codes, ``decoder`` the fp16-rounded decoder, both float32 in memory), so
  factor paths apply.
* :class:`MixedPrecisionRows` (``quant-mixed``): frequency-aware mixed precision. Each row gets 8, 4 or 2
  bits so that the frequency-weighted squared error is smallest within a byte budget (a Lagrangian
  allocation: every row picks the width minimising ``w_i * err_i(b) + lambda * bytes(b)``, and ``lambda`` is
  bisected to the budget). Frequent tokens keep 8 bits; tokens the corpora never use drop to 2.

Deployable form: the :class:`~embviz.compressors.base.CompressedEmbedding` also carries ``qcodes`` (int8
codes, V x C; for 4 bits two codes per byte, low nibble first, as uint8 V x ceil(C/2)) and ``qscales``
(float16, V); a mixed-precision result also carries ``qbits`` (uint8, V: each row's width) and its
``qcodes`` is one flat uint8 buffer: the packed 8-bit rows, then the 4-bit rows, then the 2-bit rows, each
group in row order. An artifact stores these instead of the float32 ``dense``/``codes`` tensor (and a float16
decoder), so its size on disk reflects the compressed form; loading dequantises them with
:func:`dequantize_rows` / :func:`dequantize_mixed` (each method's registered ``decode``), bit-identically to
the fit.

Byte counts (``stored_bytes``), packing per row: ``V*ceil(C*bits/8) + 2V`` for the codes and scales, plus
``2*r*D`` for an fp16 decoder (``4*D`` for a float32 decoder bias); mixed rows add one byte per row for
its width. Compared with float32 storage, int8 rows are ~4x and int4 rows ~7.5x smaller.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from embviz.compressors.autoencoder import AE_PAPER
from embviz.compressors.base import CompressedEmbedding, Compressor, closed_form_progress, float_matrix
from embviz.compressors.budget import check_ratio, rank_for_byte_ratio
from embviz.compressors.registry import MethodSpec, Size, matrix_scale, register_method
from embviz.compressors.svd import SVD, SVD_FREQ
from embviz.compressors.weights import RowWeights
from embviz.errors import BadInputError
from embviz.progress import ProgressCallback, send

BITS = (8, 4)
MIXED_BITS = (8, 4, 2)
SCALE_BYTES = 2  # one float16 scale per row
WIDTH_BYTES = 1  # one uint8 code width per row of a mixed-precision matrix
DECODER_BYTES = 2  # float16 decoder entries
BIAS_BYTES = 4  # a float32 decoder bias entry


def check_bits(bits: int, allowed: tuple[int, ...] = BITS) -> int:
    """Validate a code width: one of ``allowed`` (8 or 4 bits unless told otherwise)."""
    if bits not in allowed or isinstance(bits, bool):
        raise BadInputError(f"bits must be one of {', '.join(map(str, allowed))}, got {bits!r}")
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
    qmax = _qmax(check_bits(bits, MIXED_BITS))
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


def pack_subbyte(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes of ``bits`` < 8 bits, ``8 // bits`` per byte, lowest bits first (rows padded with 0)."""
    per_byte = 8 // bits
    if codes.shape[1] % per_byte:
        codes = torch.nn.functional.pad(codes, (0, per_byte - codes.shape[1] % per_byte))
    fields = codes.to(torch.int16) & (2**bits - 1)
    packed = fields[:, 0::per_byte]
    for slot in range(1, per_byte):
        packed = packed | (fields[:, slot::per_byte] << (bits * slot))
    return packed.to(torch.uint8)


def unpack_subbyte(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_subbyte`: signed int8 codes, ``columns`` per row."""
    wide, mask = packed.to(torch.int16), 2**bits - 1
    fields = torch.stack([(wide >> (bits * slot)) & mask for slot in range(8 // bits)], dim=2)
    fields = fields.reshape(packed.shape[0], packed.shape[1] * (8 // bits))[:, :columns]
    return torch.where(fields >= 2 ** (bits - 1), fields - 2**bits, fields).to(torch.int8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in ``[-8, 7]`` two per byte (low nibble first, odd rows padded with 0): uint8."""
    return pack_subbyte(codes, 4)


def unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes, ``columns`` per row."""
    return unpack_subbyte(packed, 4, columns)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored form of int8 codes: themselves for 8 bits, packed (:func:`pack_subbyte`) below that."""
    return codes if check_bits(bits, MIXED_BITS) == 8 else pack_subbyte(codes, bits)


def dequantize_rows(stored: torch.Tensor, scales: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """float32 rows ``codes * scale`` from stored codes (packed for 4 bits) and fp16 scales.

    Raises:
        ValueError: dtypes or shapes do not fit ``bits`` and ``columns``.
    """
    wide = check_bits(bits, MIXED_BITS) == 8
    expected = (torch.int8, columns) if wide else (torch.uint8, row_bytes(columns, bits))
    if (stored.dtype, stored.ndim, scales.dtype) != (expected[0], 2, torch.float16) or (
        stored.shape[1] != expected[1] or tuple(scales.shape) != (stored.shape[0],)
    ):
        raise ValueError(
            f"quantised codes {stored.dtype} {tuple(stored.shape)} / scales {scales.dtype} "
            f"{tuple(scales.shape)} do not fit {bits}-bit rows of {columns} columns"
        )
    codes = stored if wide else unpack_subbyte(stored, bits, columns)
    return codes.to(torch.float32) * scales.to(torch.float32).unsqueeze(1)


def _quantize(matrix: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dequantised float32 rows, stored codes, fp16 scales)`` of ``matrix``."""
    codes, scales = quantize_rows(matrix, bits)
    stored = pack_codes(codes, bits)
    return dequantize_rows(stored, scales, bits, matrix.shape[1]), stored, scales


def _report(progress: ProgressCallback | None, elapsed: float) -> None:
    send(progress, closed_form_progress(elapsed))


# -- compressors ---------------------------------------------------------------------------------------
class RowQuantizer:
    """Dense per-row scalar quantisation of E (``quant-int8`` / ``quant-int4``); it has no rank. It fits on
    the CPU (one pass of rounding): its spec does not take ``device``, so the registry drops one."""

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
    """A low-rank compressor whose codes are quantised per row and whose decoder is stored in float16.

    ``base`` is any low-rank compressor (:class:`SVDCompressor`, frequency-weighted or not, or an
    :class:`~embviz.compressors.autoencoder.AECompressor`); it is fitted first (on its own ``device``, which
    its registered spec passes on), then its output quantised on the CPU.
    """

    def __init__(self, base: Compressor, bits: int = 8) -> None:
        if getattr(base, "rank", None) is None:
            raise BadInputError(f"{getattr(base, 'method', base)!r} is not a low-rank compressor")
        self.base = base
        self.bits = check_bits(bits)

    @property
    def rank(self) -> int:
        return self.base.rank  # type: ignore[attr-defined]  # __init__ refused a base without a rank

    @property
    def method(self) -> str:
        return f"{self.base.method}-int{self.bits}"

    @property
    def label(self) -> str:
        return f"{self.base.label}, int{self.bits} codes + fp16 decoder"

    def get_config(self) -> dict[str, Any]:
        """``method``, ``label``, ``rank``, ``bits`` and the base compressor's configuration."""
        return {
            "method": self.method,
            "label": self.label,
            "rank": self.rank,
            "bits": self.bits,
            "base": self.base.get_config(),
        }

    @staticmethod
    def stored_bytes(
        vocab_size: int, hidden_size: int, rank: int, bits: int = 8, *, decoder_bias: bool = False
    ) -> int:
        """Bytes of the deployed form: quantised codes and scales, an fp16 decoder, a float32 bias."""
        bias = BIAS_BYTES * hidden_size if decoder_bias else 0
        return quantized_rows_bytes(vocab_size, rank, bits) + DECODER_BYTES * rank * hidden_size + bias

    @classmethod
    def rank_for_byte_ratio(
        cls, vocab_size: int, hidden_size: int, ratio: float, bits: int = 8, *, decoder_bias: bool = False
    ) -> int:
        """The largest rank whose bytes are at most ``4*V*D / ratio`` (float32 E over ``ratio``).

        That is the byte budget of a float32 method at parameter ratio ``ratio``, so ``svd-int8`` at a
        sweep ratio is compared with ``svd`` at the same ratio at equal bytes (SPEC §2).

        Raises:
            BadInputError: ``ratio`` <= 1 or not a number, or not even rank 1 fits.
        """
        return rank_for_byte_ratio(
            vocab_size,
            hidden_size,
            ratio,
            lambda rank: cls.stored_bytes(vocab_size, hidden_size, rank, bits, decoder_bias=decoder_bias),
        )

    def fit(self, embedding: torch.Tensor, progress: ProgressCallback | None = None) -> CompressedEmbedding:
        """Fit the base compressor, then quantise its codes per row and round its decoder to float16."""
        started = time.perf_counter()
        factors = self.base.fit(embedding, progress)
        if not factors.low_rank:
            raise BadInputError(f"{self.base.method!r} did not produce codes and a decoder")
        base_codes, base_decoder = factors.factors()
        codes, stored, scales = _quantize(base_codes.cpu(), self.bits)
        decoder = base_decoder.cpu().to(torch.float16).to(torch.float32)
        vocab, hidden = embedding.shape
        bias = factors.decoder_bias is not None
        return CompressedEmbedding(
            method=self.method,
            config=self.get_config(),
            codes=codes,
            decoder=decoder,
            decoder_bias=factors.decoder_bias,
            decoder_activation=factors.decoder_activation,
            qcodes=stored,
            qscales=scales,
            stored_bytes=self.stored_bytes(vocab, hidden, self.rank, self.bits, decoder_bias=bias),
            history=factors.history,
            train_seconds=time.perf_counter() - started,
        )


def mixed_rows_bytes(row_bits: torch.Tensor, columns: int) -> int:
    """Bytes of mixed-precision rows: each row's packed codes, plus a float16 scale and a width byte."""
    codes = sum(int((row_bits == bits).sum()) * row_bytes(columns, bits) for bits in MIXED_BITS)
    return codes + row_bits.numel() * (SCALE_BYTES + WIDTH_BYTES)


def dequantize_mixed(
    buffer: torch.Tensor, scales: torch.Tensor, row_bits: torch.Tensor, columns: int
) -> torch.Tensor:
    """float32 rows from a mixed-precision buffer (see the module docstring for its layout).

    Raises:
        ValueError: the buffer, scales and widths do not fit together.
    """
    if buffer.dtype != torch.uint8 or buffer.ndim != 1 or row_bits.dtype != torch.uint8:
        raise ValueError("a mixed-precision buffer is a flat uint8 tensor with uint8 row widths")
    if not torch.isin(row_bits, torch.tensor(MIXED_BITS, dtype=torch.uint8)).all():
        raise ValueError(f"row widths must be among {MIXED_BITS}")
    if buffer.numel() + row_bits.numel() * (SCALE_BYTES + WIDTH_BYTES) != mixed_rows_bytes(row_bits, columns):
        raise ValueError("the mixed-precision buffer does not match its row widths")
    dense = torch.empty(row_bits.numel(), columns, dtype=torch.float32)
    offset = 0
    for bits in MIXED_BITS:
        rows = torch.nonzero(row_bits == bits).flatten()
        width = row_bytes(columns, bits)
        block = buffer[offset : offset + rows.numel() * width].reshape(rows.numel(), width)
        offset += block.numel()
        stored = block.view(torch.int8) if bits == 8 else block
        dense[rows] = dequantize_rows(stored, scales[rows], bits, columns)
    return dense


def allocate_bits(
    errors: torch.Tensor, weights: torch.Tensor, costs: torch.Tensor, budget: float, iterations: int = 60
) -> torch.Tensor:
    """Per row, the index of the option (column of ``errors``/``costs``) minimising weighted error in budget.

    ``errors`` is V x K (squared error of each row under each option), ``costs`` the K byte costs. Every row
    picks ``argmin w_i * err_ik + lambda * cost_k``; ``lambda`` is bisected to the smallest value whose total
    cost fits ``budget``. Raises :class:`BadInputError` when not even the cheapest option fits.
    """
    weighted = weights.to(torch.float64).unsqueeze(1) * errors.to(torch.float64)
    costs = costs.to(torch.float64)

    def choose(lam: float) -> torch.Tensor:
        return torch.argmin(weighted + lam * costs, dim=1)

    if float(costs.min()) * errors.shape[0] > budget:
        raise BadInputError("the byte budget is below even the narrowest code width for every row")
    choice = choose(0.0)
    if float(costs[choice].sum()) <= budget:
        return choice
    low, high = 0.0, 1.0
    while float(costs[choose(high)].sum()) > budget:
        high *= 2
    for _ in range(iterations):
        middle = (low + high) / 2
        if float(costs[choose(middle)].sum()) > budget:
            low = middle
        else:
            high = middle
    return choose(high)


class MixedPrecisionRows:
    """Frequency-aware mixed precision (``quant-mixed``): 8, 4 or 2 bits per row within a byte budget.

    ``ratio`` is the byte ratio against float32 E; ``row_weights`` (token frequencies from a train slice)
    say how much each row's error counts. Deterministic: no randomness is involved. It fits on the CPU (its
    spec does not take ``device``, which the registry drops).
    """

    method = "quant-mixed"

    def __init__(self, ratio: float, row_weights: RowWeights) -> None:
        self.ratio = check_ratio(ratio)
        if not isinstance(row_weights, RowWeights):
            raise BadInputError("quant-mixed needs row weights (token frequencies)")
        self.row_weights = row_weights

    @property
    def label(self) -> str:
        return "mixed int8/int4/int2 rows, frequency-aware"

    @staticmethod
    def max_ratio(hidden_size: int) -> float:
        """The largest byte ratio mixed rows reach for ``hidden_size`` columns (every row at 2 bits)."""
        return 4 * hidden_size / (row_bytes(hidden_size, min(MIXED_BITS)) + SCALE_BYTES + WIDTH_BYTES)

    def check_fits(self, hidden_size: int) -> None:
        """Raise :class:`BadInputError` if this ratio is beyond :meth:`max_ratio` for ``hidden_size``."""
        if self.ratio > self.max_ratio(hidden_size):
            raise BadInputError(
                f"ratio {self.ratio:g} is beyond what mixed rows reach for {hidden_size} columns "
                f"(at most {self.max_ratio(hidden_size):.2f}x, every row at {min(MIXED_BITS)} bits)"
            )

    def get_config(self) -> dict[str, Any]:
        """``method``, ``label``, ``rank`` (None), ``ratio``, ``bits`` and the row weights' provenance."""
        return {
            "method": self.method,
            "label": self.label,
            "rank": None,
            "ratio": self.ratio,
            "bits": list(MIXED_BITS),
            "row_weights": self.row_weights.describe(),
        }

    def fit(self, embedding: torch.Tensor, progress: ProgressCallback | None = None) -> CompressedEmbedding:
        """Quantise every row at each width, allocate widths to the budget, keep the chosen rows."""
        started = time.perf_counter()
        matrix = float_matrix(embedding)
        vocab, hidden = matrix.shape
        weights = self.row_weights.check(vocab)
        options = [quantize_rows(matrix, bits) for bits in MIXED_BITS]
        errors = torch.stack(
            [
                ((codes.to(torch.float32) * scales.to(torch.float32).unsqueeze(1) - matrix) ** 2).sum(dim=1)
                for codes, scales in options
            ],
            dim=1,
        )
        costs = torch.tensor([row_bytes(hidden, bits) for bits in MIXED_BITS], dtype=torch.float64)
        budget = 4 * vocab * hidden / self.ratio - vocab * (SCALE_BYTES + WIDTH_BYTES)
        self.check_fits(hidden)
        choice = allocate_bits(errors, weights, costs, budget)
        row_bits = torch.tensor(MIXED_BITS, dtype=torch.uint8)[choice]
        scales = torch.stack([scales for _, scales in options], dim=1)[torch.arange(vocab), choice]
        groups = []
        for index, bits in enumerate(MIXED_BITS):
            rows = choice == index
            packed = pack_codes(options[index][0][rows], bits)
            groups.append(packed.view(torch.uint8).flatten())
        buffer = torch.cat(groups)
        dense = dequantize_mixed(buffer, scales, row_bits, hidden)
        _report(progress, time.perf_counter() - started)
        return CompressedEmbedding(
            method=self.method,
            config=self.get_config(),
            dense=dense,
            qcodes=buffer,
            qscales=scales,
            qbits=row_bits,
            stored_bytes=mixed_rows_bytes(row_bits, hidden),
            train_seconds=time.perf_counter() - started,
        )


# -- decoding stored tensors (each spec's ``decode``) ------------------------------------------------------
def decode_rows(
    config: dict[str, Any], stored: dict[str, torch.Tensor], shape: tuple[int, int], rank: int | None
) -> dict[str, torch.Tensor]:
    """``dense`` from a row quantiser's stored ``qcodes`` and ``qscales`` (width: ``config["bits"]``)."""
    return {"dense": dequantize_rows(stored["qcodes"], stored["qscales"], config["bits"], shape[1])}


def decode_mixed(
    config: dict[str, Any], stored: dict[str, torch.Tensor], shape: tuple[int, int], rank: int | None
) -> dict[str, torch.Tensor]:
    """``dense`` from mixed-precision rows: the flat ``qcodes`` buffer, ``qscales`` and ``qbits``."""
    return {"dense": dequantize_mixed(stored["qcodes"], stored["qscales"], stored["qbits"], shape[1])}


def decode_low_rank_codes(
    config: dict[str, Any], stored: dict[str, torch.Tensor], shape: tuple[int, int], rank: int | None
) -> dict[str, torch.Tensor]:
    """``codes`` (V x rank) from a quantised low-rank method's stored ``qcodes`` and ``qscales``."""
    if rank is None:
        raise ValueError("quantised low-rank codes need the rank they were stored at")
    return {"codes": dequantize_rows(stored["qcodes"], stored["qscales"], config["bits"], rank)}


# -- registration ------------------------------------------------------------------------------------------
def _row_quantizer(bits: int) -> MethodSpec:
    def build(
        rank: int | None, ratio: float | None, row_weights: RowWeights | None, **options: Any
    ) -> RowQuantizer:
        return RowQuantizer(bits=bits, **options)

    return register_method(
        MethodSpec(
            id=f"quant-int{bits}",
            label=f"int{bits} rows (per-row scale)",
            family="row quantisation",
            sizing="fixed",
            factory=build,
            stores=("qcodes", "qscales"),
            options=("seed",),
            config_keys=("seed",),
            code_bits=bits,
            fixed_bytes=lambda vocab, hidden: quantized_rows_bytes(vocab, hidden, bits),
            decode=decode_rows,
            description=f"Every row quantised symmetrically to {bits} bits with its own float16 scale.",
        )
    )


def _mixed(rank: int | None, ratio: float, row_weights: RowWeights, **options: Any) -> MixedPrecisionRows:
    return MixedPrecisionRows(ratio, row_weights, **options)


def _quantized_low_rank(base: MethodSpec, bits: int) -> MethodSpec:
    """Register ``<base>-int<bits>``: the base method's codes quantised per row, its decoder in float16."""

    def build(
        rank: int, ratio: float | None, row_weights: RowWeights | None, **options: Any
    ) -> QuantizedLowRank:
        return QuantizedLowRank(base.build(Size(rank=rank), row_weights=row_weights, **options), bits=bits)

    def rebuild(config: dict[str, Any], **overrides: Any) -> QuantizedLowRank:
        return QuantizedLowRank(base.from_config(config["base"], **overrides), bits=config["bits"])

    return register_method(
        MethodSpec(
            id=f"{base.id}-int{bits}",
            label=f"{base.label}, int{bits} codes + fp16 decoder",
            family="quantised low-rank",
            sizing="rank",
            factory=build,
            stores=("qcodes", "qscales", "decoder") + (("decoder_bias",) if base.decoder_bias else ()),
            trains=base.trains,
            needs_row_weights=base.needs_row_weights,
            options=base.options,
            decoder_bias=base.decoder_bias,
            code_bits=bits,
            bytes_for_rank=lambda vocab, hidden, rank: QuantizedLowRank.stored_bytes(
                vocab, hidden, rank, bits, decoder_bias=base.decoder_bias
            ),
            rebuild=rebuild,
            decode=decode_low_rank_codes,
            fit_seconds=lambda vocab, hidden, size, options: base.expected_seconds(
                vocab, hidden, size, **options
            ),
            description=f"{base.label}, then its codes quantised to {bits} bits per row and its decoder "
            "rounded to float16.",
        )
    )


QUANT_INT8 = _row_quantizer(8)
QUANT_INT4 = _row_quantizer(4)
QUANT_MIXED = register_method(
    MethodSpec(
        id="quant-mixed",
        label="mixed int8/int4/int2 rows, frequency-aware",
        family="row quantisation",
        sizing="bytes",
        factory=_mixed,
        stores=("qcodes", "qscales", "qbits"),
        needs_row_weights=True,
        max_byte_ratio=lambda vocab, hidden: MixedPrecisionRows.max_ratio(hidden),
        decode=decode_mixed,
        fit_seconds=lambda vocab, hidden, size, options: 9.0 * matrix_scale(vocab, hidden),  # measured: 9.2 s
        description="8, 4 or 2 bits per row, chosen by token frequency to fit a byte budget.",
    )
)
SVD_INT8 = _quantized_low_rank(SVD, 8)
SVD_INT4 = _quantized_low_rank(SVD, 4)
SVD_FREQ_INT8 = _quantized_low_rank(SVD_FREQ, 8)
AE_PAPER_INT8 = _quantized_low_rank(AE_PAPER, 8)
