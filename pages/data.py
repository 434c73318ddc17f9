"""Cached data for the pages, shared by every session of the server process (``st.cache_resource``).

Everything about one compressed variant is keyed by a frozen :class:`VariantSpec`; the numbers come from
the UI-free core. Showing progress while a variant trains is :mod:`pages.widgets`' job.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st
import torch

from embviz.artifacts import ArtifactResult, artifact_path, compress_cached
from embviz.backbones import Backbone, Mode
from embviz.cache import cache_problem, matrix_fingerprint
from embviz.compressors import (
    CompressedEmbedding,
    Compressor,
    DirectionMetric,
    RowWeights,
    Size,
    VariantRequest,
    get_method,
    make_compressor,
    method_label,
    parse_variant,
    reconstruction_quality,
)
from embviz.errors import BadInputError, EmbvizError
from embviz.frequency import frequency_weights
from embviz.metrics import (
    Angles,
    NeighbourSearch,
    RecallEstimate,
    corpus_frequencies,
    frequency_bands,
    full_table_is_exact,
    neighbour_table_cached,
    reconstruction_angles,
    sampled_recall,
    token_classes,
    token_neighbours,
)
from embviz.predictions import PredictionResult, predict_blank
from embviz.progress import Progress, ProgressCallback
from embviz.projections import shared_table_width
from embviz.resources import freeze_long_lived_objects
from embviz.sensitivity import direction_metric
from embviz.sources import load_model
from embviz.threads import lower_this_thread, task_slots
from pages.state import Settings, settings

ORIGINAL = "original"
QUICK_SECONDS = 3.0
"""A closed-form variant expected within this many seconds is computed under a spinner, without a progress
bar."""
VARIANT_TABLE_TAG = "variant"
"""Marks the app's variant neighbour tables in their cache file names (``smollm2-variant-svd-k10-...``)."""
NeighbourTable = tuple[np.ndarray, np.ndarray]
"""Top-k neighbour ids and cosine scores, one row per token."""


# -- variants --------------------------------------------------------------------------------------------
AUTO_FIT_SECONDS = 15.0
"""A variant expected to fit within this many seconds is fitted as soon as a page needs it (with progress);
a slower one waits behind a button that says how long it takes. ``EMBVIZ_AUTO_FIT_SECONDS`` overrides it
(0: always ask first)."""
AUTO_FIT_ENV = "EMBVIZ_AUTO_FIT_SECONDS"


def auto_fit_seconds() -> float:
    """:data:`AUTO_FIT_SECONDS`, or ``EMBVIZ_AUTO_FIT_SECONDS`` when set to a number."""
    try:
        return float(os.environ.get(AUTO_FIT_ENV, AUTO_FIT_SECONDS))
    except ValueError:
        return AUTO_FIT_SECONDS


@dataclass(frozen=True)
class VariantSpec:
    """One compressed variant: backbone, method id, its size (rank, or byte ratio for byte-sized methods;
    neither for a fixed size) and, for methods that take one, the AE recipe.

    The recipe is normalised away for methods whose spec has no ``recipe`` option, so an SVD variant is the
    same spec whatever recipe the sidebar shows.
    """

    model: str
    method: str
    rank: int | None = None
    recipe: str = ""
    ratio: float | None = None

    def __post_init__(self) -> None:
        if "recipe" not in get_method(self.method).options:
            object.__setattr__(self, "recipe", "")

    @classmethod
    def from_request(
        cls, model: str, request: VariantRequest, shape: tuple[int, int], default_rank: int, recipe: str
    ) -> VariantSpec:
        """The spec a variant name asks for on a V x D backbone (see :mod:`embviz.compressors.selection`).

        Raises:
            BadInputError: a size the method does not take or cannot reach.
        """
        size = request.size(*shape, default_rank)
        return cls(model, request.method, size.rank, recipe, size.ratio)

    @property
    def label(self) -> str:
        """The method's label and its size (``SVD (exact), rank 64``)."""
        if self.rank is not None:
            return f"{method_label(self.method)}, rank {self.rank}"
        if self.ratio is not None:
            return f"{method_label(self.method)}, {self.ratio:.3g}x fewer bytes"
        return method_label(self.method)

    @property
    def trains(self) -> bool:
        return get_method(self.method).trains

    def options(self) -> dict[str, Any]:
        return {"recipe": self.recipe} if self.recipe else {}

    def expected_seconds(self, shape: tuple[int, int]) -> float:
        """About how long fitting it takes on a V x D matrix (the method's own estimate)."""
        return get_method(self.method).expected_seconds(*shape, Size(self.rank, self.ratio), **self.options())

    def compressor(self, **inputs: Any) -> Compressor:
        """The compressor; ``inputs`` are what its method needs from the model (:func:`inputs_of`)."""
        return make_compressor(self.method, self.rank, ratio=self.ratio, **inputs, **self.options())


