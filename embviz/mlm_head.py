"""Fit a masked-LM head (and the encoder under it) for a BERT-family encoder that has no trained one.

``minilm`` (all-MiniLM-L6-v2) is a sentence encoder: the ``BertForMaskedLM`` head a loader puts on it is
random, so its fill-mask output is noise. :func:`fit_mlm_head` trains one on the ``train`` slices of a
weighted mixture of corpora (:mod:`embviz.corpora`: the classics, generated everyday English and Python's
documentation; ``valid`` / ``test`` are never seen) and writes a Hugging Face folder (safetensors only,
tokenizer, ``embviz-mlm.json`` manifest) into embviz's cache, atomically. The built-in backbone
``minilm-mlm`` loads that folder; embviz ships the default fit (:func:`package_head`), which
:func:`install_packaged` turns into that folder in seconds, so nobody has to refit it.

What is trained, and what is not:

* **Trained:** the head (``cls.predictions``: transform dense + GELU + LayerNorm, and the output bias) and
  the top ``train_layers`` encoder layers (default: all six). A head alone on the frozen encoder's last
  layer reaches only about 18% top-1 on held-out Bible text (the sentence-embedding training has washed the
  token identities out of it), far from the 40% target, so the encoder is fine-tuned too.
* **Frozen:** the whole embedding block -- above all the word-embedding matrix E, which is also the
  decoder's (tied) weight. E is exactly what embviz compresses, so the compression protocol stays the
  paper's: the compressed variants replace the same E the head was fitted on.

Masking is BERT's whole-word masking (80% mask / 10% random / 10% kept), the same code as the perplexity
protocol (:mod:`embviz.masking`) but selecting 25% of the tokens instead of 15% (:data:`TRAIN_MASK_RATE`;
held-out scores keep the protocol's 15%), drawn afresh for every step from a generator seeded by
``(seed, step, row)``. The output bias starts at the training mixture's log unigram frequencies. Batches
are fixed length-bucketed groups of lines, visited in a seeded order per epoch; the learning rate is a function of the step; dropout is off. A run is therefore a deterministic
function of ``(source, seed, steps)`` and resumes exactly from a checkpoint (model, optimiser and step,
written atomically every ``checkpoint_every`` steps, when the wall-clock cap is hit, and on Ctrl-C).
Nothing is pickled: checkpoints are safetensors plus JSON.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from embviz.artifacts import versions
from embviz.backbones import Backbone, input_embedding_weight, quiet_transformers
from embviz.cache import (
    atomic_directory,
    atomic_write_json,
    cache_dir,
    config_key,
    embviz_home,
    locked,
    remove_stale_temporaries,
    sha256_file,
)
from embviz.corpora import FITTING_CORPORA, SPLITS, load_texts
from embviz.errors import BadInputError, EmbvizError, UnknownModelError
from embviz.masking import IGNORE_INDEX, mask_line, pad_batches, word_groups
from embviz.perplexity import EvalSet, build_eval_set, model_max_length, special_frame
from embviz.progress import LOSS, Progress, ProgressCallback, quiet

if TYPE_CHECKING:  # transformers is imported where it is used: its import takes seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MANIFEST = "embviz-mlm.json"
FORMAT_VERSION = 1
DEFAULT_SOURCE = "minilm"
DEFAULT_STEPS = 350
"""The default budget, in optimiser steps (see the README's BERT track for its time and accuracy)."""
EXPECTED_MINUTES = 14
"""What the default budget takes on 2 CPU cores (shown by the CLI's and the app's offers)."""
DEFAULT_SEED = 0
TRAIN_CORPORA: tuple[str, ...] = (*FITTING_CORPORA, "pydoc")
"""The classics, the generated everyday English (``smollm``) and Python's documentation -- never ``modern``,
the held-out domain the head is scored on out of domain."""
OUT_OF_DOMAIN: tuple[str, ...] = ("modern",)
"""Scored after every fit besides the training corpora's own valid/test slices; never trained on."""
TRAIN_WEIGHTS: tuple[float, ...] = (0.3, 0.15, 0.05, 0.3, 0.2)
"""Share of the steps drawn from each of :data:`TRAIN_CORPORA` (bible, shakespeare, britannica, smollm,
pydoc): the modern texts are small, so sampling by size would leave them a few percent of the steps."""
TRAIN_MASK_RATE = 0.25
"""Training masks a quarter of the tokens (BERT: 15%): more scored tokens per forward pass for about the same
cost; with the unigram output bias it reached in 230 steps what 15% and a zero bias reached in 350 (README)."""
FILL_IN_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "everyday_fill_in.json"
"""The everyday fill-in test set (written for embviz; never a training text or a generation prompt). It lives
with the tests, so an installed copy of embviz without its repository reports no fill-in accuracy."""
PACKAGED_HEADS = Path(__file__).resolve().parent / "data" / "heads"
"""Fitted heads shipped with embviz: ``<name>.safetensors`` (the trained tensors, float16) + ``<name>.json``."""
EVAL_MAX_TOKENS = 20_000
"""Held-out tokens read per ``valid`` / ``test`` slice for the accuracy report (the whole slice if smaller)."""
MIN_TRAIN_TOKENS = 8


class MLMHeadError(EmbvizError):
    """A fitted head that is missing, corrupt or cannot be built."""


@dataclass(frozen=True)
class HeadConfig:
    """Everything a fit depends on; the output and checkpoints are keyed by it."""

    steps: int = DEFAULT_STEPS
    seed: int = DEFAULT_SEED
    train_layers: int | None = None
    """Top encoder layers to fine-tune (None: all of them; 0: the head alone)."""
    batch_tokens: int = 4096
    max_length: int = 128
    lr: float = 5e-4
    head_lr: float = 1e-3
    warmup_fraction: float = 0.06
    bf16: bool = False
    """bfloat16 autocast: faster only on CPUs with native bf16 (AVX512-BF16 / AMX) or a GPU; 30-100x
    slower without (see :func:`native_bf16`)."""
    corpora: tuple[str, ...] = TRAIN_CORPORA
    weights: tuple[float, ...] | None = TRAIN_WEIGHTS
    """Share of the steps per corpus (None: batches drawn in proportion to each corpus's size)."""
    mask_rate: float = TRAIN_MASK_RATE
    """Share of each training line's tokens masked (whole words); held-out scoring always masks 15%."""
    unigram_bias: bool = True
    """Start the output bias at the training mixture's log unigram frequencies instead of zero."""

    def key(self) -> str:
        return config_key(asdict(self))


@dataclass(frozen=True)
class HeadResult:
    """A fitted (or loaded) head: its folder, manifest and what it took."""

    folder: Path
    manifest: dict[str, Any]
    cached: bool = False
    complete: bool = True

    @property
    def accuracies(self) -> dict[str, dict[str, float]]:
        return self.manifest.get("accuracy", {})

    def to_dict(self) -> dict[str, Any]:
        """What ``embviz fit-mlm-head --json`` prints."""
        keys = (
            "source",
            "name",
            "seed",
            "steps",
            "steps_done",
            "train_seconds",
            "seconds",
            "trained",
            "frozen",
        )
        return {
            "folder": str(self.folder),
            "cached": self.cached,
            "complete": self.complete,
            **{key: self.manifest.get(key) for key in keys},
            "accuracy": self.accuracies,
        }


# -- where things live -----------------------------------------------------------------------------------
class ModelLoader(Protocol):
    """Loads a model by name or path, as :func:`embviz.sources.load_model` does."""

    def __call__(self, name_or_path: str, *, trust_remote_code: bool = False) -> Backbone: ...


def _is_model_name(source: str) -> bool:
    """Whether ``source`` is a model name such as ``minilm`` rather than the path of a local folder."""
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", source) is not None and not Path(source).is_dir()


def output_name(source: str) -> str:
    """The backbone name of ``source`` with a fitted head: ``minilm`` -> ``minilm-mlm``; a folder's name
    gets a hash of its path."""
    if _is_model_name(source):
        return f"{source}-mlm"
    folder = Path(source).expanduser().resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.name).strip("-.") or "model"
    return f"{slug}-mlm-{config_key({'source': str(folder)}, 8)}"


