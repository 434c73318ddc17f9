"""Compressors of the token-embedding matrix: exact SVD, the direction-loss AutoEncoder, quantisation.

Every method is a :class:`~embviz.compressors.registry.MethodSpec` registered by the module that
implements it (:mod:`.svd`, :mod:`.autoencoder`, :mod:`.quantize`, :mod:`.gguf_formats`, :mod:`.vq`); importing
this package registers them
all. :func:`make_compressor` builds one by id, :func:`compressor_from_config` rebuilds one from a stored
configuration, and :func:`~embviz.compressors.registry.get_method` answers everything else (label,
family, sizing, whether it trains, what it stores).
"""

from __future__ import annotations

from typing import Any

from embviz.compressors.autoencoder import RECIPES, SIMPLE_LOSSES, AECompressor
from embviz.compressors.base import CompressedEmbedding, Compressor, TrainingCancelled, check_device
from embviz.compressors.budget import (
    UnreachableBudget,
    check_bits_per_weight,
    check_rank,
    low_rank_params,
    rank_for_bits,
    rank_for_ratio,
    ratio_for_rank,
)
from embviz.compressors.gguf_formats import GGUFQuantizer
from embviz.compressors.quality import reconstruction_quality
from embviz.compressors.quantize import MixedPrecisionRows, QuantizedLowRank, RowQuantizer
from embviz.compressors.registry import (
    MethodSpec,
    Size,
    all_methods,
    find_method,
    get_method,
    method_ids,
    method_label,
    register_method,
    registered,
    unregister_method,
)
from embviz.compressors.selection import VariantRequest, parse_variant
from embviz.compressors.svd import SVDCompressor
from embviz.compressors.vq import DirectionVQ
from embviz.compressors.weights import DirectionMetric, RowWeights
from embviz.errors import BadInputError
from embviz.progress import ProgressCallback


def make_compressor(
    method_id: str,
    rank: int | None,
    *,
    row_weights: RowWeights | None = None,
    direction_metric: DirectionMetric | None = None,
    ratio: float | None = None,
    **options: Any,
) -> Compressor:
    """The compressor for ``method_id`` at latent size ``rank`` (``ratio`` for byte-sized methods).

    ``options`` go to the method's constructor and must be among its spec's ``options`` (e.g. ``seed``;
    ``recipe``, ``epochs``, ``lr`` for the AE), except ``device``, which every method accepts: the exact
    SVDs, the AEs and the direction VQ fit there, the others on the CPU (see
    :data:`~embviz.compressors.registry.DEVICE_OPTION`). A fixed-size method ignores ``rank``;
    frequency-aware methods need ``row_weights``, and methods that measure errors in the model's metric its
    ``direction_metric`` (:mod:`embviz.sensitivity`). To turn a ratio into a rank, use
    ``get_method(id).size(V, D, ratio=...)`` first.

    Raises:
        BadInputError: unknown id, missing size or row weights, or an option the method does not take.
    """
    spec = get_method(method_id)
    if spec.sizing == "rank":
        if rank is None:
            raise BadInputError(f"method {method_id!r} needs a rank")
        size = Size(rank=rank)
    elif spec.sizing == "bytes":
        if ratio is None:
            raise BadInputError(f"method {method_id!r} is sized by a byte ratio, not a rank")
        size = Size(ratio=ratio)
    else:
        size = Size()
    return spec.build(size, row_weights=row_weights, direction_metric=direction_metric, **options)


def compressor_from_config(config: dict[str, Any], **overrides: Any) -> Compressor:
    """Rebuild the compressor that produced ``config`` (a :meth:`Compressor.get_config` result).

    Frequency-aware methods need their ``row_weights`` passed again in ``overrides``.
    """
    return get_method(config["method"]).from_config(config, **overrides)


__all__ = [
    "RECIPES",
    "SIMPLE_LOSSES",
    "AECompressor",
    "CompressedEmbedding",
    "Compressor",
    "DirectionMetric",
    "DirectionVQ",
    "GGUFQuantizer",
    "MethodSpec",
    "MixedPrecisionRows",
    "ProgressCallback",
    "QuantizedLowRank",
    "RowQuantizer",
    "RowWeights",
    "SVDCompressor",
    "Size",
    "TrainingCancelled",
    "UnreachableBudget",
    "VariantRequest",
    "all_methods",
    "check_bits_per_weight",
    "check_device",
    "check_rank",
    "compressor_from_config",
    "find_method",
    "get_method",
    "low_rank_params",
    "make_compressor",
    "method_ids",
    "method_label",
    "parse_variant",
    "rank_for_bits",
    "rank_for_ratio",
    "ratio_for_rank",
    "reconstruction_quality",
    "register_method",
    "registered",
    "unregister_method",
]