@dataclass(frozen=True)
class Variant:
    """A variant a page shows: its spec and the artifact (loaded, or trained here)."""

    spec: VariantSpec
    result: ArtifactResult

    @property
    def compressed(self) -> CompressedEmbedding:
        return self.result.compressed


def paper_specs(model: str, config: Settings) -> dict[str, VariantSpec]:
    """SVD and the AE with the sidebar's loss at the sidebar's rank and recipe: the paper's comparison."""
    return {
        name: VariantSpec(model, method, config.rank, config.recipe)
        for name, method in (("SVD", "svd"), ("AE", config.ae_method))
    }


def compared_specs(backbone: Backbone, config: Settings) -> tuple[dict[str, VariantSpec], list[str]]:
    """The variants picked in the sidebar (:attr:`Settings.compared`) by name, and one message per name that
    cannot be used (unknown method, bad or unreachable size)."""
    specs: dict[str, VariantSpec] = {}
    problems = []
    shape = (backbone.vocab_size, backbone.hidden_size)
    for text in config.compared:
        try:
            request = parse_variant(text)
            specs[request.name] = VariantSpec.from_request(
                backbone.name, request, shape, config.rank, config.recipe
            )
        except BadInputError as error:
            problems.append(f"Variant {text!r} left out: {error}")
    return specs, problems


# -- backbone --------------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=2)
def load_backbone(name: str) -> Backbone:
    """One shared copy of each backbone per server process (sessions never mutate it). What is alive once it
    has loaded (imports, the model) lives as long as the server: exempted from the collection Streamlit runs
    after every script run (:func:`~embviz.resources.freeze_long_lived_objects`)."""
    backbone = load_model(name)
    freeze_long_lived_objects()
    return backbone


@st.cache_resource(show_spinner=False, max_entries=4)
def backbone_fingerprint(name: str) -> str:
    return matrix_fingerprint(load_backbone(name).embedding)


@st.cache_resource(show_spinner=False, max_entries=4)
def token_index(name: str) -> dict[str, int]:
    return {token: i for i, token in enumerate(load_backbone(name).tokens)}


def current_backbone() -> Backbone | None:
    """The backbone picked in the sidebar, loaded under a spinner; errors are shown, not raised."""
    name = settings().model
    try:
        with st.spinner(f"Loading {name} (the first load of smollm2 converts its GGUF once, about 25 s)…"):
            return load_backbone(name)
    except EmbvizError as error:
        st.error(str(error))
        return None


# -- the variant store -----------------------------------------------------------------------------------
class VariantStore:
    """Compressed variants and their reconstructions, shared by every session of this server process.

    Artifacts are small (codes + decoder); reconstructions are V x D, so only a few are kept (LRU).
    """

    def __init__(self, max_matrices: int = 6) -> None:
        self.lock = threading.Lock()
        self.results: dict[VariantSpec, ArtifactResult] = {}
        self.matrices: OrderedDict[VariantSpec, torch.Tensor] = OrderedDict()
        self.max_matrices = max_matrices

    def matrix(self, spec: VariantSpec, result: ArtifactResult) -> torch.Tensor:
        with self.lock:
            if spec in self.matrices:
                self.matrices.move_to_end(spec)
                return self.matrices[spec]
        matrix = result.compressed.reconstruct().contiguous()
        with self.lock:
            self.matrices[spec] = matrix
            while len(self.matrices) > self.max_matrices:
                self.matrices.popitem(last=False)
        return matrix