def output_folder(source: str) -> Path:
    """Where the fitted backbone of ``source`` is written (in ``$EMBVIZ_HOME/backbones``)."""
    return cache_dir("backbones") / output_name(source)


def _lookup_folder(source: str) -> Path:
    """:func:`output_folder` without creating anything (looking must not write to the cache)."""
    return embviz_home() / "backbones" / output_name(source)


def _checkpoint_folder(source: str, config: HeadConfig) -> Path:
    return cache_dir("mlm-checkpoints") / f"{output_name(source)}-{config.key()}"


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a fitted folder, checked against its weights (sha256).

    Raises:
        MLMHeadError: missing, unreadable, of another format, or the weights do not match their hash.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MLMHeadError(f"{folder} has no readable {MANIFEST} ({exc.__class__.__name__})") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise MLMHeadError(f"{folder / MANIFEST} is not an embviz masked-LM head manifest")
    hashes = manifest.get("sha256")
    if not isinstance(hashes, dict) or not hashes:
        raise MLMHeadError(f"{folder / MANIFEST} lists no weight hashes")
    for name, expected in hashes.items():
        path = folder / str(name)
        if not path.is_file() or sha256_file(path) != expected:
            raise MLMHeadError(f"{path} is missing or does not match its sha256 in {MANIFEST} (corrupt)")
    return manifest


def built_folder(source: str = DEFAULT_SOURCE, *, base: Callable[[], Path] | None = None) -> Path:
    """The validated folder of ``source``'s fitted head, for :mod:`embviz.sources` to load.

    When the cache has none (or a corrupt one) and embviz ships a fitted head for ``source``
    (:func:`packaged_head`), it is installed from ``base()``, the base model's folder, first.

    Raises:
        UnknownModelError: not built yet, or corrupt; the message says the command that (re)builds it.
    """
    name = output_name(source)
    how = (
        f"run `embviz fit-mlm-head {source}` (about {EXPECTED_MINUTES} minutes on 2 CPU cores), "
        "or use the app's build button"
    )
    folder = _lookup_folder(source)
    try:
        read_manifest(folder)
        return folder
    except MLMHeadError as exc:
        problem = exc
    if base is not None and packaged_head(source) is not None:
        return install_packaged(source, base())
    if not folder.is_dir():
        raise UnknownModelError(f"{name} is not built yet: {how}")
    raise UnknownModelError(f"{name} is corrupt ({problem}); {how} to rebuild it") from problem


