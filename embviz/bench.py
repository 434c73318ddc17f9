"""``embviz bench``: how fast the engine is on the default backbone, as one JSON report.

Stages (each can be run alone with ``--stages``):

* ``load`` -- cold load (first load ever: the GGUF conversion included, in a fresh temporary ``EMBVIZ_HOME``)
  and warm load (from the converted cache), each in a fresh subprocess so imports are counted honestly:
  ``import_s`` (``embviz.sources`` plus the transformers classes it uses), ``cold_load_s`` /
  ``warm_load_s`` (``load_model`` after those imports), ``*_process_s`` (the whole process,
  interpreter start included, measured from outside) and ``warm_reload_s`` (a second load in one process).
* ``ae`` -- the AutoEncoder's paper recipe (batch 32, 30 epochs) against the fast recipe at rank 64: fit
  time, mean cosine and perplexity on ``bible:valid``; the ``compare`` block states the speed-up.
* ``fits`` -- fit time of the bits-per-weight methods (direction-aware VQ and mixed rows at 4, 2, 1 and 0.5
  bits per weight, llama.cpp's GGUF formats at their own size), each layout's exact bits per weight, and the
  slowest fit at 1 bit against its two-minute limit.
* ``knn`` -- full-vocabulary top-10 neighbours of a low-rank variant through its factors against the
  dense baseline (reconstruct, then blocked products), and recall@10 against the original's table.
* ``maps`` -- UMAP (numba compile timed apart, cold in a fresh cache, then served from the disk cache) and
  PCA of the original with the SVD and AE variants in one frame.
* ``latency`` -- fill-in-the-blank predictions for original / SVD / AE, and one perplexity evaluation.
* ``memory`` -- peak RSS of an app-like process (backbone and three variants loaded, one prediction, one
  perplexity evaluation).
* ``app`` -- the real app in headless Chromium (not a default stage: it needs the browser and takes minutes
  per run): ``streamlit run app.py`` on a cache seeded from this one, every page's time to a finished page
  (first visit and warm), a new sentence on Predictions, a new rank from the sidebar to a finished
  Neighbours page, and a cold full-vocabulary UMAP (with whether a map was shown while it ran).
* ``scale`` -- every expensive stage on synthetic matrices of today's vocabulary shapes (not a default stage:
  hours), each in its own process with its peak memory.
* ``cluster`` -- a 12-variant sweep (:class:`ClusterSweep`) on a local Ray cluster of 2 workers against the
  serial sweep (not a default stage: it needs Ray and runs three cold sweeps of minutes each), each in a
  fresh process with a cold cache: the speed-up and whether the rows are identical.

Every figure is the median of several runs (``runs`` gives the count, ``samples`` every run); ratios are
taken within one run on one machine (``machine`` describes it, load average included). ``targets`` says
which of the project's targets are met. ``--quick`` runs fewer repeats, a 3-epoch paper recipe and a
sampled UMAP, and says so in the report.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from embviz.progress import Progress, ProgressCallback, quiet

T = TypeVar("T")

DEFAULT_MODEL = "smollm2"
RANK = 64
K = 10
QUALITY_TEXT = "bible:valid"
EVAL_TEXT = "bible:test"
SENTENCE = "The king of France lived in a great ___ in Paris."
PERPLEXITY_SLACK = 1.02  # the fast recipe's perplexity may be at most 2% above the paper recipe's
QUICK_PAPER_EPOCHS = 3
QUICK_UMAP_SAMPLE = 5_000
RECALL_TOLERANCE = 1e-3  # factor and dense recall@10 agree to 0.1 points (float32 near-ties at rank k)
COMPILE_WARMUP_ROWS = 300
MEBIBYTE = 2**20


# -- timing helpers ------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    """The median of ``values`` (NaN for none)."""
    return float(statistics.median(values)) if values else math.nan


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs of one piece of work."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        """The median run."""
        return median(self.runs)


def measure(
    work: Callable[[], T],
    repeats: int,
    *,
    before: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[Timing, list[T]]:
    """Run ``work`` ``repeats`` times (``before()`` untimed ahead of each run): the times and every result."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    times, results = [], []
    for _ in range(repeats):
        if before is not None:
            before()
        started = clock()
        results.append(work())
        times.append(clock() - started)
    return Timing(tuple(times)), results


def rounded(value: Any, digits: int = 4) -> Any:
    """Floats rounded to ``digits`` significant digits (at least millisecond precision kept); others as is."""
    if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value) or value == 0:
        return value
    places = max(3, digits - 1 - math.floor(math.log10(abs(value))))
    return round(value, places)


# -- the report ----------------------------------------------------------------------------------------
@dataclass
class Report:
    """Figures as they are measured: each timed figure keeps its median, its run count and every run."""

    figures: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def record(self, name: str, samples: Sequence[float]) -> float:
        """Store the median of ``samples`` as figure ``name`` (with the count and the runs); return it."""
        values = [float(v) for v in samples]
        self.samples[name] = [rounded(v) for v in values]
        self.runs[name] = len(values)
        self.figures[name] = rounded(median(values))
        return median(values)

    def timing(self, name: str, timing: Timing) -> float:
        """Store a :class:`Timing` as figure ``name``; return its median."""
        return self.record(name, timing.runs)

    def set(self, name: str, value: Any, digits: int = 4) -> Any:
        """Store a single value (a ratio, a flag, a quality figure) as figure ``name``."""
        self.figures[name] = rounded(value, digits)
        return value

    def detail(self, stage: str, **facts: Any) -> None:
        """Add facts about how ``stage`` measured (protocols, settings, breakdowns)."""
        self.details.setdefault(stage, {}).update({k: rounded(v) for k, v in facts.items()})


# -- targets -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One performance target: ``figure`` compared with ``limit`` by ``op`` (and ``requires`` all true).

    ``unassessable`` returns a reason when the figures cannot honestly judge the target (e.g. a sampled map
    for a full-vocabulary target); the target is then reported with ``met: null`` and that reason.
    """

    name: str
    figure: str
    op: str
    limit: float
    unit: str = "s"
    requires: tuple[str, ...] = ()
    unassessable: Callable[[Mapping[str, Any]], str | None] | None = None

    def describe(self) -> str:
        """The target in words, e.g. ``warm_load_s <= 2 s``."""
        extra = "".join(f" and {flag}" for flag in self.requires)
        return f"{self.figure} {self.op} {self.limit:g}{' ' + self.unit if self.unit else ''}{extra}"


def _paper_truncated(figures: Mapping[str, Any]) -> str | None:
    epochs = figures.get("paper_recipe_epochs")
    full = figures.get("paper_recipe_full_epochs")
    if figures.get("from_cache"):
        return "the paper recipe's time came from a cached artifact"
    if epochs is not None and full is not None and epochs < full:
        return (
            f"the paper recipe ran {epochs} of its {full} epochs (--quick): not a time-to-quality comparison"
        )
    return None


def _umap_sampled(figures: Mapping[str, Any]) -> str | None:
    if figures.get("umap_sampled"):
        return (
            f"UMAP ran on a sample of {figures.get('umap_points')} points (--quick), not the full vocabulary"
        )
    return None


TARGETS: tuple[Target, ...] = (
    Target("warm load", "warm_load_s", "<=", 2.0),
    Target("cold load", "cold_load_s", "<=", 40.0),
    Target(
        "fast AE recipe: paper quality in <= 1/10 of its time",
        "ae_speedup",
        ">=",
        10.0,
        unit="x",
        requires=("fast_quality_ok",),
        unassessable=_paper_truncated,
    ),
    Target("full-vocabulary recall@10, low-rank variant", "knn_recall_s", "<=", 5.0),
    Target("recall@10 speed-up over the dense baseline", "knn_speedup", ">=", 5.0, unit="x"),
    Target("full-vocabulary UMAP map, cold", "umap_full_vocab_s", "<=", 90.0, unassessable=_umap_sampled),
    Target("UMAP map from the cache", "umap_cached_s", "<=", 1.0),
    Target("PCA map", "pca_map_s", "<=", 2.0),
    Target("predictions, three variants", "predict_latency_s", "<=", 2.0),
    Target("peak memory, backbone + three variants", "peak_rss_mb", "<=", 3072.0, unit="MiB"),
    Target("every fit at 1 bit per weight (2 CPU cores)", "fit_slowest_at_1_bit_s", "<=", 120.0),
)


APP_PAGE_LIMIT_S = 3.0
APP_TARGETS: tuple[Target, ...] = (
    Target("app: Predictions page, a new sentence, three variants", "app_predictions_s", "<=", 3.0),
    Target(
        "app: Neighbours page, two fresh variants (original table cached)",
        "app_neighbours_fresh_variants_s",
        "<=",
        10.0,
    ),
    Target("app: new rank, sidebar change to a finished Neighbours page", "app_new_rank_s", "<=", 15.0),
    Target(
        "app: UMAP chosen on the Map page, PCA shown beside its progress",
        "app_umap_first_map_s",
        "<=",
        2.0,
        requires=("app_umap_progress_shown", "app_umap_pca_first"),
    ),
    Target("app: full-vocabulary UMAP map, cold", "app_umap_cold_s", "<=", 60.0),
)
"""The browser targets (stage ``app``); one more per page: :func:`app_page_target`."""


def app_page_target(page: str) -> Target:
    """The warm-page target of one app page (``figure`` ``app_warm_<page>_s``)."""
    return Target(f"app: {page} page finished, warm", f"app_warm_{page}_s", "<=", APP_PAGE_LIMIT_S)


def targets_for(figures: Mapping[str, Any], stages: Sequence[str]) -> tuple[Target, ...]:
    """The engine targets, plus those of the opt-in stages that ran: ``scale``, ``cluster`` and ``app`` (the
    browser targets, one per page it timed)."""
    chosen = TARGETS + (SCALE_TARGETS if "scale" in stages else ())
    chosen += CLUSTER_TARGETS if "cluster" in stages else ()
    if "app" not in stages:
        return chosen
    pages = [name[len("app_warm_") : -len("_s")] for name in figures if name.startswith("app_warm_")]
    return chosen + APP_TARGETS + tuple(app_page_target(page) for page in pages)


def evaluate_targets(
    figures: Mapping[str, Any], targets: Sequence[Target] = TARGETS
) -> dict[str, dict[str, Any]]:
    """``{figure: {target, measured, met, ...}}``; ``met`` is None where a figure is missing or unassessable."""
    verdicts: dict[str, dict[str, Any]] = {}
    for target in targets:
        measured = figures.get(target.figure)
        entry: dict[str, Any] = {"name": target.name, "target": target.describe(), "measured": measured}
        reason = target.unassessable(figures) if target.unassessable else None
        missing = [name for name in (target.figure, *target.requires) if figures.get(name) is None]
        if missing:
            entry.update(met=None, note=f"not measured: {', '.join(missing)}")
        elif reason:
            entry.update(met=None, note=reason)
        else:
            value = float(figures[target.figure])  # not missing: measured
            within = value <= target.limit if target.op == "<=" else value >= target.limit
            entry["met"] = bool(within and all(figures.get(flag) is True for flag in target.requires))
            if target.requires:
                entry.update({flag: figures.get(flag) for flag in target.requires})
        verdicts[target.figure] = entry
    return verdicts


# -- the AE comparison ---------------------------------------------------------------------------------
def time_to_reach(history: Sequence[Mapping[str, Any]], goal: float, setup_s: float = 0.0) -> float | None:
    """Seconds (``setup_s`` plus whole epochs) until a fit's validation mean cosine first reaches ``goal``."""
    elapsed = setup_s
    for record in history:
        elapsed += float(record["seconds"])
        if float(record["val_mean_cosine"]) >= goal:
            return elapsed
    return None


