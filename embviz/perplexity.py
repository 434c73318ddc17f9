"""Zero-shot perplexity of a backbone with its token embedding replaced by compressed variants.

Two protocols, one per model kind, and every variant (the uncompressed model included) is scored on exactly
the same tokens:

* **Masked LMs** -- the paper's protocol. Each held-out line is one example (truncated to 512 tokens or the
  model's limit; lines with fewer than 20 tokens, special tokens not counted, are dropped). Whole-word
  masking as in Hugging Face's ``DataCollatorForWholeWordMask``: words are drawn in random order until 15%
  of the line's tokens are selected; each selected token is replaced by the mask token (80%), a random
  non-special token (10%) or kept (10%). The random draws of line ``i`` come from a generator seeded with
  ``(seed, i)``, so masks do not depend on the budget or on the variant. Perplexity is
  ``exp(mean cross-entropy over the selected tokens)``.
* **Causal LMs** -- the held-out lines are joined with newlines (natural text, not chat or end-of-text
  markers) and tokenized without special tokens; the first ``max_tokens`` tokens are cut into fixed,
  non-overlapping windows (256 tokens, or the model's limit). Within a window every token after the first
  is predicted; perplexity is ``exp(mean next-token NLL over all predicted tokens)``.

The masked examples / windows are built once in an :class:`EvalSet` and reused for every variant.

Beside perplexity (SPEC §2), every variant gets, on exactly the scored tokens and in the same pass, the mean
KL divergence ``KL(original || variant)`` of the predicted (next or masked) token's distribution over the
full vocabulary, in nats per token, and the top-1 agreement (share of scored positions where the variant's
most likely token is the original's). This runs the original model on every batch next to the variant, so
scoring a variant costs two forward passes instead of one; batches are sized so that both logits tensors
together fit :data:`LOGITS_BUDGET_BYTES`. :func:`direction_length_ablation` builds the two matrices of the
direction / length ablation (a variant's row directions with the original lengths, and the reverse).

With ``device`` (e.g. ``cuda``) the model runs there (:meth:`~embviz.backbones.Backbone.placed_on`: moved
there for the scoring, back afterwards; batches and the variant's matrix go with it) and only the summed
figures come back to the CPU. They equal the CPU's within float tolerance; the device is not part of any
cache key, since it changes where a perplexity is computed, not what it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from embviz.backbones import Backbone, Kind, Mode, resolve_device
from embviz.cache import config_key, optional_cache_dir, write_if_possible
from embviz.compressors.base import check_device
from embviz.errors import BadInputError
from embviz.masking import IGNORE_INDEX, MASK_RATE, EvalBatch, mask_line, pad_batches, word_groups
from embviz.progress import Progress, ProgressCallback, nested, send

PROTOCOL_VERSION = 2
"""Bumped whenever cached results change meaning (2: KL divergence and top-1 agreement stored with them)."""
DEFAULT_MAX_TOKENS = 2048
CAUSAL_WINDOW = 256
MASKED_MAX_LENGTH = 512
MIN_LINE_TOKENS = 20
REFERENCE = "original"
# Upper bound on one batch's logits (batch x seq x V float32) -- the variant's and the original's together,
# since both are held for the KL divergence; the per-row log-softmax copies add a fraction of it.
LOGITS_BUDGET_BYTES = 200 * 2**20
_LOGITS_HELD = 2  # logits tensors alive at once while a variant is scored (the variant's, the original's)
_TOKENIZE_CHUNK = 256  # lines tokenized at a time, so a huge text file is only read as far as needed


@dataclass(frozen=True)
class EvalSet:
    """The fixed evaluation data of one protocol run, shared by every variant."""

    kind: Kind
    batches: tuple[EvalBatch, ...]
    tokens_read: int
    tokens_scored: int
    examples: int
    lines_used: int
    lines_dropped: int
    max_tokens: int
    seed: int
    sequence_length: int
    texts_sha: str
    description: str

    def settings(self) -> dict[str, Any]:
        """The protocol parameters, for reports and cache keys."""
        return {
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "sequence_length": self.sequence_length,
            "texts_sha": self.texts_sha,
            "tokens_read": self.tokens_read,
            "tokens_scored": self.tokens_scored,
            "examples": self.examples,
            "lines_used": self.lines_used,
            "lines_dropped": self.lines_dropped,
        }


@dataclass(frozen=True)
class VariantPerplexity:
    """The perplexity of one variant under an :class:`EvalSet`.

    ``kl_nats`` is the mean KL divergence KL(original || variant) of the predicted token's distribution per
    scored token (nats), ``top1_agreement`` the share of scored positions where the variant's argmax is the
    original's; 0.0 and 1.0 for the uncompressed model, None when not computed (``divergence=False``).
    """

    perplexity: float
    mean_nll: float
    tokens: int
    seconds: float
    cached: bool = False
    kl_nats: float | None = None
    top1_agreement: float | None = None


@dataclass(frozen=True)
class PerplexityReport:
    """Per-variant perplexities under one protocol; ``reference`` names the uncompressed model's entry."""

    backbone: str
    kind: Kind
    mode: Mode
    protocol: str
    settings: dict[str, Any]
    results: dict[str, VariantPerplexity]
    reference: str = REFERENCE
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (what the CLI prints with ``--json`` and the app exports)."""
        reference = self.results[self.reference].perplexity
        return {
            "backbone": self.backbone,
            "kind": self.kind,
            "mode": self.mode,
            "protocol": self.protocol,
            "protocol_version": PROTOCOL_VERSION,
            "settings": dict(self.settings),
            "reference": self.reference,
            "seconds": round(self.seconds, 3),
            "results": {
                name: {**asdict(result), "vs_reference": result.perplexity / reference}
                for name, result in self.results.items()
            },
        }


# -- building the evaluation set -------------------------------------------------------------------------
def texts_fingerprint(texts: Sequence[str]) -> str:
    """A short hash of a text sequence (order and line breaks matter)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def model_max_length(backbone: Backbone, cap: int) -> int:
    """The model's position limit (from its config), at most ``cap``."""
    limit = getattr(backbone.model.config, "max_position_embeddings", None)
    return min(cap, int(limit)) if isinstance(limit, int) and limit > 0 else cap


