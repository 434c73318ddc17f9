"""Compressors of the token-embedding matrix: exact SVD, the direction-loss AutoEncoder, and more."""

from embviz.compressors.base import CompressedEmbedding, Compressor, ProgressCallback, TrainingProgress
from embviz.compressors.budget import check_rank, low_rank_params, rank_for_ratio, ratio_for_rank

__all__ = [
    "CompressedEmbedding",
    "Compressor",
    "ProgressCallback",
    "TrainingProgress",
    "check_rank",
    "low_rank_params",
    "rank_for_ratio",
    "ratio_for_rank",
]