def quality_ok(
    fast: Mapping[str, float], paper: Mapping[str, float], slack: float = PERPLEXITY_SLACK
) -> bool:
    """The fast recipe matches the paper's: mean cosine at least as high, perplexity within ``slack``."""
    return fast["mean_cosine"] >= paper["mean_cosine"] and fast["perplexity"] <= paper["perplexity"] * slack


def recipe_text(name: str, short: bool = False) -> str:
    """An AE recipe in words, from :data:`embviz.compressors.RECIPES` (``short``: batch and epochs only)."""
    from embviz.compressors import RECIPES

    recipe = RECIPES[name]
    if short:
        return f"batch {recipe.batch_size}, {recipe.epochs} epochs"
    schedule = (
        f"lr x{recipe.gamma:g} every {recipe.step_epochs} epochs"
        if recipe.schedule == "step"
        else "per-step cosine decay"
    )
    start = "SVD warm start" if recipe.warm_start else "PyTorch default initialisation"
    return f"Adam lr {recipe.lr:g}, batch {recipe.batch_size}, {recipe.epochs} epochs, {schedule}, {start}"


def compare_block(figures: Mapping[str, Any], command: str) -> dict[str, Any] | None:
    """The fast recipe against the original recipe's defaults (batch 32, 30 epochs), ready for the README."""
    needed = ("ae_paper_recipe_s", "ae_fast_recipe_s", "ae_speedup", "fast_quality_ok")
    if any(figures.get(name) is None for name in needed):
        return None
    reason = _paper_truncated(figures)
    speedup, same = figures["ae_speedup"], figures["fast_quality_ok"]
    original = recipe_text("paper", short=True)
    quality = (
        f"mean cosine {figures['ae_fast_mean_cosine']:.5f} vs {figures['ae_paper_mean_cosine']:.5f}, "
        f"perplexity on {QUALITY_TEXT} {figures['ae_fast_perplexity']:.1f} vs {figures['ae_paper_perplexity']:.1f}"
    )
    if reason:
        statement = f"not comparable: {reason}"
    elif same:
        statement = (
            f"the fast AE recipe is {speedup:.1f}x faster than the original recipe ({original}) "
            f"to the same quality ({quality}), rank {figures.get('ae_rank', RANK)}"
        )
    else:
        statement = (
            f"the fast AE recipe is {speedup:.1f}x faster than the original recipe ({original}) "
            f"but does not reach its quality ({quality})"
        )
    return {
        "baseline": f"original recipe: {recipe_text('paper')}",
        "candidate": f"fast recipe: {recipe_text('fast')}",
        "baseline_s": figures["ae_paper_recipe_s"],
        "candidate_s": figures["ae_fast_recipe_s"],
        "speedup": speedup,
        "same_quality": same,
        "quality_rule": f"fast mean cosine >= paper's and fast perplexity <= paper's x {PERPLEXITY_SLACK}",
        "baseline_epochs": figures.get("paper_recipe_epochs"),
        "comparable": reason is None,
        "fast_time_to_paper_quality_s": figures.get("fast_time_to_paper_quality_s"),
        "statement": statement,
        "command": command,
    }


# -- machine facts -------------------------------------------------------------------------------------
def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """The 1 / 5 / 15-minute load averages (None where the platform has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def machine_facts() -> dict[str, Any]:
    """CPU count and model, torch threads, accelerator, library versions, memory, load average now."""
    import torch

    try:
        memory_kb = next(
            int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )  # fmt: skip
    except (OSError, StopIteration, ValueError):
        memory_kb = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "memory_gib": round(memory_kb / MEBIBYTE, 1) if memory_kb else None,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "umap_learn": _version("umap-learn"),
        "numba": _version("numba"),
        "load_average_start": load_average(),
    }


# -- settings and shared state -------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterSweep:
    """The sweep the ``cluster`` stage times serially and on a local Ray cluster of ``workers`` slots.

    The default is 12 jobs of the kind a user compares: SVD, the paper-loss AE (the sweep's fast recipe) and
    frequency-weighted SVD at 4x, 8x and 16x, plus the int8 and int4 row quantisers and llama.cpp's Q4_0 (each
    once, at its own size); perplexity on 512 tokens of ``bible:test``, recall@10 as every sweep.
    """

    methods: tuple[str, ...] = ("svd", "ae-paper", "svd-freq", "quant-int8", "quant-int4", "gguf-q4_0")
    ratios: tuple[float, ...] = (4.0, 8.0, 16.0)
    text: str = EVAL_TEXT
    max_tokens: int = 512
    k: int = K
    recipe: str = "fast"
    workers: int = 2

    def sweep_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`embviz.evaluation.sweep` (and ``ray_sweep``) but the methods."""
        return {
            "ratios": list(self.ratios),
            "text": self.text,
            "max_tokens": self.max_tokens,
            "k": self.k,
            "recipe": self.recipe,
        }

    def command(self, model: str, ray: bool) -> str:
        """The same sweep as an ``embviz sweep`` command line."""
        line = (
            f"embviz sweep {model} --methods {','.join(self.methods)} --ratios "
            f"{','.join(f'{r:g}' for r in self.ratios)} --text {self.text} --max-tokens {self.max_tokens} "
            f"--k {self.k} --recipe {self.recipe}"
        )
        return line + (f" --ray --workers {self.workers}" if ray else "")


