"""The compressed-embedding container and the compressor protocol every method implements.

A compressor is configured in its constructor (scikit-learn style: parameters only, no hidden state) and
``fit(E)`` returns a :class:`CompressedEmbedding`. A low-rank result stores ``codes`` (V x r) and a decoder
(r x D weight, optional D bias) and reconstructs ``codes @ decoder + bias``; a dense result (e.g. quantised
rows) stores ``dense`` instead. Everything downstream (artifacts, metrics, perplexity, predictions, app)
works from this one type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from embviz.compressors.budget import low_rank_params
from embviz.errors import BadInputError, EmbvizError

DECODER_ACTIVATIONS = ("elu",)
MAX_SEED = 2**63 - 1


def check_seed(seed: int) -> int:
    """Validate a random seed: an integer in ``0 .. 2**63 - 1`` (what every generator used here accepts)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise BadInputError(f"seed must be an integer between 0 and {MAX_SEED}, got {seed!r}")
    return seed


def check_device(device: str) -> str:
    """Validate a torch device name (``cpu``, ``cuda``, ``cuda:1``, ...) that this machine can compute on."""
    try:
        probe = torch.ones(1, device=device)
        probe.cpu()  # a device without data (``meta``) cannot hand results back
    except (RuntimeError, AssertionError, NotImplementedError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"device {device!r} cannot be used here ({reason[:160]})") from None
    return device


@dataclass(frozen=True)
class TrainingProgress:
    """One progress report from a fit: sent after every logged step and at every epoch end."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    terms: dict[str, float]
    elapsed_s: float
    epoch_end: bool = False


ProgressCallback = Callable[[TrainingProgress], bool | None]
"""Receives progress; returning ``False`` cancels the fit at the next epoch boundary."""


class TrainingCancelled(EmbvizError):
    """A fit stopped because its progress callback returned ``False``; nothing was produced or saved."""


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
        qscales: float16 per-row scales that go with ``qcodes``, or None.
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
        if (self.qcodes is None) != (self.qscales is None):
            raise ValueError("quantised codes and their scales come together")
        if self.qbits is not None and self.qcodes is None:
            raise ValueError("row widths come with quantised codes")

    @property
    def low_rank(self) -> bool:
        return self.dense is None

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return tuple(self.dense.shape)  # type: ignore[return-value]
        return (self.codes.shape[0], self.decoder.shape[1])  # type: ignore[union-attr]

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

    def facts(self) -> dict[str, Any]:
        """What it is and what it costs: ``method``, ``label``, ``rank``, ``ratio``, ``params``, ``bytes``,
        ``byte_ratio``."""
        return {
            "method": self.method,
            "label": self.label,
            "rank": self.rank,
            "ratio": round(self.ratio, 4),
            "params": self.params,
            "bytes": self.bytes,
            "byte_ratio": round(self.byte_ratio, 4),
        }

    def reconstruct(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The reconstructed matrix (or the given rows of it), float32."""
        if self.dense is not None:
            return self.dense if rows is None else self.dense[rows]
        codes = self.codes if rows is None else self.codes[rows]  # type: ignore[index]
        out = codes @ self.decoder  # type: ignore[operator]
        if self.decoder_bias is not None:
            out = out + self.decoder_bias
        return torch.nn.functional.elu(out) if self.decoder_activation == "elu" else out

    @property
    def label(self) -> str:
        """A short human label, e.g. ``AE (paper loss) r=64``."""
        return str(self.config.get("label") or f"{self.method} r={self.rank}")


class Compressor(Protocol):
    """What every compression method provides."""

    method: str

    def fit(self, embedding: torch.Tensor, progress: ProgressCallback | None = None) -> CompressedEmbedding:
        """Compress the V x D matrix ``embedding``."""
        ...

    def get_config(self) -> dict[str, Any]:
        """The constructor parameters (JSON-serialisable), enough to rebuild the compressor."""
        ...