@st.cache_resource(show_spinner=False)
def variant_store() -> VariantStore:
    return VariantStore()


@st.cache_resource(show_spinner=False, max_entries=4)
def row_weights_of(model: str) -> RowWeights:
    """Token-frequency row weights for frequency-aware methods (embviz.frequency's default source)."""
    return frequency_weights(load_backbone(model))


@st.cache_resource(
    show_spinner="Measuring which directions the model is sensitive to (once per model)…", max_entries=4
)
def direction_metric_of(model: str) -> DirectionMetric:
    """The model's direction metric (:func:`embviz.sensitivity.direction_metric`, cached on disk too)."""
    return direction_metric(load_backbone(model))


def inputs_of(backbone: Backbone, method: str) -> dict[str, Any]:
    """What ``method`` needs from the model to fit (:func:`embviz.sensitivity.method_inputs`): row weights
    and the direction metric, each computed once per server (and cached on disk), under a spinner."""
    return get_method(method).model_inputs(
        row_weights=lambda: row_weights_of(backbone.name),
        direction_metric=lambda: direction_metric_of(backbone.name),
    )


def show_notice(result: ArtifactResult) -> None:
    """The artifact's notice (e.g. a cache entry rebuilt), unless :func:`pages.widgets.cache_warning`
    already says that the cache is unusable."""
    if result.notice and not (result.path is None and cache_problem()):
        st.warning(result.notice)


def find_variant(backbone: Backbone, spec: VariantSpec) -> ArtifactResult | None:
    """The artifact from memory or the disk cache, or computed here when its method does not train.

    Returns None when its artifact does not exist yet and the method trains or takes more than
    :data:`QUICK_SECONDS` (see :func:`fit_variant`).
    """
    store = variant_store()
    if spec in store.results:
        return store.results[spec]
    compressor = spec_compressor(backbone, spec)
    try:
        on_disk = artifact_path(backbone.name, backbone_fingerprint(backbone.name), compressor).exists()
    except EmbvizError:
        on_disk = False
    if not on_disk and (spec.trains or spec.expected_seconds(shape_of(backbone)) > QUICK_SECONDS):
        return None
    with st.spinner(f"{'Loading' if on_disk else 'Computing'} {spec.label}…"):
        result = compress_cached(backbone.name, backbone.embedding, compressor)
    show_notice(result)
    store.results[spec] = result
    return result


def shape_of(backbone: Backbone) -> tuple[int, int]:
    return backbone.vocab_size, backbone.hidden_size


def spec_compressor(backbone: Backbone, spec: VariantSpec) -> Compressor:
    """The spec's compressor, with what its method needs from the model (:func:`inputs_of`)."""
    return spec.compressor(**inputs_of(backbone, spec.method))


def fit_variant(
    backbone: Backbone, spec: VariantSpec, *, progress: ProgressCallback | None = None
) -> ArtifactResult:
    """Train (or, if another session just did, load) the artifact and keep it; ``progress`` follows the fit.

    The disk cache's lock makes two sessions asking at once train it once.
    """
    result = compress_cached(
        backbone.name, backbone.embedding, spec_compressor(backbone, spec), progress=progress
    )
    variant_store().results[spec] = result
    return result


def get_variant(backbone: Backbone, spec: VariantSpec, *, train: bool) -> ArtifactResult | None:
    """:func:`find_variant`, else (with ``train``) :func:`fit_variant` without a progress display."""
    result = find_variant(backbone, spec)
    if result is None and train:
        result = fit_variant(backbone, spec)
        show_notice(result)
    return result