@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how often: ``repeats`` for cheap figures, ``heavy_repeats`` for costly ones."""

    model: str = DEFAULT_MODEL
    quick: bool = False
    rank: int = RANK
    repeats: int = 5
    heavy_repeats: int = 3
    paper_epochs: int | None = None  # None: the recipe's own 30
    umap_sample: int | None = None  # None: the full vocabulary
    python: str = sys.executable
    scale_vocabs: tuple[int, ...] = (30_000, 64_000, 128_000, 256_000)
    scale_hiddens: tuple[int, ...] = (576, 2048, 4096)
    scale_stages: tuple[str, ...] = ("svd", "ae", "vq", "neighbours", "recall", "pca", "umap")
    scale_limit_s: float = 600.0  # a stage predicted (or found) to take longer at a shape is skipped there
    scale_points: Path | None = None  # JSON lines: each finished shape's points; complete shapes are reused
    cluster_repeats: int = 1  # each run of the cluster stage is three cold sweeps (minutes each)
    cluster_sweep: ClusterSweep = ClusterSweep()

    @classmethod
    def for_mode(
        cls, *, quick: bool, model: str = DEFAULT_MODEL, repeats: int | None = None
    ) -> BenchSettings:
        """Full mode, or ``--quick``: fewer repeats, a 3-epoch paper recipe and a sampled UMAP. ``repeats``
        sets every count (the ``cluster`` stage's too, which is otherwise 1)."""
        base = (
            cls(model=model, quick=True, repeats=3, heavy_repeats=1, paper_epochs=QUICK_PAPER_EPOCHS,
                umap_sample=QUICK_UMAP_SAMPLE)
            if quick else cls(model=model)
        )  # fmt: skip
        if not repeats:
            return base
        return replace(base, repeats=repeats, heavy_repeats=repeats, cluster_repeats=repeats)


class BenchContext:
    """The backbone and the rank-``r`` variants shared by the in-process stages, loaded on first use."""

    def __init__(self, settings: BenchSettings, progress: ProgressCallback | None = None) -> None:
        self.settings = settings
        self.progress = progress or quiet
        self.stage, self.stages = 0, 1

    def say(self, message: str) -> None:
        """Report ``message`` as progress: ``stage`` of ``stages`` done."""
        self.progress(Progress(self.stage, self.stages, message))

    @cached_property
    def backbone(self) -> Any:
        from embviz.sources import load_model

        self.say(f"loading {self.settings.model} (not timed; the load stage times loads)")
        return load_model(self.settings.model)

    def default_compressors(self) -> dict[str, Any]:
        """``{"SVD": ..., "AE": ...}``: the app's default variants at the benchmark's rank, unfitted."""
        from embviz.compressors import make_compressor

        return {
            "SVD": make_compressor("svd", self.settings.rank),
            "AE": make_compressor("ae-paper", self.settings.rank, recipe="fast"),
        }

    @cached_property
    def variants(self) -> dict[str, Any]:
        """``{"SVD": ..., "AE": ...}`` compressed embeddings (the app's defaults) from the artifact cache."""
        from embviz.artifacts import compress_cached

        found = {}
        for name, compressor in self.default_compressors().items():
            self.say(f"variant {name}: {compressor.get_config()['label']} r={self.settings.rank}")
            found[name] = compress_cached(self.backbone.name, self.backbone.embedding, compressor)
        self.variant_sources = {
            name: "artifact cache" if r.cached else "fitted now" for name, r in found.items()
        }
        return {name: result.compressed for name, result in found.items()}

    @cached_property
    def reconstructions(self) -> dict[str, Any]:
        """The dense V x D matrices of the variants (what the app holds for predictions and perplexity)."""
        return {name: variant.reconstruct() for name, variant in self.variants.items()}


@contextlib.contextmanager
def temporary_home() -> Iterator[Path]:
    """A fresh, empty ``EMBVIZ_HOME`` for this process (restored and deleted afterwards)."""
    from embviz.cache import HOME_ENV

    previous = os.environ.get(HOME_ENV)
    folder = Path(tempfile.mkdtemp(prefix="embviz-bench-"))
    os.environ[HOME_ENV] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(HOME_ENV, None)
        else:
            os.environ[HOME_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


# -- subprocesses --------------------------------------------------------------------------------------
_IMPORTS = (
    "import time\n"
    "_t0 = time.perf_counter()\n"
    "from embviz.sources import load_model\n"
    "from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer\n"
    "from transformers import PreTrainedModel\n"
    "_import_s = time.perf_counter() - _t0\n"
)
LOAD_CHILD = _IMPORTS + (
    "import json, sys\n"
    "_t = time.perf_counter(); load_model(sys.argv[1]); _load_s = time.perf_counter() - _t\n"
    "_t = time.perf_counter(); load_model(sys.argv[1]); _reload_s = time.perf_counter() - _t\n"
    "print(json.dumps({'import_s': _import_s, 'load_s': _load_s, 'reload_s': _reload_s}))\n"
)
"""Child script: imports, then a first and a second ``load_model`` of ``argv[1]``, timed apart."""

MEMORY_CHILD = _IMPORTS + (
    "import json, resource, sys\n"
    "from embviz.artifacts import compress_cached\n"
    "from embviz.compressors import make_compressor\n"
    "from embviz.corpora import resolve_texts\n"
    "from embviz.perplexity import evaluate_perplexity\n"
    "from embviz.predictions import predict_blank\n"
    "model, rank, sentence, text = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]\n"
    "backbone = load_model(model)\n"
    "compressors = {'SVD': make_compressor('svd', rank),\n"
    "               'AE': make_compressor('ae-paper', rank, recipe='fast')}\n"
    "variants = {name: compress_cached(backbone.name, backbone.embedding, c).compressed.reconstruct()\n"
    "            for name, c in compressors.items()}\n"
    "predict_blank(backbone, sentence, variants)\n"
    "evaluate_perplexity(backbone, resolve_texts(text), {'SVD': variants['SVD']})\n"
    "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "print(json.dumps({'peak_rss_mb': peak / 1024}))\n"
)
"""Child script: an app-like session (backbone, SVD and AE reconstructions, one prediction, one
perplexity evaluation); prints its peak resident set size (``ru_maxrss`` is in KiB on Linux)."""


def run_child(settings: BenchSettings, script: str, args: Sequence[str], home: Path | None = None) -> dict:
    """Run ``script`` in a fresh interpreter; its last stdout line (JSON) plus ``process_s`` (outside wall)."""
    from embviz.cache import HOME_ENV

    env = dict(os.environ)
    if home is not None:
        env[HOME_ENV] = str(home)
    started = time.perf_counter()
    done = subprocess.run(
        [settings.python, "-c", script, *args], env=env, capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmark subprocess failed ({done.returncode}): {tail}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": elapsed}


# -- stages --------------------------------------------------------------------------------------------
def stage_load(context: BenchContext, report: Report) -> None:
    """Cold load in a fresh home (conversion included), then warm loads from that home, in subprocesses."""
    settings = context.settings
    home = Path(tempfile.mkdtemp(prefix="embviz-bench-home-"))
    try:
        cold = []
        for run in range(settings.heavy_repeats):
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir()
            cold.append(run_child(settings, LOAD_CHILD, [settings.model], home))
            context.say(f"cold load {run + 1}/{settings.heavy_repeats}: {cold[-1]['load_s']:.2f} s")
        warm = []
        for run in range(settings.repeats):
            warm.append(run_child(settings, LOAD_CHILD, [settings.model], home))
            context.say(f"warm load {run + 1}/{settings.repeats}: {warm[-1]['load_s']:.2f} s")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    report.record("import_s", [r["import_s"] for r in cold + warm])
    report.record("cold_load_s", [r["load_s"] for r in cold])
    report.record("cold_process_s", [r["process_s"] for r in cold])
    report.record("warm_load_s", [r["load_s"] for r in warm])
    report.record("warm_process_s", [r["process_s"] for r in warm])
    report.record("warm_reload_s", [r["reload_s"] for r in cold + warm])
    report.detail(
        "load",
        model=settings.model,
        import_covers="from embviz.sources import load_model; transformers' Auto* classes and PreTrainedModel",
        cold="first load ever: a fresh temporary EMBVIZ_HOME per run, GGUF conversion included",
        warm="the first load in a fresh process, from the converted cache, after the imports",
        warm_reload="a second load in the same process (everything imported and in the page cache)",
        process="wall time of the whole subprocess measured from outside (interpreter start included)",
    )


def _fit_timed(context: BenchContext, report: Report, name: str, compressor: Any, repeats: int) -> Any:
    embedding = context.backbone.embedding
    timing, fits = measure(lambda: compressor.fit(embedding), repeats)
    context.say(f"{name}: {', '.join(f'{t:.1f}' for t in timing.runs)} s")
    report.timing(name, timing)
    return fits[-1]


def stage_ae(context: BenchContext, report: Report) -> None:
    """The paper recipe against the fast recipe at rank r: time, mean cosine, perplexity on bible:valid."""
    from embviz.compressors import RECIPES, AECompressor, make_compressor, reconstruction_quality
    from embviz.corpora import resolve_texts
    from embviz.perplexity import DEFAULT_MAX_TOKENS, evaluate_perplexity

    settings = context.settings
    backbone = context.backbone
    paper = make_compressor("ae-paper", settings.rank, recipe="paper", epochs=settings.paper_epochs)
    assert isinstance(paper, AECompressor)  # what "ae-paper" builds
    fast = make_compressor("ae-paper", settings.rank, recipe="fast")
    report.set("ae_rank", settings.rank)
    report.set("paper_recipe_epochs", paper.recipe.epochs)
    report.set("paper_recipe_full_epochs", RECIPES["paper"].epochs)
    report.set("from_cache", False)
    fitted = {
        "paper": _fit_timed(context, report, "ae_paper_recipe_s", paper, settings.heavy_repeats),
        "fast": _fit_timed(context, report, "ae_fast_recipe_s", fast, settings.repeats),
    }
    context.say(f"perplexity of both fits on {QUALITY_TEXT}")
    scored = evaluate_perplexity(
        backbone,
        resolve_texts(QUALITY_TEXT),
        {name: compressed.reconstruct() for name, compressed in fitted.items()},
        max_tokens=DEFAULT_MAX_TOKENS,
    )
    quality = {}
    for name, compressed in fitted.items():
        quality[name] = {
            "mean_cosine": reconstruction_quality(backbone.embedding, compressed)["mean_cosine"],
            "perplexity": scored.results[name].perplexity,
        }
        report.set(f"ae_{name}_mean_cosine", quality[name]["mean_cosine"], digits=6)
        report.set(f"ae_{name}_perplexity", quality[name]["perplexity"])
    report.set("ae_original_perplexity", scored.results[scored.reference].perplexity)
    report.set("ae_speedup", report.figures["ae_paper_recipe_s"] / report.figures["ae_fast_recipe_s"])
    report.set("fast_quality_ok", quality_ok(quality["fast"], quality["paper"]))
    goal = max(float(h["val_mean_cosine"]) for h in fitted["paper"].history)
    fast_fit = fitted["fast"]
    setup = fast_fit.train_seconds - sum(float(h["seconds"]) for h in fast_fit.history)
    report.set("fast_time_to_paper_quality_s", time_to_reach(fast_fit.history, goal, setup))
    report.detail(
        "ae",
        paper=paper.label,
        fast=fast.label,
        quality_text=QUALITY_TEXT,
        perplexity_protocol=scored.protocol,
        fast_time_to_paper_quality="seconds of the fast fit (warm start plus whole epochs) until its validation "
        "mean cosine reached the paper fit's best validation mean cosine (from the last run of each)",
        fits="compressor.fit on the backbone's matrix, no artifact cache (from_cache false)",
    )


def stage_knn(context: BenchContext, report: Report) -> None:
    """Full-vocabulary top-k of a low-rank variant: factor path against reconstruct-then-dense, with recall."""
    from embviz.cache import matrix_fingerprint
    from embviz.metrics import NeighbourMethod, nearest_neighbours, neighbour_table_cached, recall_at_k

    settings = context.settings
    backbone = context.backbone
    variant = context.variants["SVD"]
    started = time.perf_counter()
    original = neighbour_table_cached(
        backbone.name, matrix_fingerprint(backbone.embedding), backbone.embedding, K
    ).indices
    report.detail("knn", original_table_s=time.perf_counter() - started)

    def search(method: NeighbourMethod) -> float:
        indices, _ = nearest_neighbours(variant, K, method=method)
        return recall_at_k(original, indices).mean

    recalls = {}
    runs: tuple[tuple[str, NeighbourMethod, int], ...] = (
        ("knn_recall_s", "factors", settings.repeats),
        ("knn_dense_baseline_s", "dense", settings.heavy_repeats),
    )
    for figure, method, repeats in runs:
        timing, results = measure(partial(search, method), repeats)
        context.say(f"{figure}: {', '.join(f'{t:.2f}' for t in timing.runs)} s")
        report.timing(figure, timing)
        recalls[method] = results[-1]
    report.set("knn_speedup", report.figures["knn_dense_baseline_s"] / report.figures["knn_recall_s"])
    report.set("knn_recall_factors", recalls["factors"], digits=6)
    report.set("knn_recall_dense", recalls["dense"], digits=6)
    report.set("knn_same_recall", abs(recalls["factors"] - recalls["dense"]) <= RECALL_TOLERANCE)
    report.detail(
        "knn",
        variant=f"{variant.label} r={variant.rank}",
        k=K,
        vocab=backbone.vocab_size,
        factor_path=f"nearest_neighbours(method='factors'): {variant.rank + 1}-column factor rows, then recall@{K}",
        dense_baseline="nearest_neighbours(method='dense'): reconstruct V x D, blocked dense products, recall",
        same_recall_rule=f"|recall(factors) - recall(dense)| <= {RECALL_TOLERANCE}",
        original_table="the original's top-k table from the neighbour cache (computed once per matrix)",
    )


FIT_METHODS = ("vq-direction", "quant-mixed", "gguf-q8_0", "gguf-q5_1", "gguf-q5_0", "gguf-q4_1", "gguf-q4_0")
"""The methods the bits-per-weight work added or measures against (the AE recipes have their own stage)."""
FIT_BUDGETS = (4.0, 2.0, 1.0, 0.5)
"""Budgets in bits per weight the ``fits`` stage sizes each method to (fixed-size formats: their own)."""


def fit_figure(method: str, bits: float | None) -> str:
    """The figure name of one fit: ``fit_vq_direction_1b_s`` (a budget) or ``fit_gguf_q4_0_s`` (fixed)."""
    budget = "" if bits is None else f"_{bits:g}b".replace(".", "p")
    return f"fit_{method.replace('-', '_')}{budget}_s"


def stage_fits(context: BenchContext, report: Report) -> None:
    """Fit time of each :data:`FIT_METHODS` method at each :data:`FIT_BUDGETS` budget it can meet (the
    sweep's own sizing), no artifact cache; the slowest fit at 1 bit against its limit."""
    from embviz.compressors import get_method
    from embviz.evaluation import plan_sweep

    settings, backbone = context.settings, context.backbone
    plan = plan_sweep(backbone, FIT_METHODS, None, None, "fast", bits=FIT_BUDGETS)
    embedding = backbone.embedding
    layouts: dict[str, Any] = {}
    one_bit: list[float] = []
    for job in plan:
        fixed = get_method(job.method).sizing == "fixed"
        figure = fit_figure(job.method, None if fixed else job.target_bits)
        repeats = settings.repeats if fixed else settings.heavy_repeats
        context.say(f"{figure}: fitting {job.method} ({repeats} runs)")
        timing, fits = measure(partial(job.compressor.fit, embedding), repeats)
        context.say(f"{figure}: {', '.join(f'{t:.1f}' for t in timing.runs)} s")
        report.timing(figure, timing)
        fitted = fits[-1]
        layouts[figure] = {"label": fitted.label, "bits_per_weight": round(fitted.bits_per_weight, 4)}
        if job.target_bits == 1.0 and not fixed:
            one_bit.append(report.figures[figure])
    if one_bit:
        report.set("fit_slowest_at_1_bit_s", max(one_bit))
    report.detail(
        "fits",
        budgets=list(FIT_BUDGETS),
        methods=list(FIT_METHODS),
        fitted=layouts,
        notes=list(plan.notes),
        measured="compressor.fit on the backbone's matrix, no artifact cache; row weights (wordfreq) "
        "computed once before timing",
    )


def _warm_numba() -> float:
    """Run a tiny UMAP fit + transform so numba compiles its kernels; the seconds it took."""
    import numpy as np

    from embviz.projections import umap_map

    rows = np.random.default_rng(0).standard_normal((COMPILE_WARMUP_ROWS, 16)).astype(np.float32)
    started = time.perf_counter()
    umap_map(rows, {"warm-up": rows + 0.01})
    return time.perf_counter() - started


def stage_maps(context: BenchContext, report: Report) -> None:
    """UMAP (compile apart, cold in a fresh cache, then cached) and PCA of original + SVD + AE."""
    from embviz.projections import pca_map, projection_map

    settings = context.settings
    backbone = context.backbone
    embedding, variants = backbone.embedding, context.variants
    compile_s = _warm_numba()
    report.set("umap_compile_s", compile_s)
    context.say(f"umap_compile_s: {compile_s:.1f} s (umap import and numba compilation, on random rows)")
    params: dict[str, Any] = {"sample": settings.umap_sample} if settings.umap_sample else {}

    def umap() -> Any:
        return projection_map("umap", embedding, variants, backbone_name=backbone.name, **params)

    with contextlib.ExitStack() as homes:  # every cold run in its own fresh cache; all removed afterwards
        cold, maps = measure(
            umap, settings.heavy_repeats, before=lambda: homes.enter_context(temporary_home())
        )
        cached, hits = measure(umap, settings.repeats)  # the last fresh cache now holds the map
    context.say(f"umap cold: {', '.join(f'{t:.1f}' for t in cold.runs)} s; cached {cached.median:.3f} s")
    report.timing("umap_full_vocab_s", cold)
    report.record("umap_fit_s", [found.seconds for found in maps])
    report.timing("umap_cached_s", cached)
    report.set("umap_points", len(maps[-1].ids))
    report.set("umap_sampled", maps[-1].sampled)
    report.set("umap_cache_hits", all(hit.from_cache for hit in hits))
    timing, _ = measure(lambda: pca_map(embedding, variants), settings.repeats)
    report.timing("pca_map_s", timing)
    report.detail(
        "maps",
        variants=list(variants),
        variant_form="compressed embeddings (low-rank factors), as the app's map page passes them",
        umap_compile=f"import umap plus numba compilation: a UMAP fit and transform of {COMPILE_WARMUP_ROWS} "
        "random rows, before any timed map",
        umap_cold="projection_map in a fresh EMBVIZ_HOME per run: the original's neighbour table, the "
        "UMAP fit and one transform per variant (numba already compiled)",
        umap_fit="the map computation alone (projection_map's own seconds, the original's table excluded)",
        umap_cached="the same call again, served from the disk cache",
        umap_sample=settings.umap_sample,
        pca="pca_map (exact PCA of the original, both variants projected), computed each run",
    )


def stage_latency(context: BenchContext, report: Report) -> None:
    """Fill-in-the-blank for original / SVD / AE, and one perplexity evaluation (original + SVD)."""
    from embviz.corpora import resolve_texts
    from embviz.perplexity import evaluate_perplexity
    from embviz.predictions import predict_blank

    settings = context.settings
    backbone, matrices = context.backbone, context.reconstructions
    first, _ = measure(lambda: predict_blank(backbone, SENTENCE, matrices), 1)
    report.set("predict_first_s", first.median)
    timing, results = measure(lambda: predict_blank(backbone, SENTENCE, matrices), settings.repeats)
    report.timing("predict_latency_s", timing)
    context.say(f"predict_latency_s: {timing.median:.2f} s (first call {first.median:.2f} s)")
    timing, scored = measure(
        lambda: evaluate_perplexity(backbone, resolve_texts(EVAL_TEXT), {"SVD": matrices["SVD"]}),
        settings.heavy_repeats,
    )
    report.timing("perplexity_eval_s", timing)
    context.say(f"perplexity_eval_s: {timing.median:.1f} s")
    report.detail(
        "latency",
        sentence=SENTENCE,
        variants=list(results[-1].variants),
        prediction_method=results[-1].method,
        predict_first="the first prediction call (not in the median)",
        perplexity_text=EVAL_TEXT,
        perplexity_protocol=scored[-1].protocol,
        perplexity="evaluate_perplexity of original + SVD, eval set built each run, no result cache",
    )


def stage_memory(context: BenchContext, report: Report) -> None:
    """Peak RSS of an app-like subprocess: backbone, SVD and AE reconstructions, a prediction, a perplexity."""
    settings = context.settings
    context.variants  # noqa: B018 -- make sure both artifacts are in the cache the child reads
    args = [settings.model, str(settings.rank), SENTENCE, EVAL_TEXT]
    results = [run_child(settings, MEMORY_CHILD, args) for _ in range(settings.heavy_repeats)]
    report.record("peak_rss_mb", [r["peak_rss_mb"] for r in results])
    report.detail(
        "memory",
        measured="resource.getrusage(RUSAGE_SELF).ru_maxrss of a fresh process after loading the backbone, the "
        "SVD and AE reconstructions (V x D each), one prediction and one perplexity evaluation; MiB",
    )


# -- the app in a browser ------------------------------------------------------------------------------
APP_TIMEOUT_MS = 600_000
APP_VIEWPORT = {"width": 1400, "height": 1000}


def fresh_rank(home: Path, rank: int, hidden_size: int | None = None) -> int:
    """A rank near ``rank`` with no compressed artifact in ``home`` (no ``-r<rank>-`` entry for any method).

    Tries ``rank`` + 8, - 8, + 16, - 16, ... (below ``hidden_size`` when given).
    """
    names = (
        [entry.name for entry in (home / "artifacts").glob("*/*")] if (home / "artifacts").is_dir() else []
    )
    for step in range(1, 64):
        for candidate in (rank + 8 * step, rank - 8 * step):
            if candidate < 1 or (hidden_size is not None and candidate >= hidden_size):
                continue
            if not any(f"-r{candidate}-" in name for name in names):
                return candidate
    raise RuntimeError(f"no uncached rank near {rank} in {home}")


def seed_skipped(relative: Path, fresh: int | None = None) -> bool:
    """What a seeded home leaves out: lock files, every map (UMAP and PCA run cold), the app's variant
    neighbour tables and any artifact at rank ``fresh``. The original's table stays: the app searches it once
    per model, as wide as a full-vocabulary UMAP needs (:func:`embviz.projections.shared_table_width`), and
    the Neighbours and Map pages and the UMAP share it."""
    parts = relative.parts
    if not parts:
        return False
    if parts[-1].endswith(".lock") or parts[0] == "maps":
        return True
    if parts[0] == "artifacts" and fresh is not None and len(parts) > 2 and f"-r{fresh}-" in parts[2]:
        return True
    # The app's variant tables (``<model>-variant-<method>-k10-...``) stay out too: variants start fresh.
    return parts[0] == "neighbours" and "-variant-" in parts[-1]


@contextlib.contextmanager
def seeded_home(
    source: Path,
    fresh: int | None = None,
    *,
    folders: Sequence[str] | None = None,
    prefix: str = "embviz-bench-app-",
) -> Iterator[Path]:
    """A new ``EMBVIZ_HOME`` beside ``source`` holding hard links to its entries (copies across disks),
    less :func:`seed_skipped`'s (``fresh``: the rank kept uncached), and only those under the top-level
    ``folders`` when given (e.g. ``("backbones",)``: a cold cache but for the converted backbone); deleted
    afterwards. The app's writes are atomic renames: the source is never changed through a link."""
    parent = source.parent if os.access(source.parent, os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        if source.is_dir():
            for path in sorted(source.rglob("*")):
                relative = path.relative_to(source)
                if seed_skipped(relative, fresh) or (
                    folders is not None and relative.parts[0] not in folders
                ):
                    continue
                target = folder / relative
                if path.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, target)
                except OSError:
                    shutil.copy2(path, target)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class AppSamples:
    """What the browser runs measured: seconds per figure, flags per run, failures."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    flags: dict[str, list[bool]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    chromium: str | None = None

    def add(self, name: str, value: float) -> None:
        """One more run of figure ``name``."""
        self.seconds.setdefault(name, []).append(value)

    def flag(self, name: str, value: bool) -> None:
        """One more run's answer to a yes / no question."""
        self.flags.setdefault(name, []).append(value)


class AppDriver:
    """One browser page on one served app: opens pages and times them until finished."""

    def __init__(self, page: Any, url: str, rank: int, samples: AppSamples) -> None:
        self.page, self.url, self.rank, self.samples = page, url, rank, samples
        self.step = "starting"  # what the driver is waiting for: named in a failure's report

    def settle(self, heading: str | None, started: float, after_runs: int | None = None) -> list[float]:
        """Wait until finished; click the AE's train button whenever a page stops on it.

        Returns the seconds (from ``started``) at which the button was clicked.
        """
        from embviz.browser import TRAIN_BUTTON, script_runs, train_button_visible, wait_until_finished

        clicks: list[float] = []
        while True:
            remaining = max(1_000.0, APP_TIMEOUT_MS - (time.perf_counter() - started) * 1000)
            wait_until_finished(self.page, heading, after_runs=after_runs, timeout_ms=remaining)
            if not train_button_visible(self.page):
                return clicks
            clicks.append(time.perf_counter() - started)
            after_runs = script_runs(self.page)
            self.page.get_by_role("button", name=TRAIN_BUTTON).first.click()

    def open(self, page: Any, figure: str | None, **query: Any) -> float:
        """Open ``page`` by URL (at this rank) and time it to a finished page; recorded as ``figure``."""
        from embviz.browser import page_url

        started = time.perf_counter()
        self.step = f"opening {page.name} by URL ({figure or 'not recorded'})"
        self.page.goto(page_url(self.url, page.url_path, rank=self.rank, **query), wait_until="commit")
        if figure and page.name == "neighbours":
            self.first_answer(figure, started, None)
        clicks = self.settle(page.heading, started)
        elapsed = time.perf_counter() - started
        if figure:
            self.samples.add(figure, elapsed)
            if clicks:
                self.samples.flag(f"{figure}_train_clicked", True)
        return elapsed

    def navigate(self, page: Any, figure: str) -> float:
        """Click ``page``'s sidebar link and time it to a finished page; recorded as ``figure``.

        The wait is for ``page``'s heading, not for a counted script run: a warm page can run so quickly that
        the browser never draws it as running (see :data:`embviz.browser.RUN_COUNTER_JS`).
        """
        from embviz.browser import page_state

        self.step = f"navigating to {page.name} from the sidebar ({figure})"
        if any(page.heading in heading for heading in page_state(self.page)["headings"]):
            raise ValueError(f"already on {page.name}: a click on its own link is no navigation")
        link = self.page.get_by_test_id("stSidebarNav").get_by_role("link", name=page.title).first
        started = time.perf_counter()
        link.click()
        clicks = self.settle(page.heading, started)
        elapsed = time.perf_counter() - started
        self.samples.add(figure, elapsed)
        if clicks:
            self.samples.flag(f"{figure}_train_clicked", True)
        return elapsed

    def first_answer(self, figure: str, started: float, after_runs: int | None) -> None:
        """Record when the Neighbours page first shows recall (``<figure>_first_answer_s``) and whether that
        was the sampled estimate (``<figure>_estimate_first``); a train button first ends the wait."""
        from embviz.browser import train_button_visible, wait_for_recall_answer

        try:
            answer = wait_for_recall_answer(self.page, after_runs, timeout_ms=APP_TIMEOUT_MS)
        except Exception:  # e.g. the page stopped on a train button: settle() handles that
            if train_button_visible(self.page):
                return
            raise
        stem = figure.removesuffix("_s")
        self.samples.add(f"{stem}_first_answer_s", time.perf_counter() - started)
        self.samples.flag(f"{stem}_estimate_first", answer == "estimate")

    def after_action(
        self, heading: str, action: Callable[[], None], first_answer: str | None = None
    ) -> tuple[float, list[float]]:
        """Seconds from ``action`` (e.g. pressing Enter) to the finished page, and any train-button clicks;
        ``first_answer`` names a figure whose first recall answer is recorded on the way."""
        from embviz.browser import script_runs

        before = script_runs(self.page)
        started = time.perf_counter()
        action()
        if first_answer:
            self.first_answer(first_answer, started, before)
        clicks = self.settle(heading, started, after_runs=before)
        return time.perf_counter() - started, clicks

    def exceptions(self) -> list[str]:
        """Tracebacks the page shows (``st.exception``)."""
        boxes = self.page.locator("[data-testid='stException']")
        return [boxes.nth(i).inner_text()[:300] for i in range(boxes.count())]


def _first_visit_figure(name: str, url_path: str) -> str:
    """The figure a page's first visit is recorded as (the default page's is the server's first visit)."""
    if url_path == "":
        return "app_first_visit_s"
    return "app_neighbours_fresh_variants_s" if name == "neighbours" else f"app_first_{name}_s"


def _app_run(driver: AppDriver, pages: Sequence[Any], new_rank: int) -> dict[str, Any]:
    """One run on a freshly started server: first visits, warm pages, a sentence, a new rank, a cold UMAP."""
    from embviz.browser import script_runs, wait_for_background_progress, wait_for_first_figure

    samples, facts = driver.samples, dict[str, Any]()
    by_name = {page.name: page for page in pages}
    default = next(page for page in pages if page.url_path == "")
    facts["first_visit_s"] = driver.open(default, "app_first_visit_s")  # backbone and variants load here
    for page in pages:  # first visits: each page's own in-memory caches fill here
        if page is not default:
            driver.open(page, _first_visit_figure(page.name, page.url_path))
    for page in pages:  # warm: in-app navigation from the sidebar, as a user moves between pages
        driver.navigate(page, f"app_warm_{page.name}_s")
    if "predictions" in by_name:
        driver.open(by_name["predictions"], None)
        box = driver.page.locator("input[aria-label='Sentence with a blank']")
        driver.step = "predictions for a new sentence"
        box.fill(SENTENCE)
        elapsed, _ = driver.after_action(by_name["predictions"].heading, lambda: box.press("Enter"))
        samples.add("app_predictions_s", elapsed)
        tables = driver.page.locator("[data-testid='stDataFrame']").count()
        samples.flag("app_predictions_three_tables", tables >= 3)
    if "neighbours" in by_name:
        neighbours = by_name["neighbours"]
        driver.open(neighbours, None)
        box = driver.page.locator("input[aria-label='Rank (latent size r)']")
        driver.step = f"a new rank ({new_rank}) on Neighbours"
        box.fill(str(new_rank))
        elapsed, clicks = driver.after_action(
            neighbours.heading, lambda: box.press("Enter"), first_answer="app_new_rank_s"
        )
        samples.add("app_new_rank_s", elapsed)
        samples.flag("app_new_rank_train_clicked", bool(clicks))
        if clicks:
            samples.add("app_new_rank_train_button_s", clicks[0])
        shown = driver.page.get_by_text(" mean recall@").count() >= 2  # the two default variants' metrics
        samples.flag("app_new_rank_both_variants", shown and f"rank={new_rank}" in driver.page.url)
    if "map" in by_name:
        map_page = by_name["map"]
        driver.open(map_page, None)  # the PCA map, as a user finds it before asking for UMAP
        before = script_runs(driver.page)
        started = time.perf_counter()
        driver.step = "UMAP chosen on the Map page"
        driver.page.get_by_test_id("stRadio").get_by_text("umap", exact=True).click()
        shown = wait_for_background_progress(driver.page, before, APP_TIMEOUT_MS)
        samples.add("app_umap_first_map_s", time.perf_counter() - started)
        samples.flag("app_umap_progress_shown", shown == "progress")
        clicks = driver.settle(map_page.heading, started)
        samples.add("app_umap_cold_s", time.perf_counter() - started)
        facts["umap_train_clicked"] = bool(clicks)
        # A link to UMAP for variants with no map yet (the new rank's), opened in a second tab: a fresh
        # document (Streamlit's bundle, plotly.js, a new session) whose script computes PCA, starts UMAP and
        # shows PCA meanwhile. Last, so it overlaps nothing timed; the server stops with it still running.
        driver.step = "UMAP opened by URL in a second tab"
        tab = driver.page.context.new_page()
        try:
            opened = time.perf_counter()
            tab.goto(f"{driver.url}/{map_page.url_path}?rank={new_rank}&map=umap", wait_until="commit")
            samples.flag("app_umap_pca_first", wait_for_first_figure(tab, APP_TIMEOUT_MS))
            samples.add("app_umap_url_first_map_s", time.perf_counter() - opened)
        finally:
            tab.close()
    facts["exceptions"] = driver.exceptions()
    return facts


def _failure_evidence(page: Any) -> dict[str, Any]:
    """Why a run failed, as far as the page tells: its state (:func:`embviz.browser.page_state`) and a
    screenshot kept in a new temporary folder (its path)."""
    from embviz.browser import page_state

    evidence: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # a closed or crashed page: the error message is all there is
        evidence["page_state"] = page_state(page)
    with contextlib.suppress(Exception):
        shot = Path(tempfile.mkdtemp(prefix="embviz-bench-app-failure-")) / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        evidence["screenshot"] = str(shot)
    return evidence


def _app_runs(context: BenchContext, pages: Sequence[Any], source: Path, new_rank: int) -> AppSamples:
    """``heavy_repeats`` runs, each on its own seeded home and freshly started server, one Chromium."""
    from playwright.sync_api import sync_playwright

    from embviz.browser import install_run_counter, launch_options, serve_app

    settings, samples = context.settings, AppSamples()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(**launch_options())
        try:
            for run in range(settings.heavy_repeats):
                context.say(
                    f"app run {run + 1}/{settings.heavy_repeats}: seeding a cache, starting the server"
                )
                load_before = load_average()
                with (
                    seeded_home(source, new_rank) as home,
                    serve_app(settings.model, home, home / "streamlit.log", python=settings.python) as url,
                ):
                    browser_context = chromium.new_context(viewport=APP_VIEWPORT)  # type: ignore[arg-type]
                    driver = AppDriver(browser_context.new_page(), url, settings.rank, samples)
                    try:
                        install_run_counter(driver.page)
                        facts = _app_run(driver, pages, new_rank)
                    except Exception as error:  # keep the other runs; the stage reports the failure
                        facts = {"error": f"{type(error).__name__}: {str(error)[:500]}", "step": driver.step}
                        samples.failures.append(f"run {run + 1}, {driver.step}: {facts['error']}")
                        facts.update(_failure_evidence(driver.page))
                        log = home / "streamlit.log"
                        if log.exists():
                            facts["server_log_tail"] = log.read_text(errors="replace")[-1500:]
                    finally:
                        browser_context.close()
                facts.update(run=run + 1, load_average_before=load_before, load_average_after=load_average())
                samples.runs.append(facts)
                done = {k: round(v[-1], 2) for k, v in samples.seconds.items() if len(v) == run + 1}
                context.say(f"app run {run + 1}: {json.dumps(done)}")
        finally:
            samples.chromium = chromium.version
            chromium.close()
    return samples


def app_scenarios(
    report: Report, pages: Sequence[str], default_page: str | None = None
) -> dict[str, dict[str, Any]]:
    """The browser figures by scenario and page: samples, median, target and whether it is met.

    ``default_page`` is the page at ``/``, whose first visit is the server's first (``app_first_visit_s``).
    """
    targets = {t.figure: t for t in (*APP_TARGETS, *(app_page_target(page) for page in pages))}
    verdicts = evaluate_targets(report.figures, tuple(targets.values()))

    def entry(figure: str) -> dict[str, Any]:
        found: dict[str, Any] = {
            "figure": figure,
            "samples": report.samples.get(figure),
            "median_s": report.figures.get(figure),
        }
        if figure in verdicts:
            found.update(target=verdicts[figure]["target"], met=verdicts[figure]["met"])
        return found

    return {
        "warm": {page: entry(f"app_warm_{page}_s") for page in pages},
        "first_visit": {
            page: entry(_first_visit_figure(page, "" if page == default_page else page)) for page in pages
        },
        "predictions": {"predictions": entry("app_predictions_s")},
        "fresh_rank": {"neighbours": entry("app_new_rank_s")},
        # Not targets: when Neighbours first shows recall (a sampled estimate while the exact tables run).
        "first_recall_answer": {
            "fresh_variants": entry("app_neighbours_fresh_variants_first_answer_s"),
            "new_rank": entry("app_new_rank_first_answer_s"),
        },
        "umap_cold": {"map": entry("app_umap_cold_s")},
        "umap_pca_first": {"map": entry("app_umap_first_map_s")},
        # Not a target: the same map opened by URL in a second tab while UMAP runs (a fresh document).
        "umap_pca_first_by_url": {"map": entry("app_umap_url_first_map_s")},
    }


def _seed_source_home(context: BenchContext, k: int) -> float:
    """Make sure the cache holds what a home used with this embviz at the benchmark's rank has (seconds
    taken): what the app computes once per model (the original's neighbour table as the app searches it, the
    corpus counts behind the Neighbours page's frequency bands), the app's default variants at that rank, and
    the rank-independent Gram matrices their fits keep (:func:`embviz.compressors.svd.cached_gram_matrix`;
    each variant is fitted again, unsaved, so an artifact made before that cache existed leaves them too)."""
    from embviz.cache import matrix_fingerprint
    from embviz.metrics import corpus_frequencies, neighbour_table_cached
    from embviz.projections import shared_table_width

    backbone = context.backbone
    started = time.perf_counter()
    fingerprint = matrix_fingerprint(backbone.embedding)
    neighbour_table_cached(backbone.name, fingerprint, backbone.embedding, shared_table_width(k))
    corpus_frequencies(backbone.tokenizer, backbone.tokens)  # the bands' default corpus slice
    context.variants  # noqa: B018 -- the artifacts, fitted and saved when missing
    for name, compressor in context.default_compressors().items():
        if context.variant_sources[name] != "fitted now":  # a fit just now left its Gram matrices already
            compressor.fit(backbone.embedding)
    return round(time.perf_counter() - started, 2)


def stage_app(context: BenchContext, report: Report) -> None:
    """The app in headless Chromium: time to a finished page for every page, a new rank and a cold UMAP."""
    from concurrent.futures import ThreadPoolExecutor

    from embviz.browser import app_pages, chromium_path
    from embviz.cache import embviz_home
    from embviz.threads import APP, THREADS_ENV, choose_threads

    settings = context.settings
    if not Path(chromium_path()).exists():
        raise RuntimeError(f"{chromium_path()} is missing: run `scripts/setup.sh --browser`")
    pages = app_pages(settings.python)
    source = embviz_home()
    seeding_seconds = _seed_source_home(context, K)  # the app's default k, 10
    new_rank = fresh_rank(source, settings.rank)
    context.say(f"app: {len(pages)} pages, rank {settings.rank}, fresh rank {new_rank}, cache {source}")
    # Playwright's sync API refuses to start inside a running event loop (pytest-playwright's); a thread has none.
    with ThreadPoolExecutor(1) as pool:
        samples = pool.submit(_app_runs, context, pages, source, new_rank).result()
    for name, values in samples.seconds.items():
        report.record(name, values)
    for name, answers in samples.flags.items():
        report.set(name, all(answers))
    names = [page.name for page in pages]
    report.detail(
        "app",
        pages={page.name: f"/{page.url_path}" for page in pages},
        rank=settings.rank,
        fresh_rank=new_rank,
        runs=samples.runs,
        scenarios=app_scenarios(report, names, next(page.name for page in pages if page.url_path == "")),
        chromium=samples.chromium,
        threads_policy=APP,
        server_torch_threads=choose_threads(APP),
        threads_env=os.environ.get(THREADS_ENV),
        seeded_from=str(source),
        seeding_seconds=seeding_seconds,
        seeded_home="a new EMBVIZ_HOME per run, hard links to the cache above less its maps, the app's "
        "variant neighbour tables and artifacts at the fresh rank; what a home used at the benchmark's rank "
        "holds is kept (the original's neighbour table, as wide as UMAP needs, the corpus counts of the "
        "frequency bands, the default variants and their fits' rank-independent Gram matrices); one freshly "
        "started `streamlit run app.py` per run",
        browser="Debian Chromium, headless, SwiftShader WebGL, one browser context per run, viewport "
        f"{APP_VIEWPORT['width']}x{APP_VIEWPORT['height']}",
        finished="embviz.browser.wait_until_finished: heading drawn, script state notRunning, no spinner, "
        "skeleton or running-status icon, every Plotly figure's .main-svg drawn (as tests/e2e waits)",
        first_visit="page.goto(url) to finished; the default page first (backbone and variants load there), "
        "then every other page once: Neighbours computes both variants' tables (the original's is cached)",
        warm="a click on the page's sidebar link (in-app navigation, no reload) to finished, after every "
        "page was visited once on this server",
        predictions=f"on Predictions, the sentence box filled with {SENTENCE!r}, Enter to finished",
        new_rank=f"on Neighbours (rank {settings.rank}, warm), the rank box set to {new_rank}, Enter to a "
        "finished Neighbours page with both variants; the AE's train button is clicked whenever shown "
        "(app_new_rank_train_clicked says whether it was)",
        umap="on the Map page (PCA, cached), a click on the Projection radio's umap option (no map in the "
        "seeded cache): app_umap_first_map_s to the PCA figure drawn beside the UMAP job's progress bar, "
        "app_umap_cold_s to the finished UMAP page; then /map?map=umap at the fresh rank (no map yet) opened "
        "in a second tab: app_umap_url_first_map_s to its first drawn figure (a fresh document: Streamlit's "
        "bundle, plotly.js, a new session, PCA computed), app_umap_pca_first whether UMAP still ran then",
    )
    if samples.failures:
        raise RuntimeError("; ".join(samples.failures))


# -- scale: synthetic matrices of today's shapes -----------------------------------------------------------
SCALE_CHILD = (
    "import json, resource, sys, time\n"
    "from pathlib import Path\n"
    "import numpy as np, torch\n"
    "from embviz.scaling import run_stage\n"
    "from embviz.threads import configure_threads\n"
    "configure_threads('all')\n"
    "def _rss():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1]) / 1024\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
    "_before = _rss()\n"
    "matrix = torch.from_numpy(np.load(sys.argv[2]))\n"
    "_loaded = _rss()\n"
    "found = run_stage(sys.argv[1], matrix, Path(sys.argv[3]))\n"
    "print(json.dumps({**found, 'baseline_rss_mb': _before, 'loaded_rss_mb': _loaded, 'peak_rss_mb': _rss()}))\n"
)
"""Child script: load the matrix (``argv[2]``), run one scale stage, print its result and the process's
peak resident set size before loading, after loading and at the end (``VmHWM``, this process's own
high-water mark: ``ru_maxrss`` would carry the parent's over ``fork``/``exec``)."""

SCALE_TARGET_SHAPE = (128_000, 2048)
SCALE_BOUNDED_SHAPE = (256_000, 4096)


def scale_figure(stage: str, vocab: int, hidden: int, what: str = "s") -> str:
    """``scale_svd_128000x2048_s`` (or ``_peak_mb``)."""
    return f"scale_{stage}_{vocab}x{hidden}_{what}"


def _recall_vs_limit(point: Mapping[str, Any]) -> float:
    """The recall stage's time over its limit: 120 s exact, 30 s approximate at recall >= 0.99 (inf below)."""
    seconds = float(point["seconds"])
    if point.get("search") == "exact":
        return seconds / 120.0
    return seconds / 30.0 if float(point.get("search_recall", 0.0)) >= 0.99 else math.inf


SCALE_TARGETS: tuple[Target, ...] = (
    Target("128k x 2048: exact SVD", scale_figure("svd", *SCALE_TARGET_SHAPE), "<=", 60.0),
    Target("128k x 2048: fast AE", scale_figure("ae", *SCALE_TARGET_SHAPE), "<=", 300.0),
    Target(
        "128k x 2048: recall@10 of one variant (exact <= 120 s, or approximate <= 30 s at recall >= 0.99)",
        "scale_recall_128000x2048_vs_limit",
        "<=",
        1.0,
        unit="x of its limit",
    ),
    Target(
        "256k x 4096: every stage within 16 GB peak or refused up front",
        "scale_256000x4096_bounded",
        ">=",
        1.0,
        unit="",
    ),
)


def _scale_run(settings: BenchSettings, stage: str, matrix_path: Path, work: Path) -> dict[str, Any]:
    """One scale stage in a fresh interpreter, killed after twice the limit (plus a minute)."""
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [settings.python, "-c", SCALE_CHILD, stage, str(matrix_path), str(work)],
            capture_output=True,
            text=True,
            check=False,
            timeout=2 * settings.scale_limit_s + 60,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "reason": f"killed after {2 * settings.scale_limit_s + 60:.0f} s"}
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "reason": f"exit {done.returncode}: {tail}"}
    return {"status": "measured", "process_s": elapsed, **json.loads(done.stdout.strip().splitlines()[-1])}


def _scale_unreachable(stage: str, vocab: int, hidden: int) -> str | None:
    """Why a stage cannot run at this shape at all (direction VQ's 1-bit budget on a small matrix), or None."""
    if stage != "vq":
        return None
    from embviz.compressors import UnreachableBudget, get_method
    from embviz.scaling import VQ_BITS

    try:
        get_method("vq-direction").size(vocab, hidden, bits=VQ_BITS)
    except UnreachableBudget as exc:
        return str(exc)
    return None


def read_scale_points(path: Path) -> dict[tuple[int, int], dict[str, dict[str, Any]]]:
    """The points an earlier (perhaps interrupted) run appended to ``path``, by shape and stage; the last
    point of a stage at a shape wins. A missing file is an empty grid; a torn last line is ignored."""
    kept: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    if not path.exists():
        return kept
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            point = json.loads(line)
            kept.setdefault((int(point["vocab"]), int(point["hidden"])), {})[str(point["stage"])] = point
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return kept


def append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append whole lines to ``path``, starting a new line first if a crash left the last one torn."""
    torn = False
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as existing:
            existing.seek(-1, os.SEEK_END)
            torn = existing.read(1) != b"\n"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(("\n" if torn else "") + "".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())


def _record_scale_point(report: Report, point: Mapping[str, Any]) -> None:
    """A measured point's seconds and peak memory as report figures (and the recall target's ratio)."""
    if point["status"] != "measured":
        return
    stage, vocab, hidden = point["stage"], point["vocab"], point["hidden"]
    report.set(scale_figure(stage, vocab, hidden), point["seconds"])
    report.set(scale_figure(stage, vocab, hidden, "peak_mb"), point["peak_rss_mb"], digits=0)
    if (vocab, hidden) == SCALE_TARGET_SHAPE and stage == "recall":
        report.set("scale_recall_128000x2048_vs_limit", _recall_vs_limit(point))


def _record_scale_bound(
    report: Report, points: Sequence[Mapping[str, Any]], vocab: int, hidden: int, budget: int
) -> None:
    """At 256k x 4096: whether every stage stayed within the memory budget or was refused up front."""
    if (vocab, hidden) != SCALE_BOUNDED_SHAPE:
        return
    at_shape = [p for p in points if (p["vocab"], p["hidden"]) == (vocab, hidden)]
    report.set(
        "scale_256000x4096_bounded",
        all(
            p["status"] == "refused" or (p["status"] == "measured" and p["peak_rss_mb"] * 2**20 <= budget)
            for p in at_shape
        ),
    )


def stage_scale(context: BenchContext, report: Report) -> None:
    """Time and peak memory of each scale stage on synthetic matrices of each shape (V ascending per D), each
    in its own process; a stage predicted to exceed the memory budget is refused, one predicted (from its
    measured growth at smaller V) or found to exceed the time limit is skipped, both with the reason."""
    import numpy as np

    from embviz.resources import available_memory, format_bytes
    from embviz.scaling import (
        MEMORY_BUDGET,
        SpectrumProfile,
        growth_exponents,
        predict_seconds,
        stage_memory,
        synthetic_embedding,
    )
    from embviz.threads import choose_threads

    settings = context.settings
    profile = SpectrumProfile.from_matrix(context.backbone.embedding, settings.model)
    threads = choose_threads("all")  # what each stage's process sets (configure_threads("all"))
    points: list[dict[str, Any]] = []
    budget = MEMORY_BUDGET
    available = available_memory()
    saved = read_scale_points(settings.scale_points) if settings.scale_points is not None else {}
    root = Path(tempfile.mkdtemp(prefix="embviz-scale-"))
    try:
        for hidden in sorted(settings.scale_hiddens):
            for vocab in sorted(settings.scale_vocabs):
                shape = f"{vocab:,} x {hidden:,}"
                kept = saved.get((vocab, hidden), {})
                if all(stage in kept for stage in settings.scale_stages):
                    context.say(f"scale {shape}: reusing the points in {settings.scale_points}")
                    for stage in settings.scale_stages:
                        points.append(kept[stage])
                        _record_scale_point(report, kept[stage])
                    _record_scale_bound(report, points, vocab, hidden, budget)
                    continue
                matrix_bytes = 4 * vocab * hidden
                baseline = 2**30  # python, torch, faiss and umap imported: measured 990 MiB
                work = root / f"{vocab}x{hidden}"
                work.mkdir()
                matrix_path = work / "matrix.npy"
                generated = False
                for stage in settings.scale_stages:
                    point: dict[str, Any] = {"stage": stage, "vocab": vocab, "hidden": hidden}
                    predicted = baseline + matrix_bytes + stage_memory(stage, vocab, hidden)
                    point["predicted_peak_mb"] = round(predicted / 2**20)
                    needs = {"recall": ("svd_codes.npy", "original_neighbours.npy"), "pca": ("svd_codes.npy",),
                             "umap": ("original_neighbours.npy",)}.get(stage, ())  # fmt: skip
                    missing = [name for name in needs if not (work / name).exists()]
                    expected = predict_seconds(points, stage, vocab, hidden)
                    if predicted > budget or (available is not None and predicted > available):
                        limit = (
                            "the 16 GB budget"
                            if predicted > budget
                            else f"{format_bytes(available or 0)} free"
                        )
                        point.update(
                            status="refused", reason=f"needs about {format_bytes(predicted)}, over {limit}"
                        )
                    elif (unreachable := _scale_unreachable(stage, vocab, hidden)) is not None:
                        point.update(status="skipped", reason=unreachable)
                    elif missing:
                        point.update(
                            status="skipped", reason=f"needs the earlier stages' {', '.join(missing)}"
                        )
                    elif expected is not None and expected > settings.scale_limit_s:
                        point.update(
                            status="skipped",
                            reason=f"predicted {expected:,.0f} s from its growth at smaller V, over the "
                            f"{settings.scale_limit_s:g} s limit",
                            predicted_s=round(expected),
                        )
                    else:
                        if not generated:
                            context.say(f"scale {shape}: generating the synthetic matrix")
                            np.save(matrix_path, synthetic_embedding(vocab, hidden, profile).numpy())
                            generated = True
                        context.say(f"scale {shape}: {stage} (predicted peak {format_bytes(predicted)})")
                        point.update(_scale_run(settings, stage, matrix_path, work))
                        if point["status"] == "measured" and point["seconds"] > settings.scale_limit_s:
                            point["over_limit"] = True
                    context.say(
                        f"scale {shape}: {stage} {point['status']}"
                        + (f" in {point['seconds']:.1f} s, peak {point['peak_rss_mb']:.0f} MiB"
                           if point["status"] == "measured" else f" ({point.get('reason')})")
                    )  # fmt: skip
                    points.append(point)
                    _record_scale_point(report, point)
                shutil.rmtree(work, ignore_errors=True)
                _record_scale_bound(report, points, vocab, hidden, budget)
                if settings.scale_points is not None:
                    at_shape = [p for p in points if (p["vocab"], p["hidden"]) == (vocab, hidden)]
                    append_lines(settings.scale_points, [json.dumps(p) for p in at_shape])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report.detail(
        "scale",
        points=points,
        growth=growth_exponents(points),
        profile=profile.describe(),
        memory_budget_bytes=budget,
        available_memory_bytes=available,
        limit_s=settings.scale_limit_s,
        threads=threads,
        stages={
            "svd": "exact truncated SVD (float64 Gram matrix, eigh) at rank D/8",
            "ae": "the paper-loss AE, fast recipe (6 epochs from the SVD warm start), rank D/8",
            "vq": "direction VQ sized to 1 bit per weight, uniform row weights",
            "neighbours": "the original's full-vocabulary top-14 table (recall@10 and UMAP read it; exact where "
            "affordable, else faiss PCA + exact re-rank with its recall against exact measured on 1,024 tokens)",
            "recall": "recall@10 of the SVD variant: its table through its D/8+1 factor columns, against the "
            "original's (from the neighbours stage, as the app caches it)",
            "pca": "PCA map of the original and the SVD variant",
            "umap": "full-vocabulary UMAP of the original rows on the neighbours stage's table",
        },
        synthetic="rows z diag(s) R: Gaussian z, the packaged matrix's singular values interpolated to D, a "
        "random orthogonal rotation, row norms resampled from the packaged matrix (embviz.scaling)",
        peak="VmHWM of the stage's own process (its peak resident set): imports, the matrix and the stage",
    )


# -- cluster: a sweep on local Ray against the serial sweep ----------------------------------------------
CLUSTER_CHILD = (
    "import json, sys, time\n"
    "from embviz.evaluation import sweep\n"
    "from embviz.sources import load_model\n"
    "from embviz.threads import configure_threads\n"
    "mode, model, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
    "methods, settings = json.loads(sys.argv[4]), json.loads(sys.argv[5])\n"
    "threads = configure_threads('all')\n"
    "cluster, failures = None, []\n"
    "started = time.perf_counter()\n"
    "if mode == 'ray':\n"
    "    from embviz.cluster import ray_sweep\n"
    "    result = ray_sweep(model, methods, workers=workers, **settings)\n"
    "    rows, cluster = result.rows, result.cluster\n"
    "    failures = [failure.to_dict() for failure in result.failures]\n"
    "else:\n"
    "    rows = sweep(load_model(model), methods, **settings)\n"
    "seconds = time.perf_counter() - started\n"
    "print(json.dumps({'seconds': seconds, 'threads': threads, 'cluster': cluster, 'failures': failures,\n"
    "                  'rows': [row.to_dict() for row in rows]}))\n"
)
"""Child script: one sweep (``argv[1]``: ``serial``, or ``ray`` for ``ray_sweep`` on a local cluster of
``argv[3]`` slots), timed from before the backbone loads (serial) or before ``ray_sweep`` is called (Ray:
importing Ray, the driver's load, the cluster's start, every task and the shutdown) to the last row; prints
the seconds, the driver's torch threads, the cluster's facts, any failed tasks and the rows."""

CLUSTER_TIMEOUT_S = 3 * 3600
CLUSTER_VARYING = ("seconds", "train_seconds", "cached", "artifact")
"""Row columns that differ between equal sweeps: timings, whether the shared cache already held an entry
(Ray tasks share one) and where an artifact was written (each run has its own cache)."""


def _cluster_unassessable(figures: Mapping[str, Any]) -> str | None:
    jobs, workers = figures.get("cluster_jobs"), figures.get("cluster_workers")
    if jobs is not None and workers is not None and (jobs, workers) != (12, 2):
        return f"the sweep had {jobs} jobs on {workers} workers, not the target's 12 on 2"
    return None


CLUSTER_TARGETS: tuple[Target, ...] = (
    Target(
        "12-variant sweep on local Ray, 2 workers: faster than serial, identical rows",
        "cluster_speedup",
        ">=",
        1.7,
        unit="x",
        requires=("cluster_rows_identical",),
        unassessable=_cluster_unassessable,
    ),
)
"""The Ray target (stage ``cluster``): serial seconds over Ray seconds, both cold, with the Ray rows equal
to the serial sweep's at the tasks' thread count."""


def _same(left: Any, right: Any) -> bool:
    """Equal, NaN equal to NaN."""
    if isinstance(left, float) and isinstance(right, float) and math.isnan(left) and math.isnan(right):
        return True
    return bool(left == right)


def _relative_difference(left: float, right: float) -> float:
    """``|left - right|`` over the larger magnitude (0 when equal, inf against a NaN)."""
    if _same(left, right):
        return 0.0
    if math.isnan(left) or math.isnan(right):
        return math.inf
    return abs(left - right) / max(abs(left), abs(right))


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare_rows(
    left: Sequence[Mapping[str, Any]],
    right: Sequence[Mapping[str, Any]],
    ignore: Sequence[str] = CLUSTER_VARYING,
) -> dict[str, Any]:
    """Whether two sweeps gave the same rows (every column but ``ignore``, in order), and where not: the
    largest relative difference of each numeric column that differs and the other columns that differ."""
    differences: dict[str, float] = {}
    other: set[str] = set()
    for a, b in zip(left, right, strict=False):
        for column in dict.fromkeys([*a, *b]):
            if column in ignore or _same(a.get(column), b.get(column)):
                continue
            if _numeric(a.get(column)) and _numeric(b.get(column)):
                gap = _relative_difference(float(a[column]), float(b[column]))
                differences[column] = max(differences.get(column, 0.0), gap)
            else:
                other.add(column)
    return {
        "identical": len(left) == len(right) and not differences and not other,
        "rows": [len(left), len(right)],
        "max_relative_difference": {column: float(f"{gap:.3g}") for column, gap in differences.items()},
        "other_differing_columns": sorted(other),
        "ignored_columns": list(ignore),
    }


def _variant_name(job: Any) -> str:
    """``svd r=142 (4x)``; a fixed-size method: ``quant-int4 (7.94x, its own size)``."""
    rank = job.compressor.get_config().get("rank")
    if rank is not None:
        return f"{job.method} r={rank} ({job.target_ratio:g}x)"
    return f"{job.method} ({job.target_ratio:.3g}x, its own size)"


def _cluster_run(settings: BenchSettings, mode: str, home: Path, threads: int | None) -> dict[str, Any]:
    """One sweep of ``settings.cluster_sweep`` in a fresh interpreter on ``home``; ``threads`` sets its torch
    (and faiss / numba) threads, None leaves them to ``configure_threads`` and ``ray_sweep`` (the driver
    every usable core, each task its share)."""
    from embviz.cache import HOME_ENV
    from embviz.threads import OTHER_RUNTIMES, THREADS_ENV

    spec = settings.cluster_sweep
    env = {**os.environ, HOME_ENV: str(home)}
    for variable in (THREADS_ENV, *OTHER_RUNTIMES):
        env.pop(variable, None)
        if threads is not None:
            env[variable] = str(threads)
    args = [
        mode,
        settings.model,
        str(spec.workers),
        json.dumps(list(spec.methods)),
        json.dumps(spec.sweep_settings()),
    ]
    started = time.perf_counter()
    done = subprocess.run(
        [settings.python, "-c", CLUSTER_CHILD, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=CLUSTER_TIMEOUT_S,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the {mode} sweep failed ({done.returncode}): {tail}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"the {mode} sweep printed no result: {done.stdout.strip()[-300:]!r}")
    return {**json.loads(lines[-1]), "process_s": elapsed}


def stage_cluster(context: BenchContext, report: Report) -> None:
    """The same sweep three ways, each cold in its own process: serially at every usable core, serially at
    the Ray tasks' thread count, and on a local Ray cluster; the speed-up and whether the rows are equal."""
    from embviz.cache import embviz_home
    from embviz.evaluation import plan_sweep
    from embviz.threads import usable_cores, worker_threads

    settings, spec = context.settings, context.settings.cluster_sweep
    if _version("ray") is None:
        raise RuntimeError("the cluster stage needs Ray: pip install 'embviz[ray]'")
    # The parent's load converts the backbone into the user's cache once (each cold home links to it) and
    # puts its files in the page cache, so no run pays for the first read from disk.
    plan = plan_sweep(context.backbone, spec.methods, spec.ratios, None, spec.recipe)
    variants = [_variant_name(job) for job in plan]
    cores = usable_cores()
    serial_threads, task_threads = cores, worker_threads(spec.workers, cores)
    kinds: list[tuple[str, str, int | None]] = [("serial", "serial", serial_threads)]
    if task_threads != serial_threads:
        kinds.append(("serial_equal_threads", "serial", task_threads))
    kinds.append(("ray", "ray", None))
    source = embviz_home()
    found: dict[str, list[dict[str, Any]]] = {kind: [] for kind, _, _ in kinds}
    runs: list[dict[str, Any]] = []
    for repeat in range(settings.cluster_repeats):
        for kind, mode, threads in kinds:
            context.say(
                f"cluster run {repeat + 1}/{settings.cluster_repeats}: {kind} sweep of {len(plan)} variants "
                f"(cold cache, load average {load_average()})"
            )
            load_before = load_average()
            with seeded_home(source, folders=("backbones",), prefix="embviz-bench-cluster-") as home:
                result = _cluster_run(settings, mode, home, threads)
            found[kind].append(result)
            runs.append(
                {
                    "run": repeat + 1,
                    "kind": kind,
                    "seconds": rounded(result["seconds"]),
                    "process_s": rounded(result["process_s"]),
                    "torch_threads": result["threads"] if mode == "serial" else None,
                    "load_average_before": load_before,
                    "load_average_after": load_average(),
                }
            )
            context.say(f"cluster {kind}: {result['seconds']:.1f} s")
    if "serial_equal_threads" not in found:  # one thread count for both: the serial run is the fair one
        found["serial_equal_threads"] = found["serial"]
    for kind, results in found.items():
        report.record(f"cluster_{kind}_s", [r["seconds"] for r in results])
        report.record(f"cluster_{kind}_process_s", [r["process_s"] for r in results])
    ray_s = report.figures["cluster_ray_s"]
    report.set("cluster_speedup", report.figures["cluster_serial_s"] / ray_s)
    report.set("cluster_speedup_equal_threads", report.figures["cluster_serial_equal_threads_s"] / ray_s)
    equal = [
        compare_rows(s["rows"], r["rows"])
        for s, r in zip(found["serial_equal_threads"], found["ray"], strict=True)
    ]
    all_cores = [
        compare_rows(s["rows"], r["rows"]) for s, r in zip(found["serial"], found["ray"], strict=True)
    ]
    failures = [failure for r in found["ray"] for failure in r["failures"]]
    report.set("cluster_rows_identical", not failures and all(c["identical"] for c in equal))
    report.set("cluster_rows_identical_all_cores", not failures and all(c["identical"] for c in all_cores))
    report.set("cluster_jobs", len(plan))
    report.set("cluster_workers", spec.workers)
    report.detail(
        "cluster",
        model=settings.model,
        variants=variants,
        jobs=len(plan),
        rows="the uncompressed row and one per variant, each with perplexity, KL divergence and top-1 agreement "
        f"on {spec.max_tokens} tokens of {spec.text!r}, recall@{spec.k} over the full vocabulary, angles",
        serial_command=spec.command(settings.model, ray=False),
        ray_command=spec.command(settings.model, ray=True),
        repeats=settings.cluster_repeats,
        workers=spec.workers,
        serial_torch_threads=serial_threads,
        task_torch_threads=task_threads,
        cluster=found["ray"][-1]["cluster"],
        runs=runs,
        failures=failures,
        rows_vs_serial_equal_threads=equal[-1],
        rows_vs_serial_all_cores=all_cores[-1],
        cold_cache="every run in a fresh temporary EMBVIZ_HOME holding only hard links to the converted backbone "
        "(no artifact, neighbour table, perplexity or row weights cached); Ray's tasks share that run's home",
        serial="embviz.evaluation.sweep in a fresh process at every usable core (EMBVIZ_THREADS, OMP and numba "
        "threads set for it), timed from before load_model to the last row",
        serial_equal_threads="the same serial sweep at the Ray tasks' torch thread count: the fair comparison "
        "for identical rows (floating-point sums differ between thread counts); when that count is every "
        "usable core, the serial run itself",
        ray=f"embviz.cluster.ray_sweep(..., workers={spec.workers}) in a fresh process: a local Ray cluster of "
        f"{spec.workers} slots at {task_threads} torch thread(s) per task (the driver at every usable core); "
        "timed from the call, so importing Ray, the driver's backbone load and plan, the cluster's start, "
        "each worker's backbone load and the shutdown are all included",
        process="wall time of each subprocess measured from outside (interpreter start and imports included)",
        speedup="cluster_serial_s / cluster_ray_s (medians); cluster_speedup_equal_threads uses the serial run "
        "at the tasks' thread count",
        identical=f"cluster_rows_identical: the Ray rows equal the equal-thread serial rows in every column but "
        f"{', '.join(CLUSTER_VARYING)}, in plan order, and no task failed; cluster_rows_identical_all_cores: "
        "the same against the serial run at every usable core (max relative differences per column in "
        "rows_vs_serial_*)",
    )
    if failures:
        raise RuntimeError(
            "Ray tasks failed: " + "; ".join(f"{f['variant']}: {f['error']}" for f in failures)
        )


