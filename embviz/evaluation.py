"""The evaluation engine: backbone -> compressed variant -> perplexity, neighbour recall and geometry.

This is the one place that strings the modules together, for the CLI (``evaluate``, ``sweep``,
``predict``), the app's perplexity page and the benchmark:

* :func:`evaluate_variant` scores one compressed embedding: zero-shot perplexity next to the uncompressed
  model's under the same protocol and masks (:mod:`embviz.perplexity`, disk-cached per variant), recall@k of
  the full-vocabulary cosine neighbours (:mod:`embviz.metrics`, the variant searched through its low-rank
  factors), reconstruction angles, norm ratios, cosines and the relative error; beside perplexity, the
  KL divergence from the original's predicted-token distribution and the top-1 agreement on the same
  tokens, and (optionally) the direction / length ablation.
* :func:`sweep` compresses the backbone with every (method, ratio or rank) pair through the artifact cache
  (:func:`embviz.artifacts.compress_cached`), evaluates each, and adds the uncompressed row.

Everything is deterministic and cached (artifacts, perplexities, neighbour tables), so a repeated call is
fast and returns the same numbers.

``device`` (e.g. ``cuda``; default: where the backbone's model is, the CPU) says where the fits of methods
that take one (:data:`~embviz.compressors.registry.DEVICE_OPTION`) and the perplexity passes run; neighbour
tables and geometry stay on the CPU. It changes where, not what: no cache key includes it, and the figures
equal the CPU's within float tolerance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embviz.artifacts import (
    ArtifactError,
    compress_cached,
    load_artifact,
    matrix_fingerprint,
    read_manifest,
    variant_key,
)
from embviz.backbones import MODES, Backbone, Mode
from embviz.compressors import (
    CompressedEmbedding,
    Compressor,
    MethodSpec,
    Size,
    UnreachableBudget,
    check_bits_per_weight,
    check_device,
    get_method,
    reconstruction_quality,
)
from embviz.compressors.registry import DEVICE_OPTION, RATIO_BASES
from embviz.corpora import resolve_texts
from embviz.errors import BadInputError
from embviz.frequency import DEFAULT_WEIGHT_SOURCE, WeightSource, frequency_weights
from embviz.frontier import frontier
from embviz.metrics import (
    NeighbourSearch,
    neighbour_table_cached,
    recall_at_k,
    reconstruction_angles,
    summary,
)
from embviz.perplexity import (
    DEFAULT_MAX_TOKENS,
    REFERENCE,
    VariantPerplexity,
    build_eval_set,
    direction_length_ablation,
    evaluate_perplexity,
)
from embviz.progress import Progress, ProgressCallback, nested, quiet, send
from embviz.sensitivity import method_inputs

logger = logging.getLogger(__name__)

DEFAULT_TEXT = "bible:test"
DEFAULT_K = 10
DEFAULT_RATIOS: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
UNCOMPRESSED = "uncompressed"
_VARIANT = "compressed"
_DIRECTIONS = "variant directions"  # the ablation variants, as named in progress messages
_LENGTHS = "variant lengths"
SIZINGS: tuple[str, ...] = RATIO_BASES
"""How a sweep ratio sizes a quantised low-rank method: equal parameters or equal bytes with float32."""

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
"""The keys of every :func:`sweep` row, in order (the protocol and settings follow them, then
:data:`DIVERGENCE_COLUMNS`)."""

DIVERGENCE_COLUMNS: tuple[str, ...] = (
    "kl_nats",
    "top1_agreement",
    "perplexity_variant_directions",
    "perplexity_variant_lengths",
)
"""The last keys of an :class:`Evaluation` and of a sweep row: KL(original || variant) of the predicted token's
distribution (nats per scored token), top-1 agreement, and the ablation perplexities (None when not run)."""


@dataclass(frozen=True)
class Evaluation:
    """Every figure for one compressed variant, as :func:`evaluate_variant` returns it.

    ``perplexity`` is the variant's, ``original_perplexity`` the uncompressed model's under the same
    protocol; :meth:`to_dict` nests them as ``perplexity: {original, compressed}`` (the JSON form).
    ``kl_nats`` / ``top1_agreement`` compare the variant's predicted-token distribution with the original's
    on the scored tokens; ``perplexity_variant_directions`` (the variant's row directions, the original's
    lengths) and ``perplexity_variant_lengths`` (the original's directions, the variant's lengths) are None
    unless the ablation ran.
    """

    backbone: str
    method: str
    label: str
    rank: int | None
    ratio: float
    params: int
    bytes: int
    byte_ratio: float
    text: str
    mode: str
    k: int
    original_perplexity: float
    perplexity: float
    vs_original: float
    recall_at_k: float
    mean_angle_deg: float
    median_angle_deg: float
    mean_norm_ratio: float
    mean_cosine: float
    min_cosine: float
    relative_error: float
    tokens_scored: int
    perplexity_cached: bool
    protocol: str
    seconds: float
    kl_nats: float
    top1_agreement: float
    perplexity_variant_directions: float | None
    perplexity_variant_lengths: float | None
    bits_per_weight: float
    bytes_vs_bf16: float
    source_format: str | None
    source_bits_per_weight: float | None
    bytes_vs_source: float | None
    neighbour_search: str = "exact"
    """How the neighbour tables behind ``recall_at_k`` were found: ``exact``, or the approximate index with its
    measured recall against exact search (a vocabulary too large for an affordable exact search)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``embviz evaluate --json``): fields in order, ``perplexity`` nested."""
        result: dict[str, Any] = {}
        for item in fields(self):
            if item.name == "perplexity":
                result["perplexity"] = {"original": self.original_perplexity, "compressed": self.perplexity}
            elif item.name != "original_perplexity":
                result[item.name] = getattr(self, item.name)
        return result


@dataclass(frozen=True)
class SweepRow:
    """One row of a :func:`sweep`: a (method, size) pair evaluated, or the uncompressed model.

    The fields are :data:`SWEEP_COLUMNS` followed by ``original_perplexity``, ``text``, ``mode``, ``k``,
    ``protocol``, :data:`DIVERGENCE_COLUMNS`, the storage figures (``bits_per_weight``, ``bytes_vs_bf16``,
    ``source_format``, ``source_bits_per_weight``, ``bytes_vs_source``) and ``target_bits`` (the budget in
    bits per weight the row was sized to; None for rank, ratio and fixed-size rows); :meth:`to_dict` gives
    them in that order (the JSON / CSV form).
    """

    method: str
    label: str
    target_ratio: float | None
    ratio: float
    rank: int | None
    params: int
    bytes: int
    byte_ratio: float
    perplexity: float
    vs_original: float
    frontier: bool
    recall_at_k: float
    mean_angle_deg: float
    median_angle_deg: float
    mean_norm_ratio: float
    mean_cosine: float
    relative_error: float
    train_seconds: float
    seconds: float
    cached: bool
    artifact: str | None
    original_perplexity: float
    text: str
    mode: str
    k: int
    protocol: str
    kl_nats: float
    top1_agreement: float
    perplexity_variant_directions: float | None
    perplexity_variant_lengths: float | None
    bits_per_weight: float
    bytes_vs_bf16: float
    source_format: str | None
    source_bits_per_weight: float | None
    bytes_vs_source: float | None
    target_bits: float | None = None

    @classmethod
    def from_evaluation(
        cls,
        evaluation: Evaluation,
        *,
        target_ratio: float | None,
        train_seconds: float,
        seconds: float,
        cached: bool,
        artifact: str | None,
        frontier: bool = False,
        target_bits: float | None = None,
    ) -> SweepRow:
        """The row of an evaluated variant; ``seconds`` covers its compression and evaluation."""
        shared = {
            item.name: getattr(evaluation, item.name)
            for item in fields(cls)
            if hasattr(evaluation, item.name)
        }
        return cls(
            **{
                **shared,
                "target_ratio": target_ratio,
                "train_seconds": train_seconds,
                "seconds": seconds,
                "cached": cached,
                "artifact": artifact,
                "frontier": frontier,
                "target_bits": target_bits,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON / CSV form (``embviz sweep --json``): every field, in order."""
        return {item.name: getattr(self, item.name) for item in fields(self)}


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
        self,
        backbone: Backbone,
        *,
        text: str,
        mode: Mode,
        k: int,
        max_tokens: int | None,
        seed: int,
        device: str | None = None,
    ) -> None:
        self.device = None if device is None else check_device(device)
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
    def original_table(self) -> NeighbourSearch:
        embedding = self.backbone.embedding
        return neighbour_table_cached(self.backbone.name, matrix_fingerprint(embedding), embedding, self.k)

    @property
    def original_neighbours(self) -> np.ndarray:
        return self.original_table.indices

    def perplexity(
        self,
        compressed: CompressedEmbedding | None = None,
        progress: ProgressCallback = quiet,
        *,
        ablation: bool = False,
    ) -> dict[str, VariantPerplexity]:
        """``{"original": ..., "compressed": ...}`` (just the original when ``compressed`` is None), cached.

        The compressed variant comes with its KL divergence and top-1 agreement; with ``ablation`` the
        results add ``"variant directions"`` and ``"variant lengths"`` (perplexity only).
        """
        variants, keys = {}, {}
        if compressed is not None:
            variants[_VARIANT] = compressed.reconstruct()
            keys[_VARIANT] = variant_key(compressed)
            if ablation:
                swapped = direction_length_ablation(self.backbone.embedding, variants[_VARIANT])
                variants[_DIRECTIONS], variants[_LENGTHS] = swapped["directions"], swapped["lengths"]
                keys[_DIRECTIONS] = f"{keys[_VARIANT]}:directions"
                keys[_LENGTHS] = f"{keys[_VARIANT]}:lengths"
        report = evaluate_perplexity(
            self.backbone,
            self.eval_set,
            variants,
            mode=self.mode,
            variant_keys=keys,
            progress=progress,
            divergence={_VARIANT},
            device=self.device,
        )
        return dict(report.results)

    def evaluate(
        self, compressed: CompressedEmbedding, progress: ProgressCallback = quiet, *, ablation: bool = False
    ) -> Evaluation:
        """Every figure for one variant (see :func:`evaluate_variant`)."""
        started = time.perf_counter()
        embedding = self.backbone.embedding
        stages = 3
        results = self.perplexity(compressed, nested(progress, 0, 1, stages), ablation=ablation)
        original, variant = results[REFERENCE], results[_VARIANT]
        directions, lengths = results.get(_DIRECTIONS), results.get(_LENGTHS)
        if variant.kl_nats is None or variant.top1_agreement is None:
            raise AssertionError("the compressed variant is always scored with its KL divergence")
        send(progress, Progress(1, stages, f"recall@{self.k} over {self.backbone.vocab_size:,} tokens"))
        variant_table = neighbour_table_cached(
            f"{self.backbone.name}-{compressed.method}",
            variant_key(compressed),
            compressed,  # a CompressedEmbedding is searched through its factors
            self.k,
        )
        recall = recall_at_k(self.original_neighbours, variant_table.indices)
        searches = {"original": self.original_table.quality, "variant": variant_table.quality}
        neighbour_search = "; ".join(
            f"{name}: {'exact' if quality is None else quality.describe(self.k)}"
            for name, quality in searches.items()
        )
        send(progress, Progress(2, stages, "angles and reconstruction quality"))
        angles = reconstruction_angles(embedding, compressed)
        geometry = summary(angles.degrees, angles.norm_ratio)
        quality = reconstruction_quality(embedding, compressed)
        send(progress, Progress(stages, stages, "evaluated"))
        facts = compressed.facts()
        return Evaluation(
            backbone=self.backbone.name,
            method=facts["method"],
            label=facts["label"],
            rank=facts["rank"],
            ratio=facts["ratio"],
            params=facts["params"],
            bytes=facts["bytes"],
            byte_ratio=facts["byte_ratio"],
            text=self.text,
            mode=self.mode,
            k=self.k,
            original_perplexity=original.perplexity,
            perplexity=variant.perplexity,
            vs_original=round(variant.perplexity / original.perplexity, 4),
            recall_at_k=round(recall.mean, 6),
            mean_angle_deg=geometry["mean_angle"],
            median_angle_deg=geometry["median_angle"],
            mean_norm_ratio=geometry["mean_norm_ratio"],
            mean_cosine=round(quality["mean_cosine"], 6),
            min_cosine=round(quality["min_cosine"], 6),
            relative_error=round(quality["relative_error"], 6),
            tokens_scored=variant.tokens,
            perplexity_cached=variant.cached,
            protocol=self.protocol,
            seconds=round(time.perf_counter() - started, 3),
            kl_nats=variant.kl_nats,
            top1_agreement=round(variant.top1_agreement, 6),
            perplexity_variant_directions=None if directions is None else directions.perplexity,
            perplexity_variant_lengths=None if lengths is None else lengths.perplexity,
            bits_per_weight=facts["bits_per_weight"],
            bytes_vs_bf16=facts["bytes_vs_bf16"],
            **self.backbone.source_facts(compressed.bits_per_weight),
            neighbour_search="exact" if all(q is None for q in searches.values()) else neighbour_search,
        )