def reconstructions(variants: dict[str, Variant]) -> dict[str, torch.Tensor]:
    """V x D matrices of each variant (shared, LRU-bounded)."""
    store = variant_store()
    return {name: store.matrix(variant.spec, variant.result) for name, variant in variants.items()}


# -- what the pages measure ------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=4)
def original_neighbour_table(model: str, k: int) -> NeighbourSearch:
    """The original embedding's full-vocabulary top-k table (disk-cached).

    An exact table is searched at UMAP's width too (:func:`~embviz.projections.shared_table_width`) and cut
    to k: the same search, and the Map's UMAP then finds it cached instead of searching the whole vocabulary
    again (28 s at one thread on SmolLM2).
    """
    backbone = load_backbone(model)
    width = shared_table_width(k) if full_table_is_exact(backbone.embedding) else k
    table = neighbour_table_cached(model, backbone_fingerprint(model), backbone.embedding, width)
    return table._replace(indices=table.indices[:, :k], scores=table.scores[:, :k])


TABLE_NICENESS = 10
"""How much a variant's background neighbour table yields to the page's own work (the first recall estimate,
the page's figures, the browser). Starting a table while the next variant still fitted, even this much
lower, made a new rank slower in the browser benchmark (median of 3: 20.2 -> 21.8 s to the finished page,
first answer 11.4 -> 13.2 s), so tables start once every variant exists."""


def variant_neighbour_jobs(variants: dict[str, Variant], k: int) -> dict[str, BackgroundJob]:
    """Full-vocabulary top-k tables of each variant (exact, through its factors when low-rank), each computed
    once in the background (:class:`JobBoard`, at a lower priority) and kept on disk; a page draws them when
    done."""
    board = job_board()
    return {
        name: board.start(
            ("neighbours", variant.spec, k),
            lambda report, spec=variant.spec, compressed=variant.compressed: neighbour_table_cached(
                f"{spec.model}-{VARIANT_TABLE_TAG}-{spec.method}", None, compressed, k, progress=report
            ),
            niceness=TABLE_NICENESS,
        )
        for name, variant in variants.items()
    }


@st.cache_resource(show_spinner=False, max_entries=16)
def _sampled_recall(
    spec: VariantSpec, k: int, _original: np.ndarray, _compressed: CompressedEmbedding
) -> RecallEstimate:
    return sampled_recall(_original, _compressed)


def sampled_recall_of(variants: dict[str, Variant], k: int) -> dict[str, RecallEstimate]:
    """Each variant's recall@k on a random sample of tokens (exact for them, with its standard error): the
    first answer while the full tables run in the background."""
    original = original_neighbour_table(next(iter(variants.values())).spec.model, k).indices
    return {name: _sampled_recall(v.spec, k, original, v.compressed) for name, v in variants.items()}


def focus_neighbours(variants: dict[str, Variant], token_id: int, k: int) -> dict[str, NeighbourTable]:
    """One token's top-k under each variant (exact, one matrix-vector product each), as one-row tables."""
    tables = {}
    for name, matrix in reconstructions(variants).items():
        indices, scores = token_neighbours(matrix, token_id, k)
        tables[name] = (indices[None, :], scores[None, :])
    return tables


@st.cache_resource(show_spinner=False, max_entries=64)
def _predictions(
    specs: tuple[tuple[str, VariantSpec], ...],
    sentence: str,
    k: int,
    mode: Mode,
    _backbone: Backbone,
    _variants: dict[str, Variant],
) -> PredictionResult:
    # Reconstructed only here: a cached answer needs no V x D matrices.
    matrices = reconstructions(_variants)
    return predict_blank(_backbone, sentence, {ORIGINAL: None, **matrices}, k=k, mode=mode)


