"""The compressed-embedding container and the compressor protocol every method implements.

A compressor is configured in its constructor (scikit-learn style: parameters only, no hidden state) and
``fit(E)`` returns a :class:`CompressedEmbedding`. A low-rank result stores ``codes`` (V x r) and a decoder
(r x D weight, optional D bias) and reconstructs ``codes @ decoder + bias``; a dense result (e.g. quantised
rows) stores ``dense`` instead. Everything downstream (artifacts, metrics, perplexity, predictions, app)
works from this one type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from embviz.compressors.budget import low_rank_params
from embviz.errors import BadInputError, EmbvizError
from embviz.progress import Progress, ProgressCallback

DECODER_ACTIVATIONS = ("elu",)
MAX_SEED = 2**63 - 1


def check_seed(seed: int) -> int:
    """Validate a random seed: an integer in ``0 .. 2**63 - 1`` (what every generator used here accepts)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise BadInputError(f"seed must be an integer between 0 and {MAX_SEED}, got {seed!r}")
    return seed


def check_device(device: str) -> str:
    """Validate a torch device name (``cpu``, ``cuda``, ``cuda:1``, ...) that this machine can compute on.

    Cheap enough to call before any expensive work (it allocates one number there); returns ``device``.

    Raises:
        BadInputError: not a device name, ``cuda`` while ``torch.cuda.is_available()`` is False, a CUDA
            index beyond the devices present, or a device that cannot compute and hand results back.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BadInputError(
            f"device {device!r} cannot be used here: not a torch device name (e.g. cpu, cuda, cuda:1)"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(
                f"device {device!r} cannot be used here: torch.cuda.is_available() is False "
                f"(no CUDA device, or a CPU-only torch build: torch {torch.__version__})"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise BadInputError(
                f"device {device!r} cannot be used here: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    try:
        probe = torch.ones(1, device=parsed)
        probe.cpu()  # a device without data (``meta``) cannot hand results back
    except (RuntimeError, AssertionError, NotImplementedError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"device {device!r} cannot be used here ({reason[:160]})") from None
    return device


def float_matrix(embedding: torch.Tensor) -> torch.Tensor:
    """``embedding`` as a detached float32 CPU matrix, refusing anything that is not V x D."""
    if embedding.ndim != 2:
        raise BadInputError(f"expected a V x D matrix, got shape {tuple(embedding.shape)}")
    return embedding.detach().cpu().to(torch.float32)


def closed_form_progress(elapsed_s: float) -> Progress:
    """The one report of a fit without iterations (SVD, quantisation): done, as a single finished epoch."""
    return Progress(1, 1, "fitted", epoch=1, epochs=1, epoch_end=True, elapsed_s=elapsed_s)


class TrainingCancelled(EmbvizError):
    """A fit stopped because its progress callback returned ``False`` (at the end of an epoch); nothing
    was produced or saved."""


@dataclass
class CompressedEmbedding:
    """A compressed V x D token-embedding matrix.

    Attributes:
        method: short method id (``svd``, ``ae``, ...), used in labels and artifact names.
        config: the full configuration that produced it (JSON-serialisable), including ``rank``.
        codes: V x r code table (low-rank methods), float32.
        decoder: r x D decoder weight (low-rank methods).
        decoder_bias: D-vector added after decoding, or None.
        decoder_activation: element-wise function applied last (``"elu"`` for the non-linear AE), or None.
        dense: V x D stored matrix (dense methods such as quantisation), or None.
        history: per-epoch training records (empty for closed-form methods).
        stored_bytes: bytes the deployed form needs; defaults to float32 storage of its tensors.
        qcodes: the deployable integer codes of a quantised variant (``dense`` or ``codes`` hold their
            dequantised float32 values), or None; see :mod:`embviz.compressors.quantize`.
        qscales: float16 per-row scales that go with ``qcodes``, or None (a block format such as GGUF's keeps
            its scales inside ``qcodes``).
        qbits: uint8 code width of every row of a mixed-precision variant (its ``qcodes`` is then one flat
            buffer), or None.
    """

    method: str
    config: dict[str, Any]
    codes: torch.Tensor | None = None
    decoder: torch.Tensor | None = None
    decoder_bias: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    stored_bytes: int | None = None
    decoder_activation: str | None = None
    qcodes: torch.Tensor | None = None
    qscales: torch.Tensor | None = None
    qbits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.dense is None and (self.codes is None or self.decoder is None):
            raise ValueError("a CompressedEmbedding needs either dense rows or codes and a decoder")
        if (
            self.codes is not None
            and self.decoder is not None
            and self.codes.shape[1] != self.decoder.shape[0]
        ):
            raise ValueError(
                f"codes {tuple(self.codes.shape)} and decoder {tuple(self.decoder.shape)} disagree"
            )
        if self.decoder_activation not in (None, *DECODER_ACTIVATIONS):
            raise ValueError(f"unknown decoder activation {self.decoder_activation!r}")
        if self.qscales is not None and self.qcodes is None:
            raise ValueError("quantisation scales come with quantised codes")
        if self.qbits is not None and self.qcodes is None:
            raise ValueError("row widths come with quantised codes")

    @property
    def low_rank(self) -> bool:
        return self.dense is None

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return (self.dense.shape[0], self.dense.shape[1])
        codes, decoder = self.factors()
        return (codes.shape[0], decoder.shape[1])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, decoder)`` of a low-rank result (both are set whenever ``dense`` is None).

        Raises:
            ValueError: a dense result, which has neither.
        """
        if self.codes is None or self.decoder is None:
            raise ValueError(f"{self.method} stores dense rows, not codes and a decoder")
        return self.codes, self.decoder

    @property
    def rank(self) -> int | None:
        return int(self.codes.shape[1]) if self.codes is not None else None

    @property
    def params(self) -> int:
        """Stored parameters (numbers), as counted by the budget rule."""
        if self.dense is not None:
            return int(self.dense.numel())
        vocab, hidden = self.shape
        return low_rank_params(vocab, hidden, self.rank or 0, decoder_bias=self.decoder_bias is not None)

    @property
    def bytes(self) -> int:
        return int(self.stored_bytes) if self.stored_bytes is not None else 4 * self.params

    @property
    def ratio(self) -> float:
        """Compression ratio in parameters: V*D / stored parameters."""
        vocab, hidden = self.shape
        return vocab * hidden / self.params

    @property
    def byte_ratio(self) -> float:
        """Compression ratio in bytes against the float32 original."""
        vocab, hidden = self.shape
        return 4 * vocab * hidden / self.bytes

    @property
    def bits_per_weight(self) -> float:
        """Every stored byte (codes, scales, codebooks, decoders, biases, per-row widths) x 8, over V*D: the
        figure llama.cpp's formats are quoted in (GGUF Q8_0 8.5, Q4_0 4.5; float32 32, bfloat16 16)."""
        vocab, hidden = self.shape
        return 8 * self.bytes / (vocab * hidden)

    @property
    def bytes_vs_bf16(self) -> float:
        """Compression ratio in bytes against the matrix in bfloat16 (16 bits per weight)."""
        return 16 / self.bits_per_weight

    def facts(self) -> dict[str, Any]:
        """What it is and what it costs: ``method``, ``label``, ``rank``, ``ratio``, ``params``, ``bytes``,
        ``byte_ratio`` (against float32), ``bits_per_weight`` and ``bytes_vs_bf16`` (against bfloat16)."""
        return {
            "method": self.method,
            "label": self.label,
            "rank": self.rank,
            "ratio": round(self.ratio, 4),
            "params": self.params,
            "bytes": self.bytes,
            "byte_ratio": round(self.byte_ratio, 4),
            "bits_per_weight": round(self.bits_per_weight, 4),
            "bytes_vs_bf16": round(self.bytes_vs_bf16, 4),
        }

    def reconstruct(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The reconstructed matrix (or the given rows of it), float32."""
        if self.dense is not None:
            return self.dense if rows is None else self.dense[rows]
        codes, decoder = self.factors()
        out = (codes if rows is None else codes[rows]) @ decoder
        if self.decoder_bias is not None:
            out = out + self.decoder_bias
        return torch.nn.functional.elu(out) if self.decoder_activation == "elu" else out

    @property
    def label(self) -> str:
        """A short human label, e.g. ``AE (paper loss) r=64``."""
        return str(self.config.get("label") or f"{self.method} r={self.rank}")


class Compressor(Protocol):
    """What every compression method provides."""

    @property
    def method(self) -> str:
        """The short method id of what :meth:`fit` returns (``svd``, ``ae``, ...)."""
        ...

    @property
    def label(self) -> str:
        """A short human label for the method and its settings."""
        ...

    def fit(self, embedding: torch.Tensor, progress: ProgressCallback | None = None) -> CompressedEmbedding:
        """Compress the V x D matrix ``embedding``."""
        ...

    def get_config(self) -> dict[str, Any]:
        """The constructor parameters (JSON-serialisable), enough to rebuild the compressor."""
        ...