Stage = Callable[[BenchContext, Report], None]
STAGES: dict[str, Stage] = {
    "load": stage_load,
    "ae": stage_ae,
    "fits": stage_fits,
    "knn": stage_knn,
    "maps": stage_maps,
    "latency": stage_latency,
    "memory": stage_memory,
    "app": stage_app,
    "scale": stage_scale,
    "cluster": stage_cluster,
}
OPT_IN_STAGES: tuple[str, ...] = ("app", "scale", "cluster")
"""Stages run only when named: ``app`` needs Chromium and takes minutes per run (``--stages app``,
``make bench-app``); ``scale`` takes hours at every shape (``--stages scale``, narrowed with
``--scale-vocabs`` / ``--scale-hiddens``); ``cluster`` needs Ray and runs three cold sweeps of 12 variants
(``--stages cluster``); ``embviz bench`` / ``make bench`` without ``--stages`` run every engine stage."""


def default_stages() -> list[str]:
    """The stages run without ``--stages``: every registered stage but :data:`OPT_IN_STAGES`, in order."""
    return [name for name in STAGES if name not in OPT_IN_STAGES]


# -- running -------------------------------------------------------------------------------------------
def run_bench(
    settings: BenchSettings,
    stages: Sequence[str] | None = None,
    *,
    command: str = "embviz bench --json",
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Run the named stages (default: :func:`default_stages`, in order) and return the JSON-ready report.

    A stage that fails is recorded under ``errors`` and the others still run; its targets are then
    reported as not measured. ``progress`` counts stages; its messages say what is being measured.
    """
    names = list(stages or default_stages())
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        from embviz.errors import BadInputError

        raise BadInputError(f"unknown bench stage {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    started = time.perf_counter()
    machine = machine_facts()
    context, report = BenchContext(settings, progress), Report()
    context.stages = len(names)
    children = resource.RUSAGE_CHILDREN
    for index, name in enumerate(names):
        context.stage = index
        context.say(f"stage {name} (load average {load_average()})")
        stage_started, cpu_started = time.perf_counter(), time.process_time()
        child_cpu = _cpu_seconds(resource.getrusage(children))
        load_before = load_average()
        try:
            STAGES[name](context, report)
        except Exception as error:  # a benchmark reports a broken stage and goes on with the others
            report.errors[name] = f"{type(error).__name__}: {error}"
            context.say(f"stage {name} failed: {report.errors[name]}")
        report.detail(
            name,
            wall_s=time.perf_counter() - stage_started,
            cpu_s=time.process_time() - cpu_started + _cpu_seconds(resource.getrusage(children)) - child_cpu,
            load_average_before=load_before,
            load_average_after=load_average(),
        )
    context.stage = len(names)
    context.say(f"{len(names)} stages done, {len(report.errors)} failed")
    if getattr(context, "variant_sources", None):
        report.notes.append(f"shared variants (rank {settings.rank}): {context.variant_sources}")
    if settings.quick:
        report.notes.append(
            f"--quick: {settings.repeats} runs of cheap figures and {settings.heavy_repeats} of costly ones; "
            f"the paper recipe trains {settings.paper_epochs} epochs; UMAP on a sample of "
            f"{settings.umap_sample} tokens. Use the full run for the README."
        )
    machine["load_average_end"] = load_average()
    return {
        "benchmark": "embviz bench",
        "command": command,
        "mode": "quick" if settings.quick else "full",
        "backbone": settings.model,
        "rank": settings.rank,
        "stages": names,
        "repeats": {"cheap": settings.repeats, "costly": settings.heavy_repeats},
        "machine": machine,
        "figures": report.figures,
        "runs": report.runs,
        "samples": report.samples,
        "targets": evaluate_targets(report.figures, targets_for(report.figures, names)),
        "compare": compare_block(report.figures, command),
        "details": report.details,
        "notes": report.notes,
        "errors": report.errors,
        "seconds": rounded(time.perf_counter() - started),
    }


def _cpu_seconds(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def render(result: Mapping[str, Any]) -> str:
    """The report as text: targets (met / missed), then every figure with its run count."""
    mark = {True: "met", False: "MISSED", None: "n/a"}
    lines = [f"embviz bench ({result['mode']}) on {result['backbone']}, {result['machine'].get('cpu_model')}"]
    lines.append("")
    for verdict in result["targets"].values():
        note = f"  ({verdict['note']})" if verdict.get("note") else ""
        lines.append(
            f"{mark[verdict['met']]:>6}  {verdict['target']:<48} measured {verdict['measured']}{note}"
        )
    lines.append("")
    width = max((len(name) for name in result["figures"]), default=0)
    for name, value in result["figures"].items():
        runs = result["runs"].get(name)
        lines.append(f"{name:<{width}}  {value}" + (f"  (median of {runs})" if runs else ""))
    if result.get("compare"):
        lines += ["", result["compare"]["statement"]]
    lines += ["", *result["notes"], *(f"error in {k}: {v}" for k, v in result["errors"].items())]
    return "\n".join(lines).rstrip()
