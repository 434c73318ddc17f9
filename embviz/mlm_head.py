"""Fit a masked-LM head (and the encoder under it) for a BERT-family encoder that has no trained one.

``minilm`` (all-MiniLM-L6-v2) is a sentence encoder: the ``BertForMaskedLM`` head a loader puts on it is
random, so its fill-mask output is noise. :func:`fit_mlm_head` trains one on the ``train`` slices of the
bundled corpora (:mod:`embviz.corpora`; ``valid`` / ``test`` are never seen) and writes a Hugging Face
folder (safetensors only, tokenizer, ``embviz-mlm.json`` manifest) into embviz's cache, atomically. The
built-in backbone ``minilm-mlm`` loads that folder.

What is trained, and what is not:

* **Trained:** the head (``cls.predictions``: transform dense + GELU + LayerNorm, and the output bias) and
  the top ``train_layers`` encoder layers (default: all six). A head alone on the frozen encoder's last
  layer reaches only about 18% top-1 on held-out Bible text (the sentence-embedding training has washed the
  token identities out of it), far from the 40% target, so the encoder is fine-tuned too.
* **Frozen:** the whole embedding block -- above all the word-embedding matrix E, which is also the
  decoder's (tied) weight. E is exactly what embviz compresses, so the compression protocol stays the
  paper's: the compressed variants replace the same E the head was fitted on.

Masking is BERT's (15% whole-word, 80% mask / 10% random / 10% kept), the same code as the perplexity
protocol (:mod:`embviz.masking`), drawn afresh for every step from a generator seeded by
``(seed, step, row)``. Batches are fixed length-bucketed groups of lines, visited in a seeded order per
epoch; the learning rate is a function of the step; dropout is off. A run is therefore a deterministic
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
EXPECTED_MINUTES = 10
"""What the default budget takes on 2 CPU cores (shown by the CLI's and the app's offers)."""
DEFAULT_SEED = 0
TRAIN_CORPORA: tuple[str, ...] = FITTING_CORPORA  # never the held-out domains
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
    bf16: bool = True
    corpora: tuple[str, ...] = TRAIN_CORPORA

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


def built_folder(source: str = DEFAULT_SOURCE) -> Path:
    """The validated folder of ``source``'s fitted head, for :mod:`embviz.sources` to load.

    Raises:
        UnknownModelError: not built yet, or corrupt; the message says the command that (re)builds it.
    """
    name = output_name(source)
    how = (
        f"run `embviz fit-mlm-head {source}` (about {EXPECTED_MINUTES} minutes on 2 CPU cores), "
        "or use the app's build button"
    )
    folder = _lookup_folder(source)
    if not folder.is_dir():
        raise UnknownModelError(f"{name} is not built yet: {how}")
    try:
        read_manifest(folder)
    except MLMHeadError as exc:
        raise UnknownModelError(f"{name} is corrupt ({exc}); {how} to rebuild it") from exc
    return folder


def exists(source: str = DEFAULT_SOURCE) -> bool:
    """Whether ``source``'s fitted folder is there (cheap: its hashes are checked when it is loaded)."""
    return (_lookup_folder(source) / MANIFEST).is_file()


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
    for name in corpora:
        texts = load_texts(name, "train")
        for start in range(0, len(texts), 256):
            encoded = tokenizer(list(texts[start : start + 256]), add_special_tokens=False, verbose=False)
            for offset, content in enumerate(encoded["input_ids"]):
                content = content[:room]
                words = word_groups(encoded, offset, content, tokenizer, special, shift=len(leading))
                if sum(len(word) for word in words) >= MIN_TRAIN_TOKENS:
                    lines.ids.append([*leading, *content, *trailing])
                    lines.words.append(words)
    if not lines.ids:
        raise BadInputError(f"no training line of at least {MIN_TRAIN_TOKENS} tokens in {', '.join(corpora)}")
    return lines


def _buckets(lines: _Lines, batch_tokens: int) -> list[list[int]]:
    """Fixed batches of similar-length lines, each within ``batch_tokens`` padded tokens."""
    order = sorted(range(len(lines.ids)), key=lambda i: (len(lines.ids[i]), i))
    batches: list[list[int]] = [[]]
    for i in order:
        if batches[-1] and (len(batches[-1]) + 1) * len(lines.ids[i]) > batch_tokens:
            batches.append([])
        batches[-1].append(i)
    return batches


def _step_batch(
    lines: _Lines, batches: list[list[int]], step: int, seed: int, mask_id: int, pool: np.ndarray, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked batch of ``step``: a pure function of ``(seed, step)``, so a resumed run sees the same."""
    epoch, index = divmod(step, len(batches))
    order = np.random.default_rng([seed, epoch]).permutation(len(batches))
    rows = batches[int(order[index])]
    examples = [
        mask_line(lines.ids[i], lines.words[i], np.random.default_rng([seed, step, row]), mask_id, pool)
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
    batches = _buckets(lines, config.batch_tokens)
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
                lines, batches, step, config.seed, tokenizer.mask_token_id, pool, pad_id
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
    report(Progress(step, config.steps, "measuring held-out accuracy"))
    accuracy = {
        name: masked_accuracy(model, eval_set, bf16=config.bf16)
        for name, eval_set in held_out_sets(backbone, config.corpora, eval_max_tokens).items()
    }
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
        "frozen": "the embedding block (word embeddings = the tied decoder weight, positions, LayerNorm)"
        + ("" if config.train_layers is None else " and the encoder layers below the trained ones"),
        "accuracy": accuracy,
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
]
