"""Compressors of the token-embedding matrix: exact SVD, the direction-loss AutoEncoder, quantisation.

Method ids (used by the sweep, the app and the CLI) map to compressors through :func:`make_compressor`;
:data:`METHODS` gives each id its human label.
"""

from __future__ import annotations

from typing import Any

from embviz.compressors.autoencoder import RECIPES, AECompressor
from embviz.compressors.base import (
    CompressedEmbedding,
    Compressor,
    ProgressCallback,
    TrainingCancelled,
    TrainingProgress,
)
from embviz.compressors.budget import check_rank, low_rank_params, rank_for_ratio, ratio_for_rank
from embviz.compressors.quality import reconstruction_quality
from embviz.compressors.quantize import QuantizedLowRank, RowQuantizer
from embviz.compressors.svd import SVDCompressor
from embviz.errors import BadInputError

METHODS: dict[str, str] = {
    "svd": "SVD (exact)",
    "svd-randomized": "randomised SVD (original baseline)",
    "ae-paper": "AE, paper loss",
    "ae-cosine": "AE, cosine loss",
    "ae-mse": "AE, MSE loss",
    "ae-weighted": "AE, free-weights loss",
    "quant-int8": "int8 rows (per-row scale)",
    "quant-int4": "int4 rows (per-row scale)",
    "svd-int8": "SVD, int8 codes + fp16 decoder",
    "svd-int4": "SVD, int4 codes + fp16 decoder",
}
"""Method id -> human label."""

DENSE_METHODS = ("quant-int8", "quant-int4")
"""Methods without a rank (their size is fixed by the code width); :func:`make_compressor` ignores it."""
QUANTIZED_LOW_RANK = ("svd-int8", "svd-int4")
"""Low-rank methods with quantised codes: their sweep ratios are byte ratios (SPEC §2, equal bytes)."""


def method_bits(method_id: str) -> int:
    """The code width of a quantised method id (``quant-int4`` -> 4)."""
    return int(method_id.rsplit("-int", 1)[1])


def make_compressor(method_id: str, rank: int | None, **options: Any) -> Compressor:
    """The compressor for ``method_id`` at latent size ``rank``.

    ``options`` go to the constructor: ``n_iter``/``seed`` for SVD; ``recipe``, ``epochs``, ``batch_size``,
    ``lr``, ``seed``, ``nonlinear``, ``warm_start``, ``loss_weights`` (``ae-weighted``), ``device`` for the
    AE (whose loss is the id's suffix); ``seed`` for the dense quantisers, whose ``rank`` is ignored (pass
    None). The code width is the id's suffix. Unknown ids or options raise :class:`BadInputError`.
    """
    if method_id not in METHODS:
        raise BadInputError(f"unknown method {method_id!r}; choose one of {', '.join(METHODS)}")
    if rank is None and method_id not in DENSE_METHODS:
        raise BadInputError(f"method {method_id!r} needs a rank")
    try:
        if method_id in DENSE_METHODS:
            return RowQuantizer(bits=method_bits(method_id), **options)
        if method_id in QUANTIZED_LOW_RANK:
            return QuantizedLowRank(rank, base_method="svd", bits=method_bits(method_id), **options)  # type: ignore[arg-type]
        if method_id.startswith("svd"):
            return SVDCompressor(rank, randomized=method_id == "svd-randomized", **options)
        return AECompressor(rank, loss=method_id.removeprefix("ae-"), **options)
    except TypeError as exc:
        raise BadInputError(f"bad option for method {method_id!r}: {exc}") from exc


def compressor_from_config(config: dict[str, Any], **overrides: Any) -> Compressor:
    """Rebuild the compressor that produced ``config`` (a :meth:`Compressor.get_config` result)."""
    method = config["method"]
    if method in DENSE_METHODS:
        options = {"seed": config["seed"]}
    elif method in QUANTIZED_LOW_RANK:
        options = {}
    elif method.startswith("svd"):
        options = {key: config[key] for key in ("n_iter", "seed") if key in config}
    else:
        options = {key: config[key] for key in ("recipe", "epochs", "batch_size", "lr", "seed", "nonlinear")}
        options["warm_start"] = config["warm_start"]
        if method == "ae-weighted":
            options["loss_weights"] = config["loss_weights"]
    return make_compressor(method, config.get("rank"), **{**options, **overrides})


__all__ = [
    "DENSE_METHODS",
    "METHODS",
    "QUANTIZED_LOW_RANK",
    "RECIPES",
    "AECompressor",
    "CompressedEmbedding",
    "Compressor",
    "ProgressCallback",
    "QuantizedLowRank",
    "RowQuantizer",
    "SVDCompressor",
    "TrainingCancelled",
    "TrainingProgress",
    "check_rank",
    "compressor_from_config",
    "low_rank_params",
    "make_compressor",
    "method_bits",
    "rank_for_ratio",
    "ratio_for_rank",
    "reconstruction_quality",
]