def exists(source: str = DEFAULT_SOURCE) -> bool:
    """Whether ``source``'s fitted folder is there or shipped (cheap: hashes are checked on loading)."""
    return (_lookup_folder(source) / MANIFEST).is_file() or _shipped(source, ".json").is_file()


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without, autocast emulates it."""
    try:  # torch has no public check; Linux lists the CPU's flags (elsewhere: assume none)
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", info))
    return bool(flags)


# -- the heads embviz ships --------------------------------------------------------------------------------
def packaged_head(source: str) -> dict[str, Any] | None:
    """The manifest of the head embviz ships for ``source``, or None."""
    path = _shipped(source, ".json")
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MLMHeadError(f"{path} is unreadable ({exc.__class__.__name__}); reinstall embviz") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("packaged"), dict):
        raise MLMHeadError(f"{path} is not a shipped-head manifest; reinstall embviz")
    return manifest


def _shipped(source: str, suffix: str) -> Path:
    """Where embviz ships ``source``'s fitted head: ``<name>.json`` (manifest) or ``<name>.safetensors``."""
    return PACKAGED_HEADS / f"{output_name(source)}{suffix}"


def _base_weights_sha(base: Path) -> str:
    return sha256_file(base / "model.safetensors")


def install_packaged(source: str, base: Path) -> Path:
    """Rebuild ``source``'s fitted folder in the cache from the shipped tensors and the base model's folder
    (seconds, no training); the result is bit-identical to the fit that made the shipped copy.

    Raises:
        MLMHeadError: nothing shipped, the shipped files are corrupt, or were fitted on another base model.
    """
    folder = output_folder(source)
    with locked(folder):
        return _install(source, base, folder)


def _install(source: str, base: Path, folder: Path) -> Path:
    """:func:`install_packaged` for a caller that holds ``folder``'s lock."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    manifest = packaged_head(source)
    if manifest is None:
        raise MLMHeadError(f"embviz ships no fitted head for {source}")
    tensors_path = _shipped(source, ".safetensors")
    packaged = manifest["packaged"]
    if not tensors_path.is_file() or sha256_file(tensors_path) != packaged["sha256"]:
        raise MLMHeadError(f"{tensors_path} is missing or does not match its sha256 (reinstall embviz)")
    if _base_weights_sha(base) != packaged["base_sha256"]:
        raise MLMHeadError(f"the shipped {output_name(source)} was fitted on another {source}: refit it")
    remove_stale_temporaries(folder)
    with quiet_transformers():
        model = AutoModelForMaskedLM.from_pretrained(base)
        tokenizer = AutoTokenizer.from_pretrained(base)
    trained = load_file(str(tensors_path))
    state = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(set(trained) - set(state))
    if missing:
        raise MLMHeadError(f"{tensors_path} holds tensors the base model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in trained.items():
            state[name].copy_(value.to(state[name].dtype))
    body = {k: v for k, v in manifest.items() if k not in ("packaged", "sha256")}
    _write_folder(folder, model, tokenizer, {**body, "installed_from": tensors_path.name})
    return folder


def package_head(source: str = DEFAULT_SOURCE, *, base: Path) -> Path:
    """Write the cached fit of ``source`` into embviz's package (``embviz/data/heads/``): its trained
    tensors (float16, exactly as fitted, see :func:`fit_mlm_head`) and its manifest.

    Raises:
        UnknownModelError: ``source`` has no complete fit in the cache.
    """
    folder = _lookup_folder(source)
    try:
        manifest = read_manifest(folder)
    except MLMHeadError as exc:
        raise UnknownModelError(f"no fitted {output_name(source)} to package ({exc})") from exc
    if not manifest.get("complete"):
        raise UnknownModelError(f"the fit of {output_name(source)} is not complete; finish it first")
    from transformers import AutoModelForMaskedLM

    with quiet_transformers():
        fitted_model = AutoModelForMaskedLM.from_pretrained(folder)
        base_model = AutoModelForMaskedLM.from_pretrained(base)
    fitted = dict(fitted_model.named_parameters(remove_duplicate=False))
    names = manifest["trained_parameters"]
    tensors = {name: fitted[name].detach().to(torch.float16).contiguous() for name in names}
    if not all(torch.equal(tensors[name].float(), fitted[name]) for name in names):
        raise MLMHeadError("the fitted tensors are not float16 values; refit with this version of embviz")
    trained_ids = {id(fitted[name]) for name in names}
    original = dict(base_model.named_parameters(remove_duplicate=False))
    drift = [n for n, p in fitted.items() if id(p) not in trained_ids and not torch.equal(p, original[n])]
    if drift:
        raise MLMHeadError(f"tensors outside the trained set changed: {drift[:3]}")
    PACKAGED_HEADS.mkdir(parents=True, exist_ok=True)
    target = _shipped(source, ".safetensors")
    save_file(tensors, str(target))
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    body["packaged"] = {
        "sha256": sha256_file(target),
        "dtype": "float16",
        "base": source,
        "base_sha256": _base_weights_sha(base),
        "rebuild": f"embviz fit-mlm-head {source} --force --package",
    }
    atomic_write_json(_shipped(source, ".json"), body)
    return target


def is_built(source: str = DEFAULT_SOURCE) -> bool:
    """Whether ``source``'s fitted head exists and is intact."""
    try:
        built_folder(source)
    except EmbvizError:
        return False
    return True


