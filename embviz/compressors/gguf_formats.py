"""llama.cpp's GGUF block formats as reference methods: what users pick instead of a learned compressor.

Each method quantises every row of E with the ``gguf`` package (``gguf.quants.quantize``), exactly as
llama.cpp's ``convert`` / ``quantize`` tools store a tensor in a GGUF file, and keeps the raw block bytes:

* ``gguf-q8_0`` -- 8-bit weights, one float16 scale per block of 32: 8.5 bits per weight;
* ``gguf-q5_1`` -- 5-bit weights, a float16 scale and minimum per block of 32: 6.0;
* ``gguf-q5_0`` -- 5-bit weights, a float16 scale per block of 32: 5.5;
* ``gguf-q4_1`` -- 4-bit weights, a float16 scale and minimum per block of 32: 5.0;
* ``gguf-q4_0`` -- 4-bit weights, a float16 scale per block of 32: 4.5.

Bits per weight come from the package's block layout (``gguf.GGML_QUANT_SIZES``: weights per block, bytes
per block), never from constants here. The stored form is one uint8 tensor ``qcodes`` (V x bytes per row,
the blocks of each row in order); loading dequantises it with ``gguf.quants.dequantize`` (the spec's
``decode``), bit-identically to the fit, and ``stored_bytes`` is exactly its size. These are 32-weight
block formats: a row whose length is not a multiple of 32 is refused with one :class:`BadInputError`.

The k-quants (Q2_K ... Q6_K) use super-blocks of 256 weights, so they need rows whose length is a multiple
of 256, which neither smollm2's 576 nor minilm's 384 is (llama.cpp itself falls back to the 32-block types
for such rows); the ``gguf`` package cannot encode them in numpy either (it only decodes them), so they are
not offered. Q4_0 at 4.5 bits is the lowest GGUF reference for the packaged models.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from embviz.compressors.base import CompressedEmbedding, closed_form_progress
from embviz.compressors.registry import MethodSpec, register_method
from embviz.compressors.weights import RowWeights
from embviz.errors import BadInputError
from embviz.progress import ProgressCallback, send

FAMILY = "GGUF (llama.cpp)"
GGUF_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
"""The GGUF types offered, best first: the 32-weight block formats the ``gguf`` package encodes."""
KQUANT_ROWS = 256
"""The row-length multiple the k-quants (Q2_K ... Q6_K) need; they are not offered (see the module)."""
CHUNK_ROWS = 8192
"""Rows quantised at a time (bounds the package's temporary arrays on large vocabularies)."""

_WHAT = {
    "Q8_0": "8-bit weights with one float16 scale per block of 32",
    "Q5_1": "5-bit weights with a float16 scale and minimum per block of 32",
    "Q5_0": "5-bit weights with one float16 scale per block of 32",
    "Q4_1": "4-bit weights with a float16 scale and minimum per block of 32",
    "Q4_0": "4-bit weights with one float16 scale per block of 32",
}


def check_type(name: str) -> str:
    """Validate a GGUF type name among :data:`GGUF_TYPES`."""
    if name not in GGUF_TYPES:
        raise BadInputError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {name!r}")
    return name


def block_layout(name: str) -> tuple[int, int]:
    """``(weights per block, bytes per block)`` of GGUF type ``name``, from the ``gguf`` package."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[check_type(name)]]


def gguf_bits_per_weight(name: str) -> float:
    """Stored bits per weight of GGUF type ``name`` (Q8_0: 8.5, Q4_0: 4.5)."""
    weights, size = block_layout(name)
    return 8 * size / weights


def check_row_length(name: str, hidden_size: int) -> None:
    """Raise :class:`BadInputError` unless rows of ``hidden_size`` split into whole blocks of ``name``."""
    weights, _ = block_layout(name)
    if hidden_size <= 0 or hidden_size % weights:
        raise BadInputError(
            f"GGUF {name} stores rows in blocks of {weights} weights: rows of {hidden_size} are not a "
            f"multiple of {weights}"
        )


def gguf_row_bytes(name: str, hidden_size: int) -> int:
    """Bytes one row of ``hidden_size`` weights takes in GGUF type ``name`` (refuses partial blocks)."""
    check_row_length(name, hidden_size)
    weights, size = block_layout(name)
    return hidden_size // weights * size


def gguf_bytes(name: str, vocab_size: int, hidden_size: int) -> int:
    """Bytes of a V x D matrix in GGUF type ``name``: exactly what llama.cpp stores for the tensor."""
    return vocab_size * gguf_row_bytes(name, hidden_size)


def quantize_matrix(matrix: torch.Tensor, name: str) -> torch.Tensor:
    """The GGUF blocks of every row of ``matrix`` (V x D), as uint8 V x bytes per row.

    Raises:
        BadInputError: a row length that is not a multiple of the block, or a non-finite entry.
    """
    vocab, hidden = matrix.shape
    check_row_length(name, hidden)
    rows = matrix.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if not np.isfinite(rows).all():
        raise BadInputError("cannot quantise a matrix with NaN or infinite entries")
    qtype = GGMLQuantizationType[name]
    blocks = np.empty((vocab, gguf_row_bytes(name, hidden)), dtype=np.uint8)
    for start in range(0, vocab, CHUNK_ROWS):
        blocks[start : start + CHUNK_ROWS] = quantize(rows[start : start + CHUNK_ROWS], qtype)
    return torch.from_numpy(blocks)


def dequantize_matrix(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """float32 rows from GGUF blocks (uint8 V x bytes per row) of type ``name``."""
    qtype = GGMLQuantizationType[check_type(name)]
    data = blocks.detach().cpu().contiguous().numpy()
    rows = [
        dequantize(data[start : start + CHUNK_ROWS], qtype) for start in range(0, data.shape[0], CHUNK_ROWS)
    ]
    return torch.from_numpy(np.concatenate(rows) if rows else np.empty((0, 0), np.float32)).to(torch.float32)


class GGUFQuantizer:
    """Every row of E stored in a llama.cpp GGUF block format (``gguf-q8_0`` ... ``gguf-q4_0``); no rank.
    It fits on the CPU (the gguf package's numpy quantisers): its spec does not take ``device``, which the
    registry drops."""

    def __init__(self, qtype: str = "Q4_0") -> None:
        self.qtype = check_type(qtype)

    @property
    def method(self) -> str:
        return f"gguf-{self.qtype.lower()}"

    @property
    def label(self) -> str:
        return f"GGUF {self.qtype} (llama.cpp, {gguf_bits_per_weight(self.qtype):.1f} bits/weight)"

    def get_config(self) -> dict[str, Any]:
        """``method``, ``label``, ``rank`` (None) and the GGUF ``type``."""
        return {"method": self.method, "label": self.label, "rank": None, "type": self.qtype}

    def fit(self, embedding: torch.Tensor, progress: ProgressCallback | None = None) -> CompressedEmbedding:
        """Quantise every row of ``embedding`` (V x D, D a multiple of 32) with the ``gguf`` package."""
        started = time.perf_counter()
        if embedding.ndim != 2:
            raise BadInputError(f"expected a V x D matrix, got shape {tuple(embedding.shape)}")
        vocab, hidden = embedding.shape
        blocks = quantize_matrix(embedding, self.qtype)
        dense = dequantize_matrix(blocks, self.qtype)
        if not torch.isfinite(dense).all():
            raise BadInputError(f"a block of the matrix is too large for GGUF {self.qtype}'s float16 scales")
        elapsed = time.perf_counter() - started
        send(progress, closed_form_progress(elapsed))
        return CompressedEmbedding(
            method=self.method,
            config=self.get_config(),
            dense=dense,
            qcodes=blocks,
            stored_bytes=gguf_bytes(self.qtype, vocab, hidden),
            train_seconds=elapsed,
        )


# -- registration ------------------------------------------------------------------------------------------
def _register(name: str) -> MethodSpec:
    def build(
        rank: int | None, ratio: float | None, row_weights: RowWeights | None, **options: Any
    ) -> GGUFQuantizer:
        return GGUFQuantizer(name, **options)

    def decode(
        config: dict[str, Any], stored: dict[str, torch.Tensor], shape: tuple[int, int], rank: int | None
    ) -> dict[str, torch.Tensor]:
        blocks = stored["qcodes"]
        vocab, hidden = shape
        weights, size = block_layout(name)
        if (
            hidden % weights
            or blocks.dtype != torch.uint8
            or tuple(blocks.shape) != (vocab, hidden // weights * size)
        ):
            raise ValueError(
                f"stored GGUF {name} blocks {blocks.dtype} {tuple(blocks.shape)} do not fit a {vocab} x {hidden} matrix"
            )
        return {"dense": dequantize_matrix(blocks, name)}

    bits = gguf_bits_per_weight(name)
    return register_method(
        MethodSpec(
            id=f"gguf-{name.lower()}",
            label=f"GGUF {name} (llama.cpp, {bits:.1f} bits/weight)",
            family=FAMILY,
            sizing="fixed",
            factory=build,
            stores=("qcodes",),
            code_bits=None,
            fixed_bytes=lambda vocab, hidden: gguf_bytes(name, vocab, hidden),
            decode=decode,
            description=f"llama.cpp's {name} via the gguf package: {_WHAT[name]}, {bits:.1f} bits/weight; rows "
            f"must be a multiple of 32 long (the k-quants Q2_K..Q6_K need multiples of {KQUANT_ROWS}, not "
            "576 or 384, and are not offered).",
        )
    )


GGUF_Q8_0 = _register("Q8_0")
GGUF_Q5_1 = _register("Q5_1")
GGUF_Q5_0 = _register("Q5_0")
GGUF_Q4_1 = _register("Q4_1")
GGUF_Q4_0 = _register("Q4_0")
