"""The evaluation engine: backbone -> compressed variant -> perplexity, neighbour recall and geometry.

This is the one place that strings the modules together, for the CLI (``evaluate``, ``sweep``,
``predict``), the app's perplexity page and the benchmark:

* :func:`evaluate_variant` scores one compressed embedding: zero-shot perplexity next to the uncompressed
  model's under the same protocol and masks (:mod:`embviz.perplexity`, disk-cached per variant), recall@k of
  the full-vocabulary cosine neighbours (:mod:`embviz.metrics`, the variant searched through its low-rank
  factors), reconstruction angles, norm ratios, cosines and the relative error.
* :func:`sweep` compresses the backbone with every (method, ratio or rank) pair through the artifact cache
  (:func:`embviz.artifacts.compress_cached`), evaluates each, and adds the uncompressed row.

Everything is deterministic and cached (artifacts, perplexities, neighbour tables), so a repeated call is
fast and returns the same numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from embviz.artifacts import (
    TENSOR_NAMES,
    ArtifactError,
    compress_cached,
    load_artifact,
    matrix_fingerprint,
    read_manifest,
)
from embviz.backbones import MODES, Backbone, Mode
from embviz.cache import sha256_bytes
from embviz.compressors import (
    BUDGETED_METHODS,
    DENSE_METHODS,
    FREQUENCY_METHODS,
    QUANTIZED_LOW_RANK,
    CompressedEmbedding,
    Compressor,
    TrainingProgress,
    base_method,
    check_method,
    check_rank,
    has_decoder_bias,
    make_compressor,
    method_bits,
    rank_for_ratio,
    reconstruction_quality,
)
from embviz.compressors.quantize import QuantizedLowRank, quantized_rows_bytes
from embviz.corpora import resolve_texts
from embviz.errors import BadInputError
from embviz.frequency import frequency_weights
from embviz.frontier import frontier
from embviz.metrics import neighbour_table_cached, recall_at_k, reconstruction_angles, summary
from embviz.perplexity import (
    DEFAULT_MAX_TOKENS,
    REFERENCE,
    PerplexityProgress,
    VariantPerplexity,
    build_eval_set,
    evaluate_perplexity,
)

logger = logging.getLogger(__name__)

DEFAULT_TEXT = "bible:test"
DEFAULT_K = 10
DEFAULT_RATIOS: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
UNCOMPRESSED = "uncompressed"
_VARIANT = "compressed"
SIZINGS: tuple[str, ...] = ("params", "bytes")
"""How a sweep ratio sizes a quantised low-rank method: equal parameters or equal bytes with float32."""

Progress = Callable[[float, int, str], None]
"""``(done, total, message)``: ``done`` of ``total`` steps finished (fractional while one runs)."""

SWEEP_COLUMNS: tuple[str, ...] = (
    "method",
    "label",
    "target_ratio",
    "ratio",
    "rank",
    "params",
    "bytes",
    "byte_ratio",
    "perplexity",
    "vs_original",
    "frontier",
    "recall_at_k",
    "mean_angle_deg",
    "median_angle_deg",
    "mean_norm_ratio",
    "mean_cosine",
    "relative_error",
    "train_seconds",
    "seconds",
    "cached",
    "artifact",
)
"""The keys of every :func:`sweep` row, in order (the protocol and settings follow them)."""


def _quiet(done: float, total: int, message: str) -> None:
    """The default progress callback: ignore."""


def variant_key(compressed: CompressedEmbedding) -> str:
    """A content hash of a compressed embedding (its stored tensors and decoder activation).

    Used to key the variant's cached perplexities and neighbour tables; the tensors' fingerprints are
    memoised, so this is cheap after the first call.
    """
    parts = [
        f"{name}:{matrix_fingerprint(tensor)}"
        for name in TENSOR_NAMES
        if (tensor := getattr(compressed, name)) is not None
    ]
    parts.append(f"activation:{compressed.decoder_activation}")
    return sha256_bytes("|".join(parts).encode())[:32]


def variant_name(compressed: CompressedEmbedding) -> str:
    """A short column name for a variant: ``svd r=64``, ``ae-paper r=64`` (dense variants: the method)."""
    return f"{compressed.method} r={compressed.rank}" if compressed.rank is not None else compressed.method


def load_variant(backbone: Backbone, path: str | Path) -> CompressedEmbedding:
    """Load the artifact at ``path`` after checking that it was made from ``backbone``'s embedding matrix.

    Raises:
        ArtifactError: missing, corrupt or tampered with, or made from another matrix (the message names
            the backbone it belongs to).
    """
    fingerprint = matrix_fingerprint(backbone.embedding)
    manifest = read_manifest(Path(path))
    if manifest.get("fingerprint") != fingerprint:
        raise ArtifactError(
            f"artifact {path} belongs to {manifest.get('backbone')!r}, not to {backbone.name} "
            "(it was made from a different embedding matrix)"
        )
    return load_artifact(Path(path), fingerprint)


class _Evaluator:
    """One evaluation protocol on one backbone (text, masks, mode, k), shared by every variant scored."""

    def __init__(
        self, backbone: Backbone, *, text: str, mode: Mode, k: int, max_tokens: int | None, seed: int
    ) -> None:
        if mode not in MODES:
            raise BadInputError(f"unknown substitution mode {mode!r}; use one of {', '.join(MODES)}")
        if mode == "tied" and not backbone.tied:
            raise BadInputError(f"{backbone.name} has separate input and output embeddings: use mode 'input'")
        if not isinstance(k, int) or not 1 <= k < backbone.vocab_size:
            raise BadInputError(f"k must be between 1 and {backbone.vocab_size - 1}, got {k!r}")
        self.backbone, self.text, self.mode, self.k = backbone, text, mode, k
        self.eval_set = build_eval_set(
            backbone,
            resolve_texts(text),
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            seed=seed,
        )

    @property
    def protocol(self) -> str:
        """How every number is measured, in words."""
        vocab = self.backbone.vocab_size
        substitution = (
            "only the input embedding is replaced (the output layer keeps the original matrix)"
            if self.mode == "input"
            else "the input embedding and the tied output layer are both replaced"
        )
        return (
            f"perplexity on {self.text!r}: {self.eval_set.description}; {substitution}. "
            f"recall@{self.k}: share of each token's exact top-{self.k} cosine neighbours (full dimension, "
            f"all {vocab:,} tokens) kept by the variant, averaged over the vocabulary. Angles and norm "
            f"ratios: each of the {vocab:,} rows against its reconstruction."
        )

    @cached_property
    def original_neighbours(self) -> np.ndarray:
        embedding = self.backbone.embedding
        indices, _ = neighbour_table_cached(
            self.backbone.name, matrix_fingerprint(embedding), embedding, self.k
        )
        return indices

    def perplexity(
        self, compressed: CompressedEmbedding | None = None, progress: Progress = _quiet
    ) -> dict[str, VariantPerplexity]:
        """``{"original": ..., "compressed": ...}`` (just the original when ``compressed`` is None), cached."""
        variants, keys = {}, {}
        if compressed is not None:
            variants[_VARIANT] = compressed.reconstruct()
            keys[_VARIANT] = variant_key(compressed)

        def report(update: PerplexityProgress) -> None:
            progress(update.fraction, 1, f"perplexity ({update.variant})")

        report_ = evaluate_perplexity(
            self.backbone, self.eval_set, variants, mode=self.mode, variant_keys=keys, progress=report
        )
        return dict(report_.results)

    def evaluate(self, compressed: CompressedEmbedding, progress: Progress = _quiet) -> dict[str, Any]:
        """Every figure for one variant (see :func:`evaluate_variant`)."""
        started = time.perf_counter()
        embedding = self.backbone.embedding
        stages = 3
        results = self.perplexity(compressed, lambda done, _, message: progress(done, stages, message))
        original, variant = results[REFERENCE], results[_VARIANT]
        progress(1, stages, f"recall@{self.k} over {self.backbone.vocab_size:,} tokens")
        variant_table, _ = neighbour_table_cached(
            f"{self.backbone.name}-{compressed.method}",
            variant_key(compressed),
            compressed,  # type: ignore[arg-type]  # a CompressedEmbedding is searched through its factors
            self.k,
        )
        recall = recall_at_k(self.original_neighbours, variant_table)
        progress(2, stages, "angles and reconstruction quality")
        angles = reconstruction_angles(embedding, compressed)
        geometry = summary(angles.degrees, angles.norm_ratio)
        quality = reconstruction_quality(embedding, compressed)
        progress(stages, stages, "evaluated")
        return {
            "backbone": self.backbone.name,
            **compressed.facts(),
            "text": self.text,
            "mode": self.mode,
            "k": self.k,
            "perplexity": {"original": original.perplexity, "compressed": variant.perplexity},
            "vs_original": round(variant.perplexity / original.perplexity, 4),
            "recall_at_k": round(recall.mean, 6),
            "mean_angle_deg": geometry["mean_angle"],
            "median_angle_deg": geometry["median_angle"],
            "mean_norm_ratio": geometry["mean_norm_ratio"],
            **{name: round(value, 6) for name, value in quality.items()},
            "tokens_scored": variant.tokens,
            "perplexity_cached": variant.cached,
            "protocol": self.protocol,
            "seconds": round(time.perf_counter() - started, 3),
        }


def evaluate_variant(
    backbone: Backbone,
    compressed: CompressedEmbedding,
    *,
    text: str = DEFAULT_TEXT,
    mode: Mode = "input",
    k: int = DEFAULT_K,
    max_tokens: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity, neighbour recall and reconstruction geometry of one compressed embedding.

    ``text`` is a corpus (``bible:test``) or a text file; ``mode`` the substitution (``input`` or ``tied``);
    ``max_tokens`` the held-out budget (default :data:`embviz.perplexity.DEFAULT_MAX_TOKENS`); ``seed`` fixes
    the masks of masked models. Returns a JSON-ready dict: ``perplexity`` (``original``, ``compressed``),
    ``vs_original``, ``recall_at_k``, ``mean_angle_deg``, ``median_angle_deg``, ``mean_norm_ratio``,
    ``mean_cosine``, ``min_cosine``, ``relative_error``, ``rank``, ``ratio``, ``params``, ``bytes``,
    ``method``, ``label``, ``protocol`` (in words), ``seconds`` and the settings. Perplexities and neighbour
    tables are cached on disk, so a repeated call is fast.

    Raises:
        BadInputError: unknown corpus / split / file, bad mode or k, text too short for the protocol.
    """
    evaluator = _Evaluator(backbone, text=text, mode=mode, k=k, max_tokens=max_tokens, seed=seed)
    return evaluator.evaluate(compressed, progress or _quiet)


