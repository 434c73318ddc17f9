"""Whole-vocabulary reconstruction quality of a compressed embedding, computed over row blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from embviz.compressors.base import CompressedEmbedding

BLOCK_ROWS = 8192


def reconstruction_quality(
    embedding: torch.Tensor, compressed: CompressedEmbedding, block_rows: int = BLOCK_ROWS
) -> dict[str, float]:
    """Mean / min cosine between original and reconstructed rows, and ``||E - E^||_F / ||E||_F``.

    Memory stays bounded by ``block_rows`` x D; per-row values are float32, their sums float64. A zero
    original row counts as cosine 0 (as ``torch.nn.functional.cosine_similarity`` defines it).
    """
    vocab = embedding.shape[0]
    if compressed.shape != tuple(embedding.shape):
        raise ValueError(
            f"compressed shape {compressed.shape} does not match the matrix {tuple(embedding.shape)}"
        )
    cosine_sum = error_sq = norm_sq = 0.0
    min_cosine = 1.0
    for start in range(0, vocab, block_rows):
        original = embedding[start : start + block_rows].detach().to(torch.float32)
        approx = compressed.reconstruct(slice(start, start + block_rows)).detach().to(original)
        cosines = F.cosine_similarity(approx, original, dim=1)
        cosine_sum += float(cosines.sum(dtype=torch.float64))
        min_cosine = min(min_cosine, float(cosines.min()))
        error_sq += float((approx - original).pow(2).sum(dim=1).sum(dtype=torch.float64))
        norm_sq += float(original.pow(2).sum(dim=1).sum(dtype=torch.float64))
    return {
        "mean_cosine": cosine_sum / vocab,
        "min_cosine": min_cosine,
        "relative_error": (error_sq / norm_sq) ** 0.5 if norm_sq else float("nan"),
    }