# -- training data -----------------------------------------------------------------------------------------
@dataclass
class _Lines:
    """Tokenized training lines: content ids, whole-word groups (positions incl. the leading specials)."""

    ids: list[list[int]] = field(default_factory=list)
    words: list[list[list[int]]] = field(default_factory=list)
    corpus: list[int] = field(default_factory=list)
    """Index (in the configuration's corpora) of each line's corpus."""


_LINES_MEMO: dict[tuple[str, tuple[str, ...], int], _Lines] = {}


def _training_lines(backbone: Backbone, corpora: Sequence[str], max_length: int) -> _Lines:
    """The tokenized ``train`` lines of ``corpora`` (memoised per tokenizer source for this process)."""
    key = (backbone.source, tuple(corpora), max_length)
    if key not in _LINES_MEMO:
        _LINES_MEMO.clear()  # one set at a time: it holds a few hundred MB of token lists
        _LINES_MEMO[key] = _read_training_lines(backbone, corpora, max_length)
    return _LINES_MEMO[key]


def _read_training_lines(backbone: Backbone, corpora: Sequence[str], max_length: int) -> _Lines:
    tokenizer = backbone.tokenizer
    leading, trailing = special_frame(tokenizer)
    room = model_max_length(backbone, max_length) - len(leading) - len(trailing)
    special = backbone.special_ids
    lines = _Lines()
    for corpus_index, name in enumerate(corpora):
        texts = load_texts(name, "train")
        for start in range(0, len(texts), 256):
            encoded = tokenizer(list(texts[start : start + 256]), add_special_tokens=False, verbose=False)
            for offset, content in enumerate(encoded["input_ids"]):
                content = content[:room]
                words = word_groups(encoded, offset, content, tokenizer, special, shift=len(leading))
                if sum(len(word) for word in words) >= MIN_TRAIN_TOKENS:
                    lines.ids.append([*leading, *content, *trailing])
                    lines.words.append(words)
                    lines.corpus.append(corpus_index)
    if not lines.ids:
        raise BadInputError(f"no training line of at least {MIN_TRAIN_TOKENS} tokens in {', '.join(corpora)}")
    return lines


def _buckets(lines: _Lines, batch_tokens: int, members: Sequence[int] | None = None) -> list[list[int]]:
    """Fixed batches of similar-length lines (of ``members``, default all), each within ``batch_tokens``
    padded tokens."""
    chosen = range(len(lines.ids)) if members is None else members
    order = sorted(chosen, key=lambda i: (len(lines.ids[i]), i))
    batches: list[list[int]] = [[]]
    for i in order:
        if batches[-1] and (len(batches[-1]) + 1) * len(lines.ids[i]) > batch_tokens:
            batches.append([])
        batches[-1].append(i)
    return batches


@dataclass(frozen=True)
class _Schedule:
    """Which batch every step trains on: a pure function of the configuration, so a resumed run sees the
    same batches. With weights, step ``s`` draws its corpus from ``weights`` (seeded) and takes that
    corpus's next batch in a seeded order per pass; without, it takes the next batch of all the lines."""

    pools: list[list[list[int]]]
    corpus_of_step: np.ndarray
    seed: int

    @classmethod
    def build(cls, lines: _Lines, config: HeadConfig) -> _Schedule:
        if config.weights is None:
            return cls(
                [_buckets(lines, config.batch_tokens)], np.zeros(config.steps, dtype=np.int64), config.seed
            )
        pools = [
            _buckets(lines, config.batch_tokens, [i for i, c in enumerate(lines.corpus) if c == index])
            for index in range(len(config.corpora))
        ]
        empty = [config.corpora[i] for i, pool in enumerate(pools) if not pool[0]]
        if empty:
            raise BadInputError(
                f"no training line of at least {MIN_TRAIN_TOKENS} tokens in {', '.join(empty)}"
            )
        weights = np.asarray(config.weights, dtype=np.float64)
        drawn = np.random.default_rng([config.seed, 7]).choice(
            len(pools), size=config.steps, p=weights / weights.sum()
        )
        return cls(pools, drawn, config.seed)

    def rows(self, step: int) -> list[int]:
        corpus = int(self.corpus_of_step[step])
        batches = self.pools[corpus]
        taken = int((self.corpus_of_step[:step] == corpus).sum())
        epoch, index = divmod(taken, len(batches))
        order = np.random.default_rng([self.seed, epoch, corpus]).permutation(len(batches))
        return batches[int(order[index])]