@dataclass(frozen=True)
class _Job:
    """One (method, size) pair of a sweep."""

    method: str
    compressor: Compressor
    target_ratio: float | None


def _plan(
    backbone: Backbone,
    methods: Sequence[str],
    ratios: Sequence[float] | None,
    ranks: Sequence[int] | None,
    recipe: str,
    by: str = "params",
) -> list[_Job]:
    """Every (method, ratio -> rank) and (method, rank) pair, validated before anything runs.

    A dense quantiser (:data:`DENSE_METHODS`) has no rank: it runs once, its target ratio its fixed byte
    ratio; ``quant-mixed`` runs at every ratio, read as a byte ratio. With ``by="params"`` a quantised
    low-rank method gets the rank of its float base at that ratio (equal parameters, fewer bytes); with
    ``by="bytes"`` the largest rank whose bytes meet the ratio against float32 E, so every method at a
    ratio has the same byte budget (SPEC §2). Frequency-aware methods get row weights from the corpora's
    train slices.
    """
    if not methods:
        raise BadInputError("no method to sweep; name at least one")
    if by not in SIZINGS:
        raise BadInputError(f"sweep sizing must be one of {', '.join(SIZINGS)}, got {by!r}")
    if ratios is None and ranks is None:
        ratios = DEFAULT_RATIOS
    vocab, hidden = backbone.vocab_size, backbone.hidden_size
    for method in methods:
        check_method(method)
    weights = frequency_weights(backbone) if set(methods) & set(FREQUENCY_METHODS) else None
    jobs = []
    for method in methods:
        extra: dict[str, Any] = {"row_weights": weights} if method in FREQUENCY_METHODS else {}
        if method in DENSE_METHODS:
            byte_ratio = 4 * vocab * hidden / quantized_rows_bytes(vocab, hidden, method_bits(method))
            jobs.append(_Job(method, make_compressor(method, None), round(byte_ratio, 4)))
            continue
        if method in BUDGETED_METHODS:
            if not ratios:
                raise BadInputError(f"{method} is sized by a byte ratio, not a rank: give ratios")
            budgeted = [
                _Job(method, make_compressor(method, None, ratio=r, **extra), float(r)) for r in ratios
            ]
            for job in budgeted:
                job.compressor.check_fits(hidden)  # type: ignore[attr-defined]
            jobs += budgeted
            continue
        bias = has_decoder_bias(method)
        if base_method(method).startswith("ae"):
            extra["recipe"] = recipe
        if method in QUANTIZED_LOW_RANK and by == "bytes":
            bits = method_bits(method)
            sizes = [
                (QuantizedLowRank.rank_for_byte_ratio(vocab, hidden, r, bits, decoder_bias=bias), float(r))
                for r in ratios or ()
            ]
        else:
            sizes = [(rank_for_ratio(vocab, hidden, r, decoder_bias=bias), float(r)) for r in ratios or ()]
        sizes += [(check_rank(rank, hidden), None) for rank in ranks or ()]
        jobs += [_Job(method, make_compressor(method, rank, **extra), target) for rank, target in sizes]
    return jobs


