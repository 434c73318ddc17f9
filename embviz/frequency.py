"""Token-frequency weights from the bundled corpora's ``train`` slices, for frequency-aware compressors.

Perplexity is dominated by frequent tokens, so a compressor that spends its budget where the text is gets
far more out of it (weighted SVD, a frequency-weighted AE loss, mixed-precision rows). Weights always come
from ``train`` slices, never from a slice that is evaluated, and are cached per vocabulary by
:func:`embviz.metrics.corpus_frequencies`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from embviz.backbones import Backbone
from embviz.compressors.weights import RowWeights
from embviz.corpora import CORPORA
from embviz.metrics import corpus_frequencies

WEIGHT_CORPORA: tuple[str, ...] = tuple(CORPORA)
"""Corpora whose ``train`` slices are counted (all of them)."""
DEFAULT_POWER = 1.0
"""Weight = (count + 1) ** power; 1 weights rows by how often they occur (best measured perplexity)."""


def train_counts(backbone: Backbone, corpora: Sequence[str] = WEIGHT_CORPORA) -> np.ndarray:
    """How often each token occurs in the ``train`` slices of ``corpora`` (int64, one per vocabulary row)."""
    counts = np.zeros(backbone.vocab_size, dtype=np.int64)
    for corpus in corpora:
        counts += corpus_frequencies(backbone.tokenizer, backbone.tokens, corpus, "train")[
            : backbone.vocab_size
        ]
    return counts


def frequency_weights(
    backbone: Backbone, power: float = DEFAULT_POWER, corpora: Sequence[str] = WEIGHT_CORPORA
) -> RowWeights:
    """Row weights ``(count + 1) ** power`` from the train slices (add-one so unseen tokens still count)."""
    counts = torch.from_numpy(train_counts(backbone, corpora).astype(np.float64))
    source = f"token counts in the train slices of {', '.join(corpora)}"
    return RowWeights((counts + 1.0) ** power, source=source, power=power)