def _step_batch(
    lines: _Lines,
    schedule: _Schedule,
    step: int,
    config: HeadConfig,
    mask_id: int,
    pool: np.ndarray,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked batch of ``step``: a pure function of ``(seed, step)``, so a resumed run sees the same."""
    rows = schedule.rows(step)
    examples = [
        mask_line(
            lines.ids[i],
            lines.words[i],
            np.random.default_rng([config.seed, step, row]),
            mask_id,
            pool,
            rate=config.mask_rate,
        )
        for row, i in enumerate(rows)
    ]
    [batch] = pad_batches(examples, pad_id, batch_size=len(examples))
    return batch.input_ids, batch.attention_mask, batch.labels


# -- the model pieces --------------------------------------------------------------------------------------
def _parts(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.ModuleList]:
    """(encoder model, MLM head, encoder layers) of a BERT-style ``*ForMaskedLM``."""
    encoder = getattr(model, model.base_model_prefix, None)
    head = getattr(model, "cls", None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if encoder is None or head is None or not isinstance(layers, torch.nn.ModuleList):
        raise BadInputError(
            f"{type(model).__name__} is not a BERT-family masked LM (needs .{model.base_model_prefix}.encoder"
            ".layer and a .cls head); fit-mlm-head supports BERT-style encoders"
        )
    return encoder, head, layers


def _trainable(model: PreTrainedModel, train_layers: int | None) -> dict[str, torch.nn.Parameter]:
    """Mark and return the trained parameters: the head (minus the tied decoder) and the top layers."""
    _, head, layers = _parts(model)
    count = len(layers) if train_layers is None else train_layers
    if not 0 <= count <= len(layers):
        raise BadInputError(f"train_layers must be between 0 and {len(layers)}, got {count}")
    embedding = input_embedding_weight(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    modules = [head, *list(layers)[len(layers) - count :]]
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    chosen: dict[str, torch.nn.Parameter] = {}
    for module in modules:
        for parameter in module.parameters():
            if parameter is not embedding:
                parameter.requires_grad_(True)
                chosen[names[id(parameter)]] = parameter
    return chosen


def unigram_log_frequencies(
    lines: Sequence[Sequence[int]],
    corpus_of_line: Sequence[int],
    config: HeadConfig,
    vocab_size: int,
    special_ids: frozenset[int],
) -> torch.Tensor:
    """Centred log frequency of each token in the training mixture (``lines`` of token ids, each from corpus
    ``corpus_of_line`` = an index into ``config.corpora``): each corpus's add-0.1 unigram distribution, mixed
    in the configuration's step shares (by size without shares); special tokens get the smallest value."""
    ids_by_corpus: list[list[int]] = [[] for _ in config.corpora]
    for ids, corpus in zip(lines, corpus_of_line, strict=True):
        ids_by_corpus[corpus].extend(ids)
    counts = np.stack(
        [np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size) for ids in ids_by_corpus]
    )
    special = np.asarray(sorted(special_ids), dtype=np.int64)
    counts[:, special] = 0
    totals = counts.sum(axis=1)
    shares = np.asarray(totals if config.weights is None else config.weights, dtype=np.float64)
    distributions = (counts + 0.1) / (totals[:, None] + 0.1 * vocab_size)
    logs = np.log(shares / shares.sum() @ distributions)
    logs[special] = logs.min()
    return torch.from_numpy(logs - logs.mean()).float()


def _start_bias_at_unigram(
    model: PreTrainedModel, lines: _Lines, config: HeadConfig, special_ids: frozenset[int]
) -> None:
    """Set the MLM head's output bias to :func:`unigram_log_frequencies` (a fit's first step only): the
    first steps then refine a unigram guess instead of learning it from a uniform one."""
    _, head, _ = _parts(model)
    bias = getattr(getattr(head, "predictions", None), "bias", None)
    if not isinstance(bias, torch.Tensor) or bias.numel() != model.config.vocab_size:
        logger.info("no BERT-style output bias to start at the unigram frequencies; left as it is")
        return
    start = unigram_log_frequencies(lines.ids, lines.corpus, config, model.config.vocab_size, special_ids)
    with torch.no_grad():
        bias.copy_(start.to(bias.device, bias.dtype))


def _masked_logits(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, bf16: bool
) -> torch.Tensor:
    """Logits (float32) at the scored positions only: the V-wide output is the costly part."""
    encoder, head, _ = _parts(model)
    device = input_embedding_weight(model).device
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = head(hidden[labels != IGNORE_INDEX])
    return logits.float()


def _lr_factor(step: int, config: HeadConfig) -> float:
    """Linear warm-up then linear decay to zero, as a function of the step alone."""
    warmup = max(1, round(config.warmup_fraction * config.steps))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (config.steps - step) / max(1, config.steps - warmup))


def _optimizer(parameters: dict[str, torch.nn.Parameter], config: HeadConfig) -> torch.optim.AdamW:
    head = [p for n, p in parameters.items() if n.startswith("cls.")]
    body = [p for n, p in parameters.items() if not n.startswith("cls.")]
    groups = [{"params": head, "lr": config.head_lr, "base_lr": config.head_lr}]
    if body:
        groups.append({"params": body, "lr": config.lr, "base_lr": config.lr})
    return torch.optim.AdamW(groups, weight_decay=0.0)