def build_eval_set(
    backbone: Backbone,
    texts: Sequence[str],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int = 0,
    batch_size: int | None = None,
    window: int = CAUSAL_WINDOW,
) -> EvalSet:
    """Tokenize (and, for masked models, mask) the held-out ``texts`` once, into padded batches.

    ``max_tokens`` bounds the text read (tokens of kept lines / of the causal stream); ``batch_size`` is the
    number of examples per batch (default: as many as fit a ~200 MB logits budget).

    Raises:
        BadInputError: empty text, a budget too small, or (masked) no line long enough / no mask token.
    """
    if not any(text.strip() for text in texts):
        raise BadInputError("the evaluation text is empty")
    if max_tokens < 2:
        raise BadInputError(f"max_tokens must be at least 2, got {max_tokens}")
    if batch_size is not None and batch_size < 1:
        raise BadInputError(f"batch_size must be at least 1, got {batch_size}")
    if backbone.kind == "masked":
        return _masked_eval_set(backbone, texts, max_tokens, seed, batch_size)
    return _causal_eval_set(backbone, texts, max_tokens, seed, batch_size, window)


def _chunks(texts: Sequence[str], size: int) -> Iterator[tuple[int, list[str]]]:
    for start in range(0, len(texts), size):
        yield start, list(texts[start : start + size])


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a single sequence (e.g. [CLS] / [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a")["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return [], []


def _masked_eval_set(
    backbone: Backbone, texts: Sequence[str], max_tokens: int, seed: int, batch_size: int | None
) -> EvalSet:
    tokenizer = backbone.tokenizer
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise BadInputError(f"{backbone.name} has no mask token, so it cannot be scored as a masked LM")
    max_length = model_max_length(backbone, MASKED_MAX_LENGTH)
    leading, trailing = special_frame(tokenizer)
    room = max_length - len(leading) - len(trailing)
    special = backbone.special_ids
    random_pool = np.array([i for i in range(backbone.vocab_size) if i not in special], dtype=np.int64)
    examples: list[tuple[list[int], list[int]]] = []
    tokens_read = used = dropped = 0
    for start, lines in _chunks(texts, _TOKENIZE_CHUNK):
        # Special tokens and truncation are applied here, not by the tokenizer: a fast tokenizer's truncation
        # setting is shared state, and flipping it races with other threads using the same tokenizer.
        encoded = tokenizer(lines, add_special_tokens=False, verbose=False)
        for offset, content in enumerate(encoded["input_ids"]):
            words = word_groups(encoded, offset, content[:room], tokenizer, special, shift=len(leading))
            length = sum(len(word) for word in words)
            if length < MIN_LINE_TOKENS:
                dropped += 1
                continue
            rng = np.random.default_rng([seed, start + offset])
            ids = [*leading, *content[:room], *trailing]
            examples.append(mask_line(ids, words, rng, mask_id, random_pool))
            tokens_read += length
            used += 1
            if tokens_read >= max_tokens:
                break
        if tokens_read >= max_tokens:
            break
    if not examples:
        raise BadInputError(
            f"no line of the text has at least {MIN_LINE_TOKENS} tokens; masked-LM perplexity needs longer lines"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = _padded(examples, pad_id, backbone.vocab_size, batch_size)
    scored = sum(int((batch.labels != IGNORE_INDEX).sum()) for batch in batches)
    description = (
        f"masked LM, zero-shot: {used} held-out lines ({tokens_read:,} tokens; lines under {MIN_LINE_TOKENS} "
        f"tokens dropped: {dropped}; each truncated to {max_length}), whole-word masking of "
        f"{MASK_RATE:.0%} of tokens (80% mask / 10% random / 10% kept, seed {seed}); "
        f"perplexity = exp(mean cross-entropy over the {scored:,} selected tokens)"
    )
    return EvalSet(
        kind="masked",
        batches=batches,
        tokens_read=tokens_read,
        tokens_scored=scored,
        examples=len(examples),
        lines_used=used,
        lines_dropped=dropped,
        max_tokens=max_tokens,
        seed=seed,
        sequence_length=max_length,
        texts_sha=texts_fingerprint(texts),
        description=description,
    )


def _causal_eval_set(
    backbone: Backbone, texts: Sequence[str], max_tokens: int, seed: int, batch_size: int | None, window: int
) -> EvalSet:
    tokenizer = backbone.tokenizer
    window = model_max_length(backbone, window)
    if window < 2:
        raise BadInputError(f"the causal window must be at least 2 tokens, got {window}")
    # Lines tokenized one by one only estimate the joined stream's length; read a margin beyond the budget.
    lines: list[str] = []
    estimate = 0
    for _, chunk in _chunks(texts, _TOKENIZE_CHUNK):
        for line, ids in zip(
            chunk, tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"], strict=True
        ):
            if line.strip():
                lines.append(line)
                estimate += len(ids) + 1
            if estimate >= max_tokens * 1.05 + 16:
                break
        if estimate >= max_tokens * 1.05 + 16:
            break
    stream = tokenizer("\n".join(lines), add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    windows = [stream[i : i + window] for i in range(0, len(stream), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise BadInputError("the evaluation text is shorter than 2 tokens")
    examples = [(w, [*w[1:], IGNORE_INDEX]) for w in windows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = _padded(examples, pad_id, backbone.vocab_size, batch_size)
    scored = sum(len(w) - 1 for w in windows)
    description = (
        f"causal LM: the first {len(stream):,} tokens of the held-out text ({len(lines)} lines joined with "
        f"newlines, no special tokens) in {len(windows)} non-overlapping windows of {window} tokens; "
        f"perplexity = exp(mean next-token NLL over the {scored:,} predicted tokens; "
        "each window's first token is context only)"
    )
    return EvalSet(
        kind="causal",
        batches=batches,
        tokens_read=len(stream),
        tokens_scored=scored,
        examples=len(windows),
        lines_used=len(lines),
        lines_dropped=0,
        max_tokens=max_tokens,
        seed=seed,
        sequence_length=window,
        texts_sha=texts_fingerprint(texts),
        description=description,
    )


def _padded(
    examples: list[tuple[list[int], list[int]]], pad_id: int, vocab: int, batch_size: int | None
) -> tuple[EvalBatch, ...]:
    """Padded batches of ``batch_size`` examples, or else as many as fit the logits memory budget (the
    variant's and the original's logits held together)."""
    return pad_batches(
        examples,
        pad_id,
        batch_size=batch_size,
        max_padded_tokens=LOGITS_BUDGET_BYTES // (_LOGITS_HELD * vocab * 4),
    )


# -- scoring ---------------------------------------------------------------------------------------------
def score_variant(
    backbone: Backbone,
    eval_set: EvalSet,
    embedding: torch.Tensor | None = None,
    *,
    mode: Mode = "input",
    progress: ProgressCallback | None = None,
    divergence: bool = True,
    device: str | None = None,
) -> VariantPerplexity:
    """Perplexity of ``backbone`` with ``embedding`` substituted (None: the original) on ``eval_set``.

    With ``divergence`` (and a variant) the original model runs on every batch too, and the result carries
    the mean KL divergence KL(original || variant) over the full vocabulary at every scored position (nats
    per token) and the top-1 agreement; this doubles the cost. The original itself gets 0.0 and 1.0 without
    any extra work; ``divergence=False`` leaves both None for a variant. ``progress`` hears after every
    batch (``done`` batches of ``total``). ``device`` (default: where the model is) is where the model
    runs (see the module docstring).

    Raises:
        BadInputError: a device this machine cannot compute on.
    """
    start = time.perf_counter()
    target: str | torch.device = backbone.device if device is None else check_device(device)
    compare = divergence and embedding is not None
    total_nll = total_kl = 0.0
    count = agreed = 0
    with backbone.placed_on(target) as where, torch.inference_mode():
        variant = None if embedding is None else embedding.to(where)
        for index, batch in enumerate(eval_set.batches):
            ids, mask = batch.input_ids.to(where), batch.attention_mask.to(where)
            logits = backbone.logits(ids, mask, embedding=variant, mode=mode)
            reference = backbone.logits(ids, mask) if compare else None
            # One row at a time, scored positions only: the log-softmax copies stay a fraction of the logits.
            for row, labels in enumerate(batch.labels.to(where)):
                scored = labels != IGNORE_INDEX
                if not scored.any():
                    continue
                predicted = logits[row][scored]
                log_q = F.log_softmax(predicted, dim=-1)
                total_nll += float(F.nll_loss(log_q, labels[scored], reduction="sum"))
                count += int(scored.sum())
                if reference is not None:
                    kl, same = _divergence(reference[row][scored], predicted, log_q)
                    total_kl += kl
                    agreed += same
                del predicted, log_q
            del logits, reference
            batches = len(eval_set.batches)
            send(progress, Progress(index + 1, batches, f"batch {index + 1}/{batches}"))
    mean = total_nll / count
    return VariantPerplexity(
        perplexity=math.exp(mean),
        mean_nll=mean,
        tokens=count,
        seconds=time.perf_counter() - start,
        kl_nats=max(0.0, total_kl / count) if compare else (0.0 if embedding is None else None),
        top1_agreement=agreed / count if compare else (1.0 if embedding is None else None),
    )


def _divergence(
    reference_logits: torch.Tensor, logits: torch.Tensor, log_q: torch.Tensor
) -> tuple[float, int]:
    """Summed KL(original || variant) over positions (nats) and the count of positions with equal argmax.

    ``reference_logits`` and ``logits`` are (positions x V) of the original and the variant, ``log_q`` the
    variant's log-softmax.
    """
    log_p = F.log_softmax(reference_logits, dim=-1)
    kl = float(F.kl_div(log_q, log_p, reduction="sum", log_target=True))
    same = int((reference_logits.argmax(dim=-1) == logits.argmax(dim=-1)).sum())
    return kl, same


def direction_length_ablation(original: torch.Tensor, variant: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two matrices of the direction / length ablation of a variant (both V x D, the variant's dtype).

    ``"directions"``: every row with the variant's direction and the original row's length; ``"lengths"``:
    the original row's direction with the variant row's length. A row whose direction comes from a zero row
    stays zero. Each row is one rescaled row (the ratio of lengths computed in float64), so a variant equal
    to the original gives both back unchanged, bit for bit.

    Raises:
        BadInputError: the matrices differ in shape.
    """
    if original.shape != variant.shape:
        raise BadInputError(
            f"the variant has shape {tuple(variant.shape)}, the original {tuple(original.shape)}"
        )
    original_norms = torch.linalg.vector_norm(original.double(), dim=1, keepdim=True)
    variant_norms = torch.linalg.vector_norm(variant.double(), dim=1, keepdim=True)
    zero = torch.zeros((), dtype=torch.float64)
    safe_variant = torch.where(variant_norms > 0, variant_norms, 1.0)
    safe_original = torch.where(original_norms > 0, original_norms, 1.0)
    to_original = torch.where(variant_norms > 0, original_norms / safe_variant, zero)
    to_variant = torch.where(original_norms > 0, variant_norms / safe_original, zero)
    return {
        "directions": variant * to_original.to(variant.dtype),
        "lengths": original.to(variant.dtype) * to_variant.to(variant.dtype),
    }


def evaluate_perplexity(
    backbone: Backbone,
    texts: Sequence[str] | EvalSet,
    variants: Mapping[str, torch.Tensor | None] | None = None,
    *,
    mode: Mode = "input",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int = 0,
    batch_size: int | None = None,
    window: int = CAUSAL_WINDOW,
    progress: ProgressCallback | None = None,
    variant_keys: Mapping[str, str] | None = None,
    divergence: bool | Collection[str] = True,
    device: str | None = None,
) -> PerplexityReport:
    """Zero-shot perplexity of each variant (V x D replacement embedding; None = uncompressed).

    The uncompressed model is always scored, first: if no variant is None it is added as ``"original"``.
    ``texts`` may be a prebuilt :class:`EvalSet` (then ``max_tokens``, ``seed``, ``batch_size`` and
    ``window`` are taken from it). With ``variant_keys`` (variant name -> fingerprint of its embedding, e.g.
    an artifact hash) the original's result and every keyed variant's are cached on disk; without it nothing
    is cached. ``progress`` counts variants (one unit each, fractional by batch); its message names the
    variant: ``"perplexity (original) · batch 3/8"``. ``divergence`` says which variants also get the KL
    divergence from the original and the top-1 agreement (see :func:`score_variant`; it doubles a variant's
    cost): all (True), none (False) or the named ones. ``device`` (default: where the model is) is where
    the model runs; it moves there once, when the first variant not in the cache is scored, and back at the
    end. Cache keys do not include it.

    Raises:
        BadInputError: a device this machine cannot compute on (checked before anything runs), or a text
            that does not make an evaluation set.
    """
    started = time.perf_counter()
    if device is not None:
        check_device(device)
    named = with_reference(variants)
    reference = next(iter(named))
    eval_set = (
        texts
        if isinstance(texts, EvalSet)
        else build_eval_set(
            backbone, texts, max_tokens=max_tokens, seed=seed, batch_size=batch_size, window=window
        )
    )
    results: dict[str, VariantPerplexity] = {}
    placement = contextlib.ExitStack()

    def place() -> None:
        """Move the model to ``device`` before the first variant that is scored (cached ones need none)."""
        if device is not None and backbone.device != resolve_device(device):
            placement.enter_context(backbone.placed_on(device))

    with placement:
        for index, (name, embedding) in enumerate(named.items()):
            results[name] = _variant_result(
                backbone,
                eval_set,
                name,
                embedding,
                mode=mode,
                progress=nested(progress, index, index + 1, len(named), f"perplexity ({name}) · "),
                compare=divergence if isinstance(divergence, bool) else name in divergence,
                variant_keys=variant_keys,
                place=place,
                device=device,
            )
    return PerplexityReport(
        backbone=backbone.name,
        kind=backbone.kind,
        mode=mode,
        protocol=eval_set.description,
        settings=eval_set.settings(),
        results=results,
        reference=reference,
        seconds=time.perf_counter() - started,
    )


def _variant_result(
    backbone: Backbone,
    eval_set: EvalSet,
    name: str,
    embedding: torch.Tensor | None,
    *,
    mode: Mode,
    progress: ProgressCallback,
    compare: bool,
    variant_keys: Mapping[str, str] | None,
    place: Callable[[], None],
    device: str | None,
) -> VariantPerplexity:
    """One variant's result for :func:`evaluate_perplexity`: from the disk cache when keyed, else scored
    (after ``place()`` has put the model on ``device``)."""

    def compute() -> VariantPerplexity:
        place()
        return score_variant(
            backbone, eval_set, embedding, mode=mode, progress=progress, divergence=compare, device=device
        )

    key = None
    if variant_keys is not None:
        key = "uncompressed" if embedding is None else variant_keys.get(name)
    if key is None:
        return compute()
    config = perplexity_cache_config(
        backbone, eval_set, key, "any" if embedding is None else mode, divergence=compare or embedding is None
    )
    result = cached_perplexity(config, compute)
    if result.cached:
        progress(Progress(1, 1, "cached"))
    return result


def with_reference(variants: Mapping[str, torch.Tensor | None] | None) -> dict[str, torch.Tensor | None]:
    """The variants with the uncompressed entry first (added as ``"original"`` when none is None)."""
    named = dict(variants or {})
    reference = next((name for name, value in named.items() if value is None), None)
    if reference is None:
        if REFERENCE in named:
            raise BadInputError(f"the variant name {REFERENCE!r} is reserved for the uncompressed model")
        reference = REFERENCE
    named.pop(reference, None)
    return {reference: None, **named}


def perplexity_cache_config(
    backbone: Backbone, eval_set: EvalSet, variant_key: str, mode: str, *, divergence: bool = True
) -> dict[str, Any]:
    """The full configuration a cached perplexity is keyed by (``divergence``: KL and agreement included)."""
    return {
        "protocol": PROTOCOL_VERSION,
        "divergence": divergence,
        "backbone": backbone.name,
        "source": backbone.source,
        "kind": eval_set.kind,
        "variant": variant_key,
        "mode": mode,
        "max_tokens": eval_set.max_tokens,
        "seed": eval_set.seed,
        "sequence_length": eval_set.sequence_length,
        "texts_sha": eval_set.texts_sha,
    }


# -- disk cache ------------------------------------------------------------------------------------------
def cached_perplexity(
    key_config: Mapping[str, Any], compute: Callable[[], VariantPerplexity]
) -> VariantPerplexity:
    """The cached result for ``key_config`` (its full configuration), else ``compute()`` stored atomically.

    A missing, corrupt or mismatching entry is recomputed and overwritten; a hit has ``cached=True``. An
    entry without a KL divergence does not answer a configuration with ``"divergence": True``.
    """
    config = json.loads(json.dumps(dict(key_config), sort_keys=True, default=str))
    folder = optional_cache_dir("perplexity")
    if folder is None:
        return compute()
    path = folder / f"{config_key(config)}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry["config"] == config:
            stored = entry["result"]
            kl, agreement = stored.get("kl_nats"), stored.get("top1_agreement")
            if not (config.get("divergence") and (kl is None or agreement is None)):
                return VariantPerplexity(
                    perplexity=float(stored["perplexity"]),
                    mean_nll=float(stored["mean_nll"]),
                    tokens=int(stored["tokens"]),
                    seconds=float(stored["seconds"]),
                    cached=True,
                    kl_nats=None if kl is None else float(kl),
                    top1_agreement=None if agreement is None else float(agreement),
                )
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no entry yet, or unreadable: recompute below
    result = compute()
    entry = {"config": config, "result": {**asdict(result), "cached": False}}
    write_if_possible(path, json.dumps(entry, indent=2, sort_keys=True).encode())
    return result


# -- presentation ----------------------------------------------------------------------------------------
def perplexity_table(report: PerplexityReport) -> list[dict[str, Any]]:
    """One row per variant (reference first): perplexity, ratio to the uncompressed model, tokens, time,
    cached, KL divergence from the original (nats per token) and top-1 agreement (None: not computed)."""
    reference = report.results[report.reference].perplexity
    return [
        {
            "variant": name,
            "perplexity": round(result.perplexity, 3),
            "x original": round(result.perplexity / reference, 3),
            "tokens": result.tokens,
            "seconds": round(result.seconds, 2),
            "cached": result.cached,
            "KL (nats)": None if result.kl_nats is None else round(result.kl_nats, 4),
            "top-1 agreement": None if result.top1_agreement is None else round(result.top1_agreement, 4),
        }
        for name, result in report.results.items()
    ]


__all__ = [
    "DEFAULT_MAX_TOKENS",
    "PROTOCOL_VERSION",
    "EvalSet",
    "PerplexityReport",
    "VariantPerplexity",
    "build_eval_set",
    "cached_perplexity",
    "direction_length_ablation",
    "evaluate_perplexity",
    "perplexity_cache_config",
    "perplexity_table",
    "score_variant",
    "special_frame",
    "with_reference",
]