def _training_reporter(
    progress: Progress, base: float, total: int, tag: str
) -> Callable[[TrainingProgress], None]:
    """Turn a fit's progress reports into sweep progress within step ``base``."""

    def report(update: TrainingProgress) -> None:
        done = ((update.epoch - 1) * update.steps + update.step) / (update.epochs * update.steps)
        epochs = f", epoch {update.epoch}/{update.epochs}" if update.epochs > 1 else ""
        progress(base + done, total, f"{tag}: fitting{epochs}")

    return report


def _flat_row(result: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A sweep row: the variant's perplexity flattened, columns in :data:`SWEEP_COLUMNS` order."""
    flat = {**result, **extra, "perplexity": result["perplexity"]["compressed"]}
    return {column: flat.get(column) for column in SWEEP_COLUMNS} | {
        "original_perplexity": result["perplexity"]["original"],
        "text": result["text"],
        "mode": result["mode"],
        "k": result["k"],
        "protocol": result["protocol"],
    }


def sweep(
    backbone: Backbone,
    methods: Sequence[str],
    *,
    ratios: Sequence[float] | None = None,
    ranks: Sequence[int] | None = None,
    text: str = DEFAULT_TEXT,
    mode: Mode = "input",
    k: int = DEFAULT_K,
    max_tokens: int | None = None,
    recipe: str = "fast",
    by: str = "params",
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Compress with every method at every ratio (and rank), evaluate each, plus the uncompressed model.

    Ratios become ranks through the shared budget rule (:func:`embviz.compressors.rank_for_ratio`; the AE's
    decoder bias counts); with neither ``ratios`` nor ``ranks``, :data:`DEFAULT_RATIOS`. AE methods train
    with ``recipe``. Compressions go through the artifact cache and evaluations through the perplexity and
    neighbour caches, so a repeated sweep refits nothing. ``progress(done, total, message)`` follows the
    work (one step for the uncompressed row, two per pair: compress, evaluate).

    Returns one flat row per pair (keys :data:`SWEEP_COLUMNS`, then ``original_perplexity``, ``text``,
    ``mode``, ``k``, ``protocol``), after the ``uncompressed`` row (ratio 1, its own perplexity, recall 1).
    ``by`` (``params`` or ``bytes``) sizes quantised low-rank methods, see :func:`_plan`; ``frontier`` marks
    the rows on the bytes-perplexity Pareto frontier.

    Raises:
        BadInputError: unknown method, ratio <= 1, rank out of range, or a bad text / mode / k; all checked
            before any model runs.
    """
    report = progress or _quiet
    jobs = _plan(backbone, methods, ratios, ranks, recipe, by)
    evaluator = _Evaluator(backbone, text=text, mode=mode, k=k, max_tokens=max_tokens, seed=0)
    total = 1 + 2 * len(jobs)
    started = time.perf_counter()
    report(0, total, "perplexity of the uncompressed model")
    original = evaluator.perplexity(progress=lambda done, _, message: report(done, total, message))[REFERENCE]
    vocab, hidden = backbone.vocab_size, backbone.hidden_size
    reference = {
        "method": UNCOMPRESSED,
        "label": UNCOMPRESSED,
        "rank": hidden,
        "ratio": 1.0,
        "params": vocab * hidden,
        "bytes": 4 * vocab * hidden,
        "byte_ratio": 1.0,
        "text": text,
        "mode": mode,
        "k": k,
        "perplexity": {"original": original.perplexity, "compressed": original.perplexity},
        "vs_original": 1.0,
        "recall_at_k": 1.0,
        "mean_angle_deg": 0.0,
        "median_angle_deg": 0.0,
        "mean_norm_ratio": 1.0,
        "mean_cosine": 1.0,
        "relative_error": 0.0,
        "protocol": evaluator.protocol,
        "seconds": round(time.perf_counter() - started, 3),
    }
    rows = [_flat_row(reference, target_ratio=1.0, train_seconds=0.0, cached=original.cached)]
    for index, job in enumerate(jobs):
        started = time.perf_counter()
        base = 1 + 2 * index
        rank = job.compressor.get_config()["rank"]
        tag = f"[{index + 1}/{len(jobs)}] {job.method}" + (f" r={rank}" if rank is not None else "")
        report(base, total, f"{tag}: compressing")
        artifact = compress_cached(
            backbone.name,
            backbone.embedding,
            job.compressor,
            progress=_training_reporter(report, base, total, tag),
        )
        if artifact.notice:
            logger.warning("%s: %s", tag, artifact.notice)
        result = evaluator.evaluate(
            artifact.compressed,
            lambda done, steps, message, base=base, tag=tag: report(
                base + 1 + done / steps, total, f"{tag}: {message}"
            ),
        )
        rows.append(
            _flat_row(
                result,
                target_ratio=job.target_ratio,
                train_seconds=round(artifact.compressed.train_seconds, 3),
                cached=artifact.cached,
                artifact=str(artifact.path) if artifact.path else None,
                seconds=round(time.perf_counter() - started, 3),
            )
        )
    for row, optimal in zip(rows, frontier(rows), strict=True):
        row["frontier"] = optimal
    report(total, total, "sweep done")
    return rows


__all__ = [
    "DEFAULT_RATIOS",
    "DEFAULT_TEXT",
    "SIZINGS",
    "SWEEP_COLUMNS",
    "UNCOMPRESSED",
    "Progress",
    "evaluate_variant",
    "frontier",
    "load_variant",
    "sweep",
    "variant_key",
    "variant_name",
]