# -- checkpoints (safetensors + JSON, never pickles) ----------------------------------------------------------
def _save_checkpoint(
    folder: Path,
    parameters: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.AdamW,
    step: int,
    state: dict[str, Any],
) -> None:
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in parameters.items()}
    index = {id(p): n for n, p in parameters.items()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                tensors[f"adam/{index[id(parameter)]}/{key}"] = value.detach().cpu().contiguous()
    with atomic_directory(folder) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        atomic_write_json(tmp / "state.json", {**state, "step": step})


def _load_checkpoint(
    folder: Path, parameters: dict[str, torch.nn.Parameter], optimizer: torch.optim.AdamW, key: str
) -> dict[str, Any] | None:
    """Restore a checkpoint in place; None (start afresh) when there is none or it is unusable."""
    if not (folder / "state.json").is_file():
        return None
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        if state.get("config_key") != key:
            return None
        tensors = load_file(str(folder / "state.safetensors"))
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(tensors[f"param/{name}"])
        index = {id(p): n for n, p in parameters.items()}
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                prefix = f"adam/{index[id(parameter)]}/"
                saved = {
                    k[len(prefix) :]: v if v.ndim == 0 else v.to(parameter.device)
                    for k, v in tensors.items()
                    if k.startswith(prefix)
                }
                if saved:
                    optimizer.state[parameter] = saved
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        logger.warning("ignoring the unusable checkpoint %s (%s); starting afresh", folder, exc)
        return None
    return state


# -- evaluation ---------------------------------------------------------------------------------------------
def masked_accuracy(model: PreTrainedModel, eval_set: EvalSet, *, bf16: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean loss over the scored (masked) tokens of ``eval_set``."""
    top1 = top5 = tokens = 0
    total_loss = 0.0
    with torch.inference_mode():
        for batch in eval_set.batches:
            labels = batch.labels[batch.labels != IGNORE_INDEX]
            logits = _masked_logits(model, batch.input_ids, batch.attention_mask, batch.labels, bf16)
            labels = labels.to(logits.device)
            best = logits.topk(5, dim=-1).indices
            top1 += int((best[:, 0] == labels).sum())
            top5 += int((best == labels[:, None]).any(-1).sum())
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            tokens += len(labels)
    return {
        "top1": round(top1 / tokens, 4),
        "top5": round(top5 / tokens, 4),
        "loss": round(total_loss / tokens, 4),
        "tokens": tokens,
    }


@dataclass(frozen=True)
class FillInItem:
    """One everyday sentence with one ``[MASK]`` and the answers that count as right."""

    sentence: str
    answers: tuple[str, ...]
    category: str = ""


def read_fill_in(path: Path = FILL_IN_FILE) -> list[FillInItem]:
    """The fill-in test set (``{"items": [{"sentence", "answers", "category"}]}``).

    Raises:
        BadInputError: unreadable, or an item without exactly one ``[MASK]`` or without answers.
    """
    try:
        items = json.loads(path.read_text(encoding="utf-8"))["items"]
        parsed = [FillInItem(i["sentence"], tuple(i["answers"]), i.get("category", "")) for i in items]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"cannot read the fill-in set {path} ({exc.__class__.__name__}: {exc})") from exc
    for item in parsed:
        if item.sentence.count("[MASK]") != 1 or not item.answers:
            raise BadInputError(f"fill-in item {item.sentence!r} needs exactly one [MASK] and an answer")
    return parsed


def fill_in_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[FillInItem],
    batch_size: int = 16,
) -> dict[str, Any]:
    """Top-1 / top-5 "acceptable answer" rates over the full vocabulary, per category too, with each
    sentence's top 5 (``[MASK]`` is the tokenizer's mask token)."""
    device = input_embedding_weight(model).device
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            texts = [item.sentence.replace("[MASK]", str(tokenizer.mask_token)) for item in batch]
            encoded = tokenizer(texts, return_tensors="pt", padding=True).to(device)
            logits = model(**encoded).logits
            at = encoded["input_ids"] == tokenizer.mask_token_id
            best = logits[at].topk(5, dim=-1).indices.cpu()
            for item, ids in zip(batch, best.tolist(), strict=True):
                top5 = [str(tokenizer.convert_ids_to_tokens(i)) for i in ids]
                rows.append(
                    {
                        "sentence": item.sentence,
                        "category": item.category,
                        "top5": top5,
                        "top1_ok": top5[0] in item.answers,
                        "top5_ok": any(token in item.answers for token in top5),
                    }
                )

    def rates(chosen: list[dict[str, Any]]) -> dict[str, float]:
        return {
            "top1": round(sum(r["top1_ok"] for r in chosen) / len(chosen), 4),
            "top5": round(sum(r["top5_ok"] for r in chosen) / len(chosen), 4),
            "sentences": len(chosen),
        }

    categories = sorted({r["category"] for r in rows if r["category"]})
    return {
        **rates(rows),
        "by_category": {c: rates([r for r in rows if r["category"] == c]) for c in categories},
        "sentences_detail": rows,
    }


def held_out_sets(
    backbone: Backbone, corpora: Sequence[str] = TRAIN_CORPORA, max_tokens: int = EVAL_MAX_TOKENS
) -> dict[str, EvalSet]:
    """The perplexity protocol's masked examples (seed 0) of every ``valid`` / ``test`` slice."""
    return {
        f"{name}:{split}": build_eval_set(backbone, load_texts(name, split), max_tokens=max_tokens, seed=0)
        for name in corpora
        for split in SPLITS
        if split != "train"
    }


# -- fitting ------------------------------------------------------------------------------------------------
def fit_mlm_head(
    source: str = DEFAULT_SOURCE,
    *,
    load: ModelLoader,
    config: HeadConfig | None = None,
    minutes: float | None = None,
    checkpoint_every: int = 50,
    eval_max_tokens: int = EVAL_MAX_TOKENS,
    progress: ProgressCallback | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    device: str = "cpu",
    base: Callable[[], Path] | None = None,
) -> HeadResult:
    """Fit the masked-LM head of ``source`` (a built-in name or a local BERT-family folder) and save it.

    ``load`` loads ``source`` (e.g. :func:`embviz.sources.load_model`); it is not called when the fit is
    cached.

    Trains the head plus the top ``config.train_layers`` encoder layers on the corpora's ``train`` slices
    for ``config.steps`` steps, the word embeddings frozen (see the module docstring). ``minutes`` caps the
    wall-clock time: when it runs out the run is checkpointed, the folder is written with
    ``complete: false``, and the next call with the same configuration resumes. An intact folder with the
    same configuration is returned as is (``cached``) unless ``force``. Reports top-1 / top-5 accuracy on
    every ``valid`` / ``test`` slice. ``device`` (e.g. ``cuda``) only changes where it runs; the result is
    saved for the CPU.

    Raises:
        BadInputError: bad steps / minutes / layers, or ``source`` is not a BERT-style masked LM.
        UnknownModelError: ``source`` cannot be loaded.
    """
    config = config or HeadConfig()
    if config.steps < 1:
        raise BadInputError(f"steps must be at least 1, got {config.steps}")
    if config.weights is not None and (
        len(config.weights) != len(config.corpora)
        or not all(w >= 0 and math.isfinite(w) for w in config.weights)
        or sum(config.weights) <= 0
    ):
        raise BadInputError(
            f"weights must be one non-negative number per corpus ({len(config.corpora)}), not all zero; "
            f"got {config.weights}"
        )
    if not 0 < config.mask_rate < 1:
        raise BadInputError(f"mask_rate must be between 0 and 1, got {config.mask_rate}")
    if minutes is not None and not (minutes > 0 and math.isfinite(minutes)):
        raise BadInputError(f"minutes must be a positive number, got {minutes}")
    if checkpoint_every < 1:
        raise BadInputError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    if source.endswith("-mlm") and _is_model_name(source):
        raise BadInputError(f"{source} already has a fitted head; fit its base model instead")
    report = progress or quiet
    folder = output_folder(source)
    with locked(folder):
        remove_stale_temporaries(folder)
        if not force and folder.is_dir():
            try:
                manifest = read_manifest(folder)
            except MLMHeadError as exc:
                logger.warning("rebuilding %s: %s", folder, exc)
            else:
                if manifest.get("config_key") == config.key() and manifest.get("complete"):
                    report(Progress(1, 1, "already fitted (cached)"))
                    return HeadResult(folder, manifest, cached=True)
            shipped = packaged_head(source)
            if base is not None and shipped is not None and shipped.get("config_key") == config.key():
                report(Progress(1, 1, "already fitted (the head embviz ships)"))
                installed = _install(source, base(), folder)
                return HeadResult(installed, read_manifest(installed), cached=True)
        return _fit(
            source,
            folder,
            config,
            minutes,
            checkpoint_every,
            eval_max_tokens,
            report,
            lambda: load(source, trust_remote_code=trust_remote_code),
            device,
        )


def _fit(
    source: str,
    folder: Path,
    config: HeadConfig,
    minutes: float | None,
    checkpoint_every: int,
    eval_max_tokens: int,
    report: ProgressCallback,
    load_source: Callable[[], Backbone],
    device: str,
) -> HeadResult:
    started = time.perf_counter()
    backbone = load_source()
    if backbone.kind != "masked" or backbone.tokenizer.mask_token_id is None:
        raise BadInputError(
            f"{source} is not a masked language model; fit-mlm-head needs a BERT-style encoder"
        )
    try:
        model = backbone.model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise BadInputError(f"cannot use device {device!r}: {str(exc).splitlines()[0]}") from exc
    embedding_before = input_embedding_weight(model).detach().clone()
    parameters = _trainable(model, config.train_layers)
    optimizer = _optimizer(parameters, config)
    checkpoint = _checkpoint_folder(source, config)
    with locked(checkpoint):
        remove_stale_temporaries(checkpoint)
        state = _load_checkpoint(checkpoint, parameters, optimizer, config.key())
    step = int(state["step"]) if state else 0
    spent = float(state.get("train_seconds", 0.0)) if state else 0.0
    losses: list[float] = list(state.get("losses", [])) if state else []
    if state:
        logger.info("resuming %s from step %d of %d", source, step, config.steps)
    report(Progress(step, config.steps, "tokenizing the training text"))
    lines = _training_lines(backbone, config.corpora, config.max_length)
    schedule = _Schedule.build(lines, config)
    if config.unigram_bias and not state:
        _start_bias_at_unigram(model, lines, config, backbone.special_ids)
    tokenizer = backbone.tokenizer
    pool = np.array([i for i in range(backbone.vocab_size) if i not in backbone.special_ids], dtype=np.int64)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    deadline = None if minutes is None else time.perf_counter() + 60 * minutes

    def save() -> None:
        extra = {"config_key": config.key(), "train_seconds": spent, "losses": losses}
        with locked(checkpoint):
            _save_checkpoint(checkpoint, parameters, optimizer, step, extra)

    model.eval()  # dropout off (eval mode; gradients still flow): the fit is a pure function of the seed
    try:
        while step < config.steps and (deadline is None or time.perf_counter() < deadline):
            tick = time.perf_counter()
            ids, mask, labels = _step_batch(
                lines, schedule, step, config, tokenizer.mask_token_id, pool, pad_id
            )
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * _lr_factor(step, config)
            logits = _masked_logits(model, ids, mask, labels, config.bf16)
            loss = F.cross_entropy(logits, labels[labels != IGNORE_INDEX].to(logits.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(parameters.values()), 1.0)
            optimizer.step()
            value = loss.item()
            losses.append(round(value, 4))
            step += 1
            spent += time.perf_counter() - tick
            report(
                Progress(step, config.steps, f"step {step}/{config.steps}", {LOSS: value}, elapsed_s=spent)
            )
            if step % checkpoint_every == 0 and step < config.steps:
                save()
    except KeyboardInterrupt:
        save()
        raise
    complete = step >= config.steps
    if not complete:
        save()
    if not torch.equal(input_embedding_weight(model).cpu(), embedding_before.cpu()):
        raise MLMHeadError("internal error: the word-embedding matrix changed while fitting the head")
    if complete:
        # Round the trained tensors to float16 values, so the copy embviz ships (half the bytes of float32)
        # is exactly this fit; everything below is measured on the rounded weights.
        with torch.no_grad():
            for parameter in parameters.values():
                parameter.copy_(parameter.to(torch.float16).to(parameter.dtype))
    report(Progress(step, config.steps, "measuring held-out accuracy"))
    scored = (*config.corpora, *(name for name in OUT_OF_DOMAIN if name not in config.corpora))
    accuracy = {
        name: masked_accuracy(model, eval_set, bf16=config.bf16)
        for name, eval_set in held_out_sets(backbone, scored, eval_max_tokens).items()
    }
    fill_in = fill_in_accuracy(model, tokenizer, read_fill_in()) if FILL_IN_FILE.is_file() else None
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "name": output_name(source),
        "config": asdict(config),
        "config_key": config.key(),
        "seed": config.seed,
        "steps": config.steps,
        "steps_done": step,
        "complete": complete,
        "train_seconds": round(spent, 1),
        "device": device,
        "seconds": round(time.perf_counter() - started, 1),
        "data": {"train": [f"{name}:train" for name in config.corpora], "held_out": sorted(accuracy)},
        "trained": _describe_trained(model, config.train_layers),
        "trained_parameters": sorted(parameters),
        "frozen": "the embedding block (word embeddings = the tied decoder weight, positions, LayerNorm)"
        + ("" if config.train_layers is None else " and the encoder layers below the trained ones"),
        "accuracy": accuracy,
        "fill_in": fill_in,
        "eval_max_tokens": eval_max_tokens,
        "losses": losses,
        "versions": versions(),
    }
    _write_folder(folder, model.cpu(), tokenizer, manifest)
    if complete:
        _remove_checkpoint(checkpoint)
    return HeadResult(folder, read_manifest(folder), complete=complete)


def _describe_trained(model: PreTrainedModel, train_layers: int | None) -> str:
    layers = len(_parts(model)[2])
    count = layers if train_layers is None else train_layers
    body = f"the top {count} of {layers} encoder layers" if count else "no encoder layer"
    return f"the MLM head (transform dense + GELU + LayerNorm, output bias) and {body}"


def _write_folder(
    folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, manifest: dict[str, Any]
) -> None:
    """save_pretrained (safetensors only) + tokenizer + manifest with weight hashes, in one atomic rename."""
    with atomic_directory(folder) as tmp, quiet_transformers():  # the caller holds the folder's lock
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        weights = sorted(path.name for path in tmp.glob("*.safetensors"))
        manifest = {**manifest, "sha256": {name: sha256_file(tmp / name) for name in weights}}
        atomic_write_json(tmp / MANIFEST, manifest)


def _remove_checkpoint(folder: Path) -> None:
    import shutil

    with locked(folder):
        shutil.rmtree(folder, ignore_errors=True)


__all__ = [
    "DEFAULT_SOURCE",
    "DEFAULT_STEPS",
    "EXPECTED_MINUTES",
    "TRAIN_MASK_RATE",
    "HeadConfig",
    "HeadResult",
    "MLMHeadError",
    "ModelLoader",
    "built_folder",
    "exists",
    "fit_mlm_head",
    "held_out_sets",
    "is_built",
    "masked_accuracy",
    "output_folder",
    "output_name",
    "read_manifest",
    "unigram_log_frequencies",
]