def evaluate_variant(
    backbone: Backbone,
    compressed: CompressedEmbedding,
    *,
    text: str = DEFAULT_TEXT,
    mode: Mode = "input",
    k: int = DEFAULT_K,
    max_tokens: int | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    ablation: bool = True,
    device: str | None = None,
) -> Evaluation:
    """Perplexity, neighbour recall and reconstruction geometry of one compressed embedding.

    ``text`` is a corpus (``bible:test``) or a text file; ``mode`` the substitution (``input`` or ``tied``);
    ``max_tokens`` the held-out budget (default :data:`embviz.perplexity.DEFAULT_MAX_TOKENS`); ``seed`` fixes
    the masks of masked models. Returns an :class:`Evaluation` (``to_dict()`` is the JSON form): the
    perplexities, ``vs_original``, ``recall_at_k``, ``mean_angle_deg``, ``median_angle_deg``,
    ``mean_norm_ratio``, ``mean_cosine``, ``min_cosine``, ``relative_error``, ``rank``, ``ratio``,
    ``params``, ``bytes``, ``method``, ``label``, ``protocol`` (in words), ``seconds`` and the settings,
    then ``kl_nats`` (mean KL(original || variant) of the predicted token's distribution over the full
    vocabulary, nats per scored token) and ``top1_agreement`` (share of scored positions where the variant's
    most likely token is the original's), measured on the perplexity's tokens in the same pass.

    With ``ablation`` (the default) two more perplexities separate direction from length:
    ``perplexity_variant_directions`` (every row with the variant's direction and the original's length)
    and ``perplexity_variant_lengths`` (the original's direction, the variant's length); rows of zero length
    stay zero. Cost: the variant's scoring runs the original next to it (two forward passes per batch for
    the KL divergence) and the ablation adds one pass each, so a cold evaluation makes five passes over the
    text instead of three (the original's own perplexity is one); ``ablation=False`` leaves both None.
    ``progress`` counts three stages (perplexity, recall, geometry). Perplexities (with the KL divergence)
    and neighbour tables are cached on disk, so a repeated call is fast. ``device`` (e.g. ``cuda``) is where
    the perplexity passes run (see the module docstring).

    Raises:
        BadInputError: unknown corpus / split / file, bad mode or k, text too short for the protocol, or a
            device this machine cannot compute on (checked first).
    """
    evaluator = _Evaluator(
        backbone, text=text, mode=mode, k=k, max_tokens=max_tokens, seed=seed, device=device
    )
    return evaluator.evaluate(compressed, progress or quiet, ablation=ablation)