def predictions_of(
    backbone: Backbone, sentence: str, variants: dict[str, Variant], k: int, mode: Mode
) -> PredictionResult:
    """Fill-in-the-blank top-k of the original and each variant, computed once per sentence and variants on
    this server (a page revisited, or a second session, gets them at once)."""
    specs = tuple((name, variant.spec) for name, variant in variants.items())
    return _predictions(specs, sentence, k, mode, backbone, variants)


@st.cache_resource(show_spinner=False, max_entries=16)
def _quality(spec: VariantSpec, _backbone: Backbone, _compressed: CompressedEmbedding) -> dict[str, float]:
    return reconstruction_quality(_backbone.embedding, _compressed)


def quality_of(backbone: Backbone, variant: Variant) -> dict[str, float]:
    """Mean cosine and relative error of one variant (cached per configuration)."""
    return _quality(variant.spec, backbone, variant.compressed)


@st.cache_resource(show_spinner=False, max_entries=16)
def _angles(spec: VariantSpec, _backbone: Backbone, _compressed: CompressedEmbedding) -> Angles:
    return reconstruction_angles(_backbone.embedding, _compressed)


def angles_of(backbone: Backbone, variants: dict[str, Variant]) -> dict[str, Angles]:
    """Per-token angle and norm ratio of each variant (cached per configuration)."""
    return {name: _angles(variant.spec, backbone, variant.compressed) for name, variant in variants.items()}


@st.cache_resource(show_spinner=False, max_entries=8)
def token_groups(model: str, split: str) -> np.ndarray:
    """Token class, or corpus-frequency band (Bible ``train`` slice), of every vocabulary row."""
    backbone = load_backbone(model)
    if split == "class":
        return token_classes(backbone.tokens, backbone.special_ids)
    return frequency_bands(corpus_frequencies(backbone.tokenizer, backbone.tokens))  # the Bible's train slice


# -- background jobs (a UMAP map) ------------------------------------------------------------------------
@dataclass
class BackgroundJob:
    """A computation running in a server thread, shared by every session: its latest progress, then its
    result or error. Pages poll it (``st.fragment(run_every=...)``) instead of waiting on it."""

    thread: threading.Thread | None = None
    progress: Progress | None = None
    result: Any = None
    error: BaseException | None = None
    started: float = 0.0

    @property
    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()


class JobBoard:
    """Background jobs by key; a job that failed is started again on the next request.

    At most ``slots`` jobs compute at once (default :func:`embviz.threads.task_slots`: with the app's one
    torch thread on 2 cores, two jobs, e.g. both variants' neighbour tables while the page shows their
    estimates); the others wait their turn.
    """

    def __init__(self, max_jobs: int = 32, slots: int | None = None) -> None:
        self.lock = threading.Lock()
        self.running = threading.BoundedSemaphore(slots or task_slots())
        self.jobs: dict[Any, BackgroundJob] = {}
        self.max_jobs = max_jobs

    def start(self, key: Any, work: Callable[[ProgressCallback], Any], niceness: int = 0) -> BackgroundJob:
        """The job for ``key``, started now (``work(progress)`` in a daemon thread, its priority lowered by
        ``niceness`` where threads have their own) unless it exists."""
        with self.lock:
            job = self.jobs.get(key)
            if job is not None and not (job.done and job.error is not None):
                return job
            job = BackgroundJob(started=time.perf_counter())

            def run() -> None:
                def report(update: Progress) -> None:
                    job.progress = update

                lower_this_thread(niceness)
                with self.running:
                    try:
                        job.result = work(report)
                    except Exception as error:  # shown on the page that asked
                        job.error = error

            job.thread = threading.Thread(target=run, name=f"embviz-job-{len(self.jobs)}", daemon=True)
            self.jobs[key] = job
            finished = [old for old, other in self.jobs.items() if other.done]
            for old in finished[: max(0, len(self.jobs) - self.max_jobs)]:
                del self.jobs[old]
            job.thread.start()
            return job


@st.cache_resource(show_spinner=False)
def job_board() -> JobBoard:
    return JobBoard()
