"""Which directions of an embedding row the model is sensitive to, and what a method needs from the model
to fit (:func:`method_inputs`).

The direction metric (:func:`direction_metric`) is the empirical Fisher of the model's own loss with
respect to its input embedding, ``M = mean_t g_t g_t^T`` with ``g_t`` the gradient of the loss at
position ``t`` (next-token loss for causal models, the masked-token loss under the perplexity protocol's
masks for masked ones). A small error ``e`` in a row used at ``t`` changes the loss by about ``g_t . e``, so
``e^T M e`` is the expected squared change: the metric a compressor should minimise instead of the
Euclidean error. On SmolLM2-135M it is far from the identity: its top eigenvalue is about 300x the median
and 32 of 576 directions hold half its trace.

Calibration text: the backbone-generated everyday text (the ``smollm`` corpus, its ``train`` slice), so the
metric never sees a scored text (``bible:test``, ``pydoc:test``, ``modern``). It is computed once per
backbone and cached.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from embviz.backbones import Backbone
from embviz.cache import cached_arrays, config_key, matrix_fingerprint, optional_cache_dir
from embviz.compressors import DirectionMetric, MethodSpec, RowWeights
from embviz.corpora import load_texts
from embviz.errors import BadInputError
from embviz.frequency import DEFAULT_WEIGHT_SOURCE, WeightSource, frequency_weights
from embviz.perplexity import build_eval_set
from embviz.progress import Progress, ProgressCallback, send

CALIBRATION_CORPUS = "smollm"
"""The backbone-generated everyday text (:mod:`embviz.textgen`): never scored in a published table."""
CALIBRATION_TOKENS = 8192
"""Tokens of calibration text (32 windows of 256 for a causal model); the metric's leading directions agree
within a few per cent between independent halves of this budget on SmolLM2."""
_CACHE_VERSION = 1
_MEMO: dict[str, DirectionMetric] = {}


def _compute(backbone: Backbone, tokens: int, progress: ProgressCallback | None) -> np.ndarray:
    texts = load_texts(CALIBRATION_CORPUS, "train")
    eval_set = build_eval_set(backbone, texts, max_tokens=tokens, seed=0)
    hidden = backbone.hidden_size
    total = torch.zeros(hidden, hidden, dtype=torch.float64)
    positions, batches = 0, len(eval_set.batches)
    for index, batch in enumerate(eval_set.batches):
        gradients = backbone.input_gradients(batch.input_ids, batch.attention_mask, batch.labels)
        rows = gradients[batch.attention_mask.bool()].double()
        total += rows.T @ rows
        positions += rows.shape[0]
        send(
            progress,
            Progress(
                index + 1,
                batches,
                f"the model's direction metric (once per model): batch {index + 1}/{batches}",
            ),
        )
    if positions == 0:
        raise BadInputError("the calibration text gave no positions to measure the direction metric on")
    return (total / positions).numpy()


def direction_metric(
    backbone: Backbone, *, tokens: int = CALIBRATION_TOKENS, progress: ProgressCallback | None = None
) -> DirectionMetric:
    """The empirical Fisher of ``backbone``'s loss with respect to its input embedding, on ``tokens`` tokens
    of :data:`CALIBRATION_CORPUS` (see the module docstring). Cached per model weights, tokenizer and budget;
    a corrupt cache entry is recomputed. For SmolLM2-135M about 2 minutes at one thread (measured 117 s on a
    shared 2-core machine)."""
    if tokens < 2:
        raise BadInputError(f"the direction metric needs at least 2 calibration tokens, got {tokens}")
    config = {
        "v": _CACHE_VERSION,
        "embedding": matrix_fingerprint(backbone.embedding),
        "model": backbone.source,
        "kind": backbone.kind,
        "corpus": CALIBRATION_CORPUS,
        "tokens": tokens,
    }
    key = config_key(config)
    if key in _MEMO:
        return _MEMO[key]
    folder = optional_cache_dir("sensitivity")
    path = folder / f"{backbone.name.replace('/', '_')}-fisher-{key}.npz" if folder else None
    hidden = backbone.hidden_size

    def valid(arrays: dict[str, np.ndarray]) -> bool:
        matrix = arrays.get("fisher")
        return (
            matrix is not None
            and matrix.shape == (hidden, hidden)
            and bool(np.isfinite(matrix).all())
            and float(np.trace(matrix)) > 0
        )

    def compute() -> dict[str, np.ndarray]:
        return {"fisher": _compute(backbone, tokens, progress)}

    matrix = cached_arrays(path, compute, valid)["fisher"]
    metric = DirectionMetric(
        torch.from_numpy(matrix),
        source=f"empirical Fisher of {backbone.name}'s loss w.r.t. its input embedding on {tokens} tokens of "
        f"{CALIBRATION_CORPUS}:train (model-generated text)",
    )
    _MEMO[key] = metric
    return metric


def method_inputs(
    backbone: Backbone,
    spec: MethodSpec,
    *,
    weights: WeightSource = DEFAULT_WEIGHT_SOURCE,
    row_weights: RowWeights | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """What ``spec`` needs from the model to fit, as keyword arguments of :meth:`MethodSpec.build`:
    ``row_weights`` (token frequencies from ``weights``; ``row_weights`` given is used as is) for a
    frequency-aware method, ``direction_metric`` for one that measures errors in the model's metric
    (``progress`` hears while it is measured, the first time for a model)."""
    return spec.model_inputs(
        row_weights=lambda: row_weights or frequency_weights(backbone, source=weights),
        direction_metric=lambda: direction_metric(backbone, progress=progress),
    )


__all__ = ["CALIBRATION_CORPUS", "CALIBRATION_TOKENS", "direction_metric", "method_inputs"]
