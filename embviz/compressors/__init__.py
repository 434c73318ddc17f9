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
from embviz.compressors.quantize import MixedPrecisionRows, QuantizedLowRank, RowQuantizer
from embviz.compressors.svd import SVDCompressor
from embviz.compressors.weights import RowWeights
from embviz.errors import BadInputError

METHODS: dict[str, str] = {
    "svd": "SVD (exact)",
    "svd-randomized": "randomised SVD (original baseline)",
    "ae-paper": "AE, paper loss",
    "ae-cosine": "AE, cosine loss",
    "ae-mse": "AE, MSE loss",
    "ae-weighted": "AE, free-weights loss",
    "ae-paper-elu": "non-linear (ELU) AE, paper loss",
    "svd-freq": "SVD, frequency-weighted",
    "ae-paper-freq": "AE, paper loss, frequency-weighted rows",
    "quant-int8": "int8 rows (per-row scale)",
    "quant-int4": "int4 rows (per-row scale)",
    "quant-mixed": "mixed int8/int4/int2 rows, frequency-aware",
    "svd-int8": "SVD, int8 codes + fp16 decoder",
    "svd-int4": "SVD, int4 codes + fp16 decoder",
    "svd-freq-int8": "SVD, frequency-weighted, int8 codes + fp16 decoder",
    "ae-paper-int8": "AE, paper loss, int8 codes + fp16 decoder",
}
"""Method id -> human label."""

DENSE_METHODS = ("quant-int8", "quant-int4")
"""Methods without a rank (their size is fixed by the code width); :func:`make_compressor` ignores it."""
BUDGETED_METHODS = ("quant-mixed",)
"""Methods without a rank that are sized by a byte ratio (``ratio=``)."""
QUANTIZED_LOW_RANK = tuple(
    method for method in METHODS if "-int" in method and not method.startswith("quant")
)
"""Low-rank methods with quantised codes (``<base method>-int<bits>``)."""
FREQUENCY_METHODS = tuple(method for method in METHODS if "freq" in method or method == "quant-mixed")
"""Methods that need row weights (token frequencies from a train slice, see :mod:`embviz.frequency`)."""


def method_bits(method_id: str) -> int:
    """The code width of a quantised method id (``quant-int4`` -> 4)."""
    return int(method_id.rsplit("-int", 1)[1])


def base_method(method_id: str) -> str:
    """The float low-rank method under a quantised one (``svd-freq-int8`` -> ``svd-freq``), else itself."""
    return method_id.rsplit("-int", 1)[0] if method_id in QUANTIZED_LOW_RANK else method_id


def has_decoder_bias(method_id: str) -> bool:
    """Whether the method's decoder has a bias (every AE), which the budget rule counts."""
    return base_method(method_id).startswith("ae")


def check_method(method_id: str) -> str:
    """Validate a method id (one of :data:`METHODS`)."""
    if method_id not in METHODS:
        raise BadInputError(f"unknown method {method_id!r}; choose one of {', '.join(METHODS)}")
    return method_id


def make_compressor(
    method_id: str,
    rank: int | None,
    *,
    row_weights: RowWeights | None = None,
    ratio: float | None = None,
    **options: Any,
) -> Compressor:
    """The compressor for ``method_id`` at latent size ``rank``.

    ``options`` go to the constructor: ``n_iter``/``seed`` for SVD; ``recipe``, ``epochs``, ``batch_size``,
    ``lr``, ``seed``, ``warm_start``, ``loss_weights`` (``ae-weighted``), ``device`` for the AE (whose loss
    is the id's second part; ``-elu`` makes it non-linear); ``seed`` for the dense quantisers, whose ``rank``
    is ignored (pass None). Quantised ids (``...-int8``) wrap their base method. Frequency-aware ids
    (:data:`FREQUENCY_METHODS`) need ``row_weights``; ``quant-mixed`` needs ``ratio`` (bytes) instead of a
    rank. Unknown ids or options raise :class:`BadInputError`.
    """
    check_method(method_id)
    if method_id in FREQUENCY_METHODS and row_weights is None:
        raise BadInputError(f"method {method_id!r} is frequency-aware: it needs row weights (token counts)")
    if method_id not in FREQUENCY_METHODS and row_weights is not None:
        raise BadInputError(f"method {method_id!r} does not take row weights")
    if method_id in BUDGETED_METHODS:
        if ratio is None:
            raise BadInputError(f"method {method_id!r} is sized by a byte ratio, not a rank")
        return MixedPrecisionRows(ratio, row_weights, **options)  # type: ignore[arg-type]
    if rank is None and method_id not in DENSE_METHODS:
        raise BadInputError(f"method {method_id!r} needs a rank")
    try:
        if method_id in DENSE_METHODS:
            return RowQuantizer(bits=method_bits(method_id), **options)
        base = _low_rank(base_method(method_id), rank, row_weights, options)  # type: ignore[arg-type]
        if method_id in QUANTIZED_LOW_RANK:
            return QuantizedLowRank(base, bits=method_bits(method_id))
        return base
    except TypeError as exc:
        raise BadInputError(f"bad option for method {method_id!r}: {exc}") from exc


def _low_rank(
    method_id: str, rank: int, row_weights: RowWeights | None, options: dict[str, Any]
) -> Compressor:
    if method_id.startswith("svd"):
        return SVDCompressor(
            rank, randomized=method_id == "svd-randomized", row_weights=row_weights, **options
        )
    _, loss, *flags = method_id.split("-")
    return AECompressor(rank, loss=loss, nonlinear="elu" in flags, row_weights=row_weights, **options)


def compressor_from_config(config: dict[str, Any], **overrides: Any) -> Compressor:
    """Rebuild the compressor that produced ``config`` (a :meth:`Compressor.get_config` result).

    Frequency-aware methods need their ``row_weights`` passed again in ``overrides``.
    """
    method = config["method"]
    if method in DENSE_METHODS:
        options = {"seed": config["seed"]}
    elif method in BUDGETED_METHODS:
        options = {"ratio": config["ratio"]}
    elif method in QUANTIZED_LOW_RANK:
        base = compressor_from_config(config["base"], **overrides)
        return QuantizedLowRank(base, bits=config["bits"])
    elif method.startswith("svd"):
        options = {key: config[key] for key in ("n_iter", "seed") if key in config}
    else:
        options = {key: config[key] for key in ("recipe", "epochs", "batch_size", "lr", "seed")}
        options["warm_start"] = config["warm_start"]
        if method == "ae-weighted":
            options["loss_weights"] = config["loss_weights"]
    return make_compressor(method, config.get("rank"), **{**options, **overrides})


__all__ = [
    "BUDGETED_METHODS",
    "DENSE_METHODS",
    "FREQUENCY_METHODS",
    "METHODS",
    "QUANTIZED_LOW_RANK",
    "RECIPES",
    "AECompressor",
    "CompressedEmbedding",
    "Compressor",
    "MixedPrecisionRows",
    "ProgressCallback",
    "QuantizedLowRank",
    "RowQuantizer",
    "RowWeights",
    "SVDCompressor",
    "TrainingCancelled",
    "TrainingProgress",
    "base_method",
    "check_method",
    "check_rank",
    "compressor_from_config",
    "has_decoder_bias",
    "low_rank_params",
    "make_compressor",
    "method_bits",
    "rank_for_ratio",
    "ratio_for_rank",
    "reconstruction_quality",
]