# -- the direction / length ablation as a 2 x 2 ----------------------------------------------------------
ORIGINAL_SIDE = "original"


def cell_name(variant: str, directions: str, lengths: str) -> str:
    """The name of one cell of a variant's 2 x 2: ``"original"``, ``"SVD"``, ``"SVD directions + original
    lengths"`` or ``"original directions + SVD lengths"`` (``directions`` / ``lengths``: ``"original"`` or the
    variant's name)."""
    if directions == lengths:
        return ORIGINAL_SIDE if directions == ORIGINAL_SIDE else variant
    return f"{directions} directions + {lengths} lengths"


def direction_length_variants(
    original: torch.Tensor, variants: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Each variant's matrix and its two swaps (:func:`embviz.perplexity.direction_length_ablation`), named by
    :func:`cell_name`: ``{"SVD": ..., "SVD directions + original lengths": ..., "original directions + SVD
    lengths": ...}`` for every variant, in that order."""
    named: dict[str, torch.Tensor] = {}
    for name, matrix in variants.items():
        if name == ORIGINAL_SIDE:
            raise BadInputError(f"the variant name {ORIGINAL_SIDE!r} is reserved for the uncompressed model")
        swapped = direction_length_ablation(original, matrix)
        named[name] = matrix
        named[cell_name(name, name, ORIGINAL_SIDE)] = swapped["directions"]
        named[cell_name(name, ORIGINAL_SIDE, name)] = swapped["lengths"]
    return named


@dataclass(frozen=True)
class DirectionLengthGrid:
    """One variant's perplexities as a 2 x 2: whose row directions (original or the variant's) x whose row
    lengths. The diagonal is the uncompressed model and the variant itself; the other two cells swap one."""

    name: str
    original: float
    """Original directions, original lengths: the uncompressed model."""
    variant_lengths: float
    """Original directions with the variant's lengths."""
    variant_directions: float
    """The variant's directions with the original lengths."""
    compressed: float
    """The variant's directions and lengths: the variant itself."""
    cached: bool = False

    def cell(self, directions: str, lengths: str) -> float:
        """The perplexity with ``directions`` and ``lengths`` each ``"original"`` or :attr:`name`."""
        cells = {
            (ORIGINAL_SIDE, ORIGINAL_SIDE): self.original,
            (ORIGINAL_SIDE, self.name): self.variant_lengths,
            (self.name, ORIGINAL_SIDE): self.variant_directions,
            (self.name, self.name): self.compressed,
        }
        if (directions, lengths) not in cells:
            raise BadInputError(f"directions and lengths are {ORIGINAL_SIDE!r} or {self.name!r}")
        return cells[directions, lengths]

    def table(self) -> list[dict[str, Any]]:
        """The four cells, one row each: variant, directions, lengths, cell name, perplexity, x original."""
        sides = (ORIGINAL_SIDE, self.name)
        return [
            {
                "variant": self.name,
                "directions": directions,
                "lengths": lengths,
                "cell": cell_name(self.name, directions, lengths),
                "perplexity": round(self.cell(directions, lengths), 3),
                "x original": round(self.cell(directions, lengths) / self.original, 3),
            }
            for directions in sides
            for lengths in sides
        ]

    def summary(self) -> str:
        """What the 2 x 2 says, in plain words, from its numbers."""

        def change(after: float) -> str:
            factor = self.compressed / after
            if 0.95 <= factor <= 1.05:
                return "about the same"
            return f"{factor:.1f}x better" if factor > 1 else f"{1 / factor:.1f}x worse"

        return (
            f"{self.name} alone: perplexity {self.compressed:,.1f} (the uncompressed model: "
            f"{self.original:,.1f}). Give {self.name} back the original lengths and it is "
            f"{self.variant_directions:,.1f} ({change(self.variant_directions)}); give it back the original "
            f"directions instead and it is {self.variant_lengths:,.1f} ({change(self.variant_lengths)})."
        )


@dataclass(frozen=True)
class DirectionLengthReport:
    """The 2 x 2 of every variant under one protocol (text, mode, budget), as
    :func:`direction_length_grids` returns it."""

    backbone: str
    text: str
    mode: str
    protocol: str
    grids: dict[str, DirectionLengthGrid]
    seconds: float

    def table(self) -> list[dict[str, Any]]:
        """Every variant's four cells (:meth:`DirectionLengthGrid.table`)."""
        return [row for grid in self.grids.values() for row in grid.table()]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: settings, protocol and each variant's cells."""
        return {
            "backbone": self.backbone,
            "text": self.text,
            "mode": self.mode,
            "protocol": self.protocol,
            "seconds": round(self.seconds, 3),
            "grids": {name: asdict(grid) for name, grid in self.grids.items()},
        }


def direction_length_grids(
    backbone: Backbone,
    variants: Mapping[str, CompressedEmbedding],
    *,
    text: str = DEFAULT_TEXT,
    mode: Mode = "input",
    max_tokens: int | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    device: str | None = None,
) -> DirectionLengthReport:
    """The direction / length ablation of each variant as a :class:`DirectionLengthGrid`, by display name.

    The same perplexities as :func:`evaluate_variant` with ``ablation`` (same protocol, same disk cache
    entries, so either fills the cache for the other): the uncompressed model, each variant (with its KL
    divergence, as everywhere), and each variant's two swaps. ``progress`` counts variants; ``device`` is
    where the passes run.

    Raises:
        BadInputError: unknown corpus / split / file, bad mode, text too short for the protocol.
    """
    started = time.perf_counter()
    k = min(DEFAULT_K, backbone.vocab_size - 1)  # recall is not measured here; any valid k will do
    evaluator = _Evaluator(
        backbone, text=text, mode=mode, k=k, max_tokens=max_tokens, seed=seed, device=device
    )
    grids: dict[str, DirectionLengthGrid] = {}
    for index, (name, compressed) in enumerate(variants.items()):
        report = nested(progress or quiet, index, index + 1, len(variants), f"{name}: ")
        results = evaluator.perplexity(compressed, report, ablation=True)
        grids[name] = DirectionLengthGrid(
            name=name,
            original=results[REFERENCE].perplexity,
            variant_lengths=results[_LENGTHS].perplexity,
            variant_directions=results[_DIRECTIONS].perplexity,
            compressed=results[_VARIANT].perplexity,
            cached=all(result.cached for result in results.values()),
        )
    send(progress, Progress(len(variants), len(variants), "2 x 2 done"))
    return DirectionLengthReport(
        backbone=backbone.name,
        text=text,
        mode=mode,
        protocol=evaluator.eval_set.description,
        grids=grids,
        seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class SweepJob:
    """One (method, size) pair of a sweep."""

    method: str
    compressor: Compressor
    target_ratio: float | None
    target_bits: float | None = None
    """The budget in bits per weight this job was sized to (None for a ratio, a rank or a fixed size)."""


class SweepPlan(list[SweepJob]):
    """The jobs of a sweep in order (a plain list of :class:`SweepJob`), plus ``notes``: one line per budget
    in bits per weight a method cannot meet (that pair is skipped) and per fixed-size method that is above a
    budget (it still runs once, at its own size, as a reference)."""

    def __init__(self, jobs: Iterable[SweepJob] = (), notes: Iterable[str] = ()) -> None:
        super().__init__(jobs)
        self.notes: tuple[str, ...] = tuple(notes)


class SweepResult(list[SweepRow]):
    """The rows of a :func:`sweep` (a plain list of :class:`SweepRow`), plus the plan's ``notes``."""

    def __init__(self, rows: Iterable[SweepRow] = (), notes: Iterable[str] = ()) -> None:
        super().__init__(rows)
        self.notes: tuple[str, ...] = tuple(notes)


def plan_sweep(
    backbone: Backbone,
    methods: Sequence[str],
    ratios: Sequence[float] | None,
    ranks: Sequence[int] | None,
    recipe: str,
    by: str = "params",
    bits: Sequence[float] | None = None,
    weights: WeightSource = DEFAULT_WEIGHT_SOURCE,
    device: str | None = None,
    progress: ProgressCallback | None = None,
) -> SweepPlan:
    """Every (method, size) pair, sized by each method's registered rule and validated before anything runs.

    A fixed-size method runs once (its target ratio is its own byte ratio); a byte-sized one runs at every
    ratio, read as a byte ratio; a rank-sized one at every ratio (the largest rank meeting it: in
    parameters, or with ``by="bytes"`` in bytes for quantised codes, so every method at a ratio has the same
    byte budget, SPEC §2) and every rank. Methods get what they need from the model
    (:func:`embviz.sensitivity.method_inputs`, once every size is validated): row weights from ``weights``
    (``general``, the default, and ``wordfreq`` never saw a scored text; ``corpora`` counts the corpora's
    train slices) and the model's direction metric (``progress`` hears while it is measured); training
    methods get ``recipe``.

    ``bits`` (instead of ``ratios``; ``ranks`` may come too) are budgets in bits per weight over V*D: each
    method gets the largest size whose stored bits per weight are within each budget
    (:meth:`~embviz.compressors.MethodSpec.size_for_bits`); a fixed-size method runs once at its own size,
    as a reference. A budget a method cannot meet (below rank 1, beyond what mixed rows reach) is skipped
    for that method with a line in the plan's ``notes``.

    ``device`` goes to every method as the registry's ``device`` option: the methods that take one fit
    there, the others on the CPU.

    Raises:
        BadInputError: an unknown method, a bad ratio, rank or budget (a budget must be a number above 0),
            ratios and bits together, bits no method can meet, or a device this machine cannot compute on;
            all before any fit.
    """
    if device is not None:
        check_device(device)
    if not methods:
        raise BadInputError("no method to sweep; name at least one")
    if by not in SIZINGS:
        raise BadInputError(f"sweep sizing must be one of {', '.join(SIZINGS)}, got {by!r}")
    if bits is not None and ratios is not None:
        raise BadInputError("size a sweep by ratios or by bits per weight, not both")
    budgets = None if bits is None else [check_bits_per_weight(value) for value in bits]
    if budgets is not None and not budgets:
        raise BadInputError("no budget in bits per weight; give at least one")
    if ratios is None and ranks is None and budgets is None:
        ratios = DEFAULT_RATIOS
    vocab, hidden = backbone.vocab_size, backbone.hidden_size
    specs = [get_method(method) for method in methods]
    planned: list[tuple[MethodSpec, list[Size]]] = []
    notes: list[str] = []
    for spec in specs:
        within, out_of_reach = _sizes_within(spec, vocab, hidden, budgets or ())
        if spec.sizing == "fixed":
            sizes = [spec.size(vocab, hidden)]
            if out_of_reach:
                own = spec.fixed_bits_per_weight(vocab, hidden) or 0.0
                above = ", ".join(f"{budget:g}" for budget, _ in out_of_reach)
                plural = "s" if len(out_of_reach) > 1 else ""
                notes.append(
                    f"{spec.id} has a fixed size of {own:.3g} bits per weight, above the budget{plural} of "
                    f"{above}: it runs once at its own size, as a reference"
                )
        elif spec.sizing == "bytes":
            if not ratios and budgets is None:
                raise BadInputError(
                    f"{spec.id} is sized by a byte ratio, not a rank: give ratios or bits per weight"
                )
            sizes = [spec.size(vocab, hidden, ratio=ratio) for ratio in ratios or ()] + within
        else:
            sizes = [spec.size(vocab, hidden, ratio=ratio, by=by) for ratio in ratios or ()] + within
            sizes += [spec.size(vocab, hidden, rank=rank) for rank in ranks or ()]
        if spec.sizing != "fixed":
            notes += [
                f"skipped {spec.id} at {budget:g} bits per weight: {why}" for budget, why in out_of_reach
            ]
        planned.append((spec, sizes))
    if not any(sizes for _, sizes in planned):
        raise BadInputError("no method meets any of the budgets: " + "; ".join(notes))
    needs_weights = any(spec.needs_row_weights for spec in specs)
    row_weights = frequency_weights(backbone, source=weights) if needs_weights else None
    jobs: list[SweepJob] = []
    for spec, sizes in planned:
        options: dict[str, Any] = {"recipe": recipe} if "recipe" in spec.options else {}
        if device is not None:
            options[DEVICE_OPTION] = device
        options.update(
            method_inputs(backbone, spec, weights=weights, row_weights=row_weights, progress=progress)
        )
        jobs += [
            SweepJob(spec.id, spec.build(size, **options), size.target_ratio, size.target_bits)
            for size in sizes
        ]
    return SweepPlan(jobs, notes)


def _sizes_within(
    spec: MethodSpec, vocab: int, hidden: int, budgets: Sequence[float]
) -> tuple[list[Size], list[tuple[float, str]]]:
    """``spec``'s size at each budget in bits per weight it meets, and ``(budget, why)`` for the others."""
    sizes, out_of_reach = [], []
    for budget in budgets:
        try:
            sizes.append(spec.size(vocab, hidden, bits=budget))
        except UnreachableBudget as exc:
            out_of_reach.append((budget, str(exc)))
    return sizes, out_of_reach


class SweepRunner:
    """One sweep on one backbone: its plan (validated before any model runs) and evaluation protocol, and
    the rows they give, one at a time: the uncompressed model's and each job's. :func:`sweep` runs them in
    order; :mod:`embviz.cluster` runs each job in a Ray task and gets the same rows."""

    def __init__(
        self,
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
        ablation: bool = False,
        bits: Sequence[float] | None = None,
        weights: WeightSource = DEFAULT_WEIGHT_SOURCE,
        device: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.backbone, self.text, self.mode, self.k, self.ablation = backbone, text, mode, k, ablation
        if device is not None:
            check_device(device)  # before the plan computes any row weights
        self.jobs = plan_sweep(
            backbone,
            methods,
            ratios,
            ranks,
            recipe,
            by,
            bits=bits,
            weights=weights,
            device=device,
            progress=progress,
        )
        self.evaluator = _Evaluator(
            backbone, text=text, mode=mode, k=k, max_tokens=max_tokens, seed=0, device=device
        )

    def tag(self, index: int) -> str:
        """How progress names job ``index``: ``[2/6] svd r=64`` (``(4 bits/weight)`` for a budget)."""
        job = self.jobs[index]
        rank = job.compressor.get_config()["rank"]
        tag = f"[{index + 1}/{len(self.jobs)}] {job.method}" + (f" r={rank}" if rank is not None else "")
        return tag + (f" ({job.target_bits:g} bits/weight)" if job.target_bits is not None else "")

    def uncompressed_row(self, progress: ProgressCallback | None = None) -> SweepRow:
        """The ``uncompressed`` row: ratio 1, its own perplexity, recall 1, KL 0, agreement 1."""
        started = time.perf_counter()
        original = self.evaluator.perplexity(progress=progress or quiet)[REFERENCE]
        backbone, ablation = self.backbone, self.ablation
        vocab, hidden = backbone.vocab_size, backbone.hidden_size
        return SweepRow(
            method=UNCOMPRESSED,
            label=UNCOMPRESSED,
            target_ratio=1.0,
            ratio=1.0,
            rank=hidden,
            params=vocab * hidden,
            bytes=4 * vocab * hidden,
            byte_ratio=1.0,
            perplexity=original.perplexity,
            vs_original=1.0,
            frontier=False,
            recall_at_k=1.0,
            mean_angle_deg=0.0,
            median_angle_deg=0.0,
            mean_norm_ratio=1.0,
            mean_cosine=1.0,
            relative_error=0.0,
            train_seconds=0.0,
            seconds=round(time.perf_counter() - started, 3),
            cached=original.cached,
            artifact=None,
            original_perplexity=original.perplexity,
            text=self.text,
            mode=self.mode,
            k=self.k,
            protocol=self.evaluator.protocol,
            kl_nats=0.0,
            top1_agreement=1.0,
            perplexity_variant_directions=original.perplexity if ablation else None,
            perplexity_variant_lengths=original.perplexity if ablation else None,
            bits_per_weight=32.0,
            bytes_vs_bf16=0.5,
            **backbone.source_facts(32.0),
        )

    def job_row(self, index: int, progress: ProgressCallback | None = None) -> SweepRow:
        """Compress (through the artifact cache) and evaluate job ``index``; ``progress`` gets two units."""
        report = progress or quiet
        started = time.perf_counter()
        job, tag = self.jobs[index], self.tag(index)
        report(Progress(0, 2, f"{tag}: compressing"))
        artifact = compress_cached(
            self.backbone.name,
            self.backbone.embedding,
            job.compressor,
            progress=nested(report, 0, 1, 2, f"{tag}: "),
        )
        if artifact.notice:
            logger.warning("%s: %s", tag, artifact.notice)
        evaluation = self.evaluator.evaluate(
            artifact.compressed, nested(report, 1, 2, 2, f"{tag}: "), ablation=self.ablation
        )
        return SweepRow.from_evaluation(
            evaluation,
            target_ratio=job.target_ratio,
            train_seconds=round(artifact.compressed.train_seconds, 3),
            cached=artifact.cached,
            artifact=str(artifact.path) if artifact.path else None,
            seconds=round(time.perf_counter() - started, 3),
            target_bits=job.target_bits,
        )

    def result(self, rows: Iterable[SweepRow]) -> SweepResult:
        """``rows`` (uncompressed first, then the jobs in plan order) with the Pareto frontier marked."""
        rows = list(rows)
        optimal = frontier([row.to_dict() for row in rows])
        return SweepResult(
            (replace(row, frontier=on) for row, on in zip(rows, optimal, strict=True)), self.jobs.notes
        )


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
    progress: ProgressCallback | None = None,
    ablation: bool = False,
    bits: Sequence[float] | None = None,
    weights: WeightSource = DEFAULT_WEIGHT_SOURCE,
    device: str | None = None,
) -> SweepResult:
    """Compress with every method at every ratio or budget in bits per weight (and rank), evaluate each,
    plus the uncompressed model.

    Ratios become ranks through the shared budget rule (:func:`embviz.compressors.rank_for_ratio`; the AE's
    decoder bias counts); with neither ``ratios`` nor ``ranks``, :data:`DEFAULT_RATIOS`. AE methods train
    with ``recipe``. Compressions go through the artifact cache and evaluations through the perplexity and
    neighbour caches, so a repeated sweep refits nothing. ``progress`` follows the work (one unit for the
    uncompressed row, two per pair: compress, evaluate; each fit and evaluation nested in its unit).

    Returns one :class:`SweepRow` per pair (``to_dict()``: keys :data:`SWEEP_COLUMNS`, then
    ``original_perplexity``, ``text``, ``mode``, ``k``, ``protocol`` and :data:`DIVERGENCE_COLUMNS`), after
    the ``uncompressed`` row (ratio 1, its own perplexity, recall 1, KL 0, agreement 1). Every row has its
    KL divergence and top-1 agreement; ``ablation`` adds the direction / length ablation perplexities of
    every variant (see :func:`evaluate_variant`; it adds two passes over the text per variant to the three
    of the perplexity and KL divergence, so it is off by default), else they are None.
    ``by`` (``params`` or ``bytes``) sizes quantised low-rank methods, see :func:`plan_sweep`; ``frontier`` marks
    the rows on the bytes-perplexity Pareto frontier. ``bits`` (not with ``ratios``) sizes every method to
    each budget in bits per weight (rows carry ``target_bits``); budgets a method cannot meet are skipped
    with a note (logged as a warning and kept in the result's ``notes``).
    ``weights`` (``wordfreq`` or ``corpora``) is the source of frequency-aware methods' row weights.
    ``device`` (e.g. ``cuda``) is where fits that take one and the perplexity passes run (see the module
    docstring); the rows are the same within float tolerance.

    Raises:
        BadInputError: unknown method, ratio <= 1, budget <= 0, rank out of range, a bad text / mode / k, or
            a device this machine cannot compute on; all checked before any model runs.
    """
    report = progress or quiet
    runner = SweepRunner(
        backbone,
        methods,
        ratios=ratios,
        ranks=ranks,
        text=text,
        mode=mode,
        k=k,
        max_tokens=max_tokens,
        recipe=recipe,
        by=by,
        ablation=ablation,
        bits=bits,
        weights=weights,
        device=device,
        progress=progress,
    )
    total = 1 + 2 * len(runner.jobs)
    for note in runner.jobs.notes:
        logger.warning("%s", note)
    report(Progress(0, total, "perplexity of the uncompressed model"))
    rows = [runner.uncompressed_row(nested(report, 0, 1, total))]
    for index in range(len(runner.jobs)):
        base = 1 + 2 * index
        rows.append(runner.job_row(index, nested(report, base, base + 2, total)))
    result = runner.result(rows)
    report(Progress(total, total, "sweep done"))
    return result


__all__ = [
    "DEFAULT_RATIOS",
    "DEFAULT_TEXT",
    "DIVERGENCE_COLUMNS",
    "SIZINGS",
    "SWEEP_COLUMNS",
    "UNCOMPRESSED",
    "DirectionLengthGrid",
    "DirectionLengthReport",
    "Evaluation",
    "SweepJob",
    "SweepPlan",
    "SweepResult",
    "SweepRow",
    "SweepRunner",
    "cell_name",
    "direction_length_grids",
    "direction_length_variants",
    "evaluate_variant",
    "frontier",
    "load_variant",
    "plan_sweep",
    "sweep",
    "variant_name",
]
