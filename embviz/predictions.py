"""Fill-in-the-blank predictions of the original and compressed embeddings, side by side.

The user types a sentence with one blank (``___``, ``[MASK]``, ``<mask>`` or the tokenizer's mask token).

* **Masked LMs**: native fill-mask at the blank (one token); probabilities are the softmax over the whole
  vocabulary with special tokens excluded.
* **Causal LMs** (SPEC §2): a variant's candidates are the *original* model's top ``candidates`` (50) next
  tokens at the blank given the left context, united with the variant's *own* top ``variant_candidates``
  (default: ``k``) -- so every variant is judged on the words the uncompressed model finds plausible (and
  the original's favourite always gets a rank), and whatever the variant itself would put in a plain top-k
  is eligible too. Each candidate is scored by the variant's log-likelihood of the whole sentence (left +
  candidate + right); the left context is common to all candidates, so only ``log p(candidate | left) +
  log p(right | left, candidate)`` matters. Probabilities are the softmax of those scores over the variant's
  candidate set. The candidate sentences share the left context: it is run once and its key/value cache
  reused, so the cost is about candidates x (right context + 1) tokens per variant.

Long input is cut to a window around the blank (the model's limit for masked models; 128 tokens for causal
models, whose re-ranking runs one sequence per candidate) and the result says so.
"""

from __future__ import annotations

import copy
import inspect
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from embviz.backbones import Backbone, Kind, Mode
from embviz.errors import BadInputError
from embviz.perplexity import (
    LOGITS_BUDGET_BYTES,
    MASKED_MAX_LENGTH,
    REFERENCE,
    model_max_length,
    special_frame,
    with_reference,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_K = 10
DEFAULT_CANDIDATES = 50
CAUSAL_CONTEXT = 128  # tokens around the blank for causal re-ranking (cost grows with candidates x length)
_BLANK = r"_{3,}|(?i:\[mask\]|<mask>)"


@dataclass(frozen=True)
class Blank:
    """A sentence split at its one blank: ``left + marker + right`` is the sentence."""

    left: str
    marker: str
    right: str

    def text(self, fill: str | None = None) -> str:
        """The sentence, with the blank replaced by ``fill`` (default: the original marker)."""
        return self.left + (self.marker if fill is None else fill) + self.right


def blank_pattern(mask_token: str | None = None) -> re.Pattern[str]:
    """What counts as a blank: three or more underscores, ``[MASK]``/``<mask>`` (any case), ``mask_token``."""
    extra = f"|{re.escape(mask_token)}" if mask_token else ""
    return re.compile(_BLANK + extra)


def parse_blank(sentence: str, mask_token: str | None = None) -> Blank:
    """Split ``sentence`` at its blank.

    Raises:
        BadInputError: no blank, or more than one.
    """
    found = list(blank_pattern(mask_token).finditer(sentence))
    if not found:
        raise BadInputError("the sentence has no blank: mark the missing word with ___ or [MASK]")
    if len(found) > 1:
        markers = ", ".join(repr(match.group()) for match in found[:5])
        raise BadInputError(f"the sentence has {len(found)} blanks ({markers}); mark exactly one")
    match = found[0]
    return Blank(sentence[: match.start()], match.group(), sentence[match.end() :])


@dataclass(frozen=True)
class Prediction:
    """One filled-in token: ``token`` is its decoded text (byte-level markers such as 'Ġ' become spaces)."""

    token: str
    token_id: int
    probability: float
    new: bool = False  # absent from the reference's top-k


@dataclass(frozen=True)
class VariantPredictions:
    """A variant's top-k, compared with the reference (uncompressed) top-k."""

    name: str
    predictions: tuple[Prediction, ...]
    top1_kept: bool
    reference_top1_rank: int | None  # 1-based rank of the reference's top-1 here; None: not in the top-k
    lost: tuple[str, ...]  # reference top-k tokens missing here
    candidates: int  # tokens the probabilities are normalised over
    seconds: float
    kl_nats: float = 0.0
    """KL(original || variant) of the full-vocabulary distributions at the blank, in nats (special tokens
    excluded; causal models: the next-token distribution given the left context)."""


@dataclass(frozen=True)
class PredictionResult:
    """Predictions for one sentence, per variant; ``reference`` names the uncompressed model's entry."""

    backbone: str
    kind: Kind
    mode: Mode
    sentence: str
    blank: Blank
    context: str
    k: int
    method: str
    notices: tuple[str, ...]
    variants: dict[str, VariantPredictions]
    reference: str = REFERENCE
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (for ``--json`` and exports)."""
        payload = asdict(self)
        payload["seconds"] = round(self.seconds, 3)
        return payload


@dataclass(frozen=True)
class _Scored:
    """Candidate ids and their (unnormalised) log-scores for one variant."""

    ids: torch.Tensor
    scores: torch.Tensor
    vocabulary: torch.Tensor
    """Log-probabilities over the whole vocabulary at the blank (-inf for special tokens)."""


def predict_blank(
    backbone: Backbone,
    sentence: str,
    variants: Mapping[str, torch.Tensor | None] | None = None,
    *,
    k: int = DEFAULT_K,
    mode: Mode = "input",
    candidates: int = DEFAULT_CANDIDATES,
    variant_candidates: int | None = None,
    max_context: int | None = None,
) -> PredictionResult:
    """Top-``k`` fillers of the blank in ``sentence`` for each variant (None = the uncompressed model).

    The uncompressed model is always included and first (added as ``"original"`` when no variant is None).
    Causal models only: ``candidates`` is how many of the original's next-token candidates every variant
    re-ranks, ``variant_candidates`` (default ``k``) how many of its own it adds. ``max_context`` caps the
    tokens kept around the blank.

    Raises:
        BadInputError: no blank / several blanks, bad ``k``, or a blank with no context a causal model can use.
    """
    if not 1 <= k <= backbone.vocab_size:
        raise BadInputError(f"k must be between 1 and {backbone.vocab_size} (the vocabulary size), got {k}")
    if candidates < 1 or (variant_candidates is not None and variant_candidates < 0):
        raise BadInputError("candidates must be at least 1 and variant_candidates at least 0")
    started = time.perf_counter()
    tokenizer = backbone.tokenizer
    blank = parse_blank(sentence, tokenizer.mask_token)
    named = with_reference(variants)
    reference = next(iter(named))
    job: _MaskedScorer | _CausalScorer
    if backbone.kind == "masked":
        job = _MaskedScorer(backbone, blank, mode, max_context)
    else:
        own = k if variant_candidates is None else variant_candidates
        job = _CausalScorer(backbone, blank, mode, max_context, candidates, own)

    results: dict[str, VariantPredictions] = {}
    reference_top: list[int] = []
    reference_vocabulary: torch.Tensor | None = None
    for name, embedding in named.items():
        start = time.perf_counter()
        scored = job.score(embedding)
        if reference_vocabulary is None:
            reference_vocabulary = scored.vocabulary
        probabilities = torch.softmax(scored.scores.double(), dim=0)
        order = torch.argsort(probabilities, descending=True, stable=True)[:k]
        ids = [int(scored.ids[i]) for i in order]
        if name == reference:
            reference_top = ids
        predictions = tuple(
            Prediction(
                token=_display(tokenizer, token_id),
                token_id=token_id,
                probability=float(probabilities[i]),
                new=token_id not in reference_top,
            )
            for token_id, i in zip(ids, order.tolist(), strict=True)
        )
        rank = ids.index(reference_top[0]) + 1 if reference_top and reference_top[0] in ids else None
        results[name] = VariantPredictions(
            name=name,
            predictions=predictions,
            top1_kept=rank == 1,
            reference_top1_rank=rank,
            lost=tuple(_display(tokenizer, i) for i in reference_top if i not in ids),
            candidates=len(scored.ids),
            seconds=time.perf_counter() - start,
            kl_nats=kl_divergence(reference_vocabulary, scored.vocabulary),
        )
    return PredictionResult(
        backbone=backbone.name,
        kind=backbone.kind,
        mode=mode,
        sentence=sentence,
        blank=blank,
        context=job.context,
        k=k,
        method=job.method,
        notices=tuple(job.notices),
        variants=results,
        reference=reference,
        seconds=time.perf_counter() - started,
    )


def kl_divergence(reference: torch.Tensor, variant: torch.Tensor) -> float:
    """KL(reference || variant) in nats between two log-probability vectors (-inf entries: probability 0)."""
    p = reference.double().exp()
    terms = torch.where(p > 0, p * (reference.double() - variant.double()), torch.zeros_like(p))
    return max(0.0, float(terms.sum()))


def _display(tokenizer: Any, token_id: int) -> str:
    """The token as text; a byte-level piece of a multi-byte character shows as its raw piece."""
    text = tokenizer.decode([token_id])
    return tokenizer.convert_ids_to_tokens(token_id) if "\ufffd" in text else text


def _split_room(before: int, after: int, room: int, share: float) -> tuple[int, int]:
    """Tokens to keep before and after the blank: ``share`` of ``room`` before it, unless one side is short."""
    keep_before = min(before, max(round(room * share), room - after))
    return keep_before, min(after, room - keep_before)


def _truncation_notice(total: int, before: int, after: int, limit: int, reason: str) -> str:
    return (
        f"long input: the sentence is {total:,} tokens; kept {before:,} before the blank and {after:,} "
        f"after it ({reason}: {limit:,} tokens)"
    )


def _special_mask(backbone: Backbone) -> torch.Tensor:
    mask = torch.zeros(backbone.vocab_size, dtype=torch.bool)
    mask[list(backbone.special_ids)] = True
    return mask


class _MaskedScorer:
    """Native fill-mask: one forward pass per variant, logits at the mask position."""

    def __init__(self, backbone: Backbone, blank: Blank, mode: Mode, max_context: int | None) -> None:
        tokenizer = backbone.tokenizer
        if tokenizer.mask_token_id is None:
            raise BadInputError(f"{backbone.name} has no mask token to fill")
        self.backbone, self.mode, self.notices = backbone, mode, []
        limit = min(max_context or MASKED_MAX_LENGTH, model_max_length(backbone, MASKED_MAX_LENGTH))
        leading, trailing = special_frame(tokenizer)
        # The mask stands for a whole word with its leading space (byte-level vocabularies: 'Ġword').
        left = tokenizer(blank.left.rstrip(), add_special_tokens=False, verbose=False)["input_ids"]
        right = tokenizer(blank.right, add_special_tokens=False, verbose=False)["input_ids"]
        room = limit - len(leading) - len(trailing) - 1
        if room < 0:
            raise BadInputError(f"max_context {limit} is too small for {backbone.name}")
        if len(left) + len(right) > room:
            keep_left, keep_right = _split_room(len(left), len(right), room, 0.5)
            self.notices.append(
                _truncation_notice(
                    len(left) + len(right) + 1, keep_left, keep_right, limit, "the model's limit"
                )
            )
            left, right = left[len(left) - keep_left :], right[:keep_right]
        self.position = len(leading) + len(left)
        self.ids = torch.tensor([[*leading, *left, tokenizer.mask_token_id, *right, *trailing]])
        self.context = _decode(tokenizer, self.ids[0].tolist())
        self.excluded = _special_mask(backbone)
        self.method = (
            "masked LM: fill-mask at the blank (one token); probabilities over the whole vocabulary, "
            "special tokens excluded"
        )

    def score(self, embedding: torch.Tensor | None) -> _Scored:
        logits = self.backbone.logits(self.ids, embedding=embedding, mode=self.mode)[0, self.position]
        logits = logits.masked_fill(self.excluded, float("-inf"))
        return _Scored(torch.arange(len(logits)), logits, torch.log_softmax(logits.double(), dim=0))


class _CausalScorer:
    """Next-token candidates at the blank, re-ranked by the whole sentence's likelihood."""

    def __init__(
        self, backbone: Backbone, blank: Blank, mode: Mode, max_context: int | None, candidates: int, own: int
    ) -> None:
        tokenizer = backbone.tokenizer
        self.backbone, self.mode, self.top, self.own, self.notices = backbone, mode, candidates, own, []
        limit = min(max_context or CAUSAL_CONTEXT, model_max_length(backbone, CAUSAL_CONTEXT))
        # The filler carries its own leading space (byte-level BPE: 'Ġstore'), so the left context ends at
        # the last non-space character.
        left_text = blank.left.rstrip() if blank.left[-1:].isspace() else blank.left
        leading, _ = special_frame(tokenizer)
        left = tokenizer(left_text, add_special_tokens=False, verbose=False)["input_ids"]
        right = tokenizer(blank.right, add_special_tokens=False, verbose=False)["input_ids"]
        room = limit - len(leading) - 1
        if room < 1:
            raise BadInputError(f"max_context {limit} is too small for {backbone.name}")
        if len(left) + len(right) > room:
            keep_left, keep_right = _split_room(len(left), len(right), room, 0.75)
            self.notices.append(
                _truncation_notice(
                    len(left) + len(right) + 1, keep_left, keep_right, limit, "the prediction context"
                )
            )
            left, right = left[len(left) - keep_left :], right[:keep_right]
            leading = []  # the kept window starts mid-text: no start-of-text marker
        left = [*leading, *left]
        if not left:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is None:
                raise BadInputError(f"{backbone.name} needs some text before the blank")
            left = [start]
        self.left, self.right = torch.tensor([left]), torch.tensor(right)
        gap = " " if left_text != blank.left else ""
        self.context = _decode(tokenizer, left) + gap + "___" + _decode(tokenizer, right)
        self.excluded = _special_mask(backbone)
        self.reference_ids: torch.Tensor | None = None
        self.cache_argument = _cache_argument(backbone.model)
        self.method = (
            f"causal LM: the original model's top {candidates} next tokens at the blank plus the variant's own "
            f"top {own}, re-ranked by the variant's likelihood of the whole sentence; probabilities are a "
            "softmax over those candidates"
        )

    def score(self, embedding: torch.Tensor | None) -> _Scored:
        """The first call must be the reference (its candidates are shared with every later variant)."""
        logits, prefix = self._left_pass(embedding)
        next_token = torch.log_softmax(logits.double(), dim=0).masked_fill(self.excluded, float("-inf"))
        allowed = int((~self.excluded).sum())
        if self.reference_ids is None:
            self.reference_ids = torch.topk(next_token, min(self.top, allowed)).indices
            ids = self.reference_ids
        else:
            own = torch.topk(next_token, min(self.own, allowed)).indices
            ids = torch.cat([self.reference_ids, own[~torch.isin(own, self.reference_ids)]])
        vocabulary = torch.log_softmax(logits.double().masked_fill(self.excluded, float("-inf")), dim=0)
        return _Scored(ids, next_token[ids] + self._right_loglik(ids, embedding, prefix), vocabulary)

    def _right_loglik(
        self, ids: torch.Tensor, embedding: torch.Tensor | None, prefix: Any | None
    ) -> torch.Tensor:
        """log p(right context | left, candidate) for each candidate, in memory-bounded chunks.

        Every candidate sentence is ``left + candidate + right`` with a one-token candidate, so they all have
        the same length (no padding) and share ``left``: where the model supports it, ``left`` is run once
        and its key/value cache (``prefix``, from :meth:`_left_pass`) is reused by every candidate.
        """
        span = len(self.right)
        if span == 0:
            return torch.zeros(len(ids), dtype=torch.float64)
        targets = self.right[None, :]
        start = 0 if prefix is not None else self.left.shape[1]
        length = start + span  # the right context's last token is only a target, never an input
        chunk = max(1, LOGITS_BUDGET_BYTES // (length * self.backbone.vocab_size * 4))
        totals = []
        for piece in ids.split(chunk):
            rows = len(piece)
            tail = torch.cat([piece[:, None], targets[:, :-1].expand(rows, -1)], dim=1)
            if prefix is None:
                batch = torch.cat([self.left.expand(rows, -1), tail], dim=1)
                logits = self.backbone.logits(batch, embedding=embedding, mode=self.mode)[:, start:]
            else:
                logits = self._continue(prefix, tail, embedding)
            # log p(target) = logit(target) - logsumexp(logits): no rows x n x V log-softmax (nor its float64
            # copy) is built, only the normaliser and the gathered logits.
            chosen = logits.gather(-1, targets.expand(rows, -1)[..., None])[..., 0]
            totals.append((chosen.double() - torch.logsumexp(logits, dim=-1).double()).sum(-1))
        return torch.cat(totals)

    def _call_model(self, embedding: torch.Tensor | None, ids: torch.Tensor, **kwargs: Any) -> Any:
        """The model's output with its key/value cache (prefix sharing needs it; logits alone do not)."""
        return self.backbone.forward(ids, embedding=embedding, mode=self.mode, use_cache=True, **kwargs)

    def _left_pass(self, embedding: torch.Tensor | None) -> tuple[torch.Tensor, Any | None]:
        """One forward pass over ``left``: the next-token logits at the blank and the key/value cache of
        ``left`` under ``embedding`` (None where the model cannot share one)."""
        if self.cache_argument is None:
            return self.backbone.logits(self.left, embedding=embedding, mode=self.mode)[0, -1], None
        output = self._call_model(embedding, self.left)
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        return output.logits[0, -1], cache if hasattr(cache, "batch_repeat_interleave") else None

    def _continue(self, prefix: Any, tail: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        """Logits of ``tail`` (rows x n) continuing the cached ``left``; the cache itself is not modified."""
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(tail.shape[0])
        mask = torch.ones(tail.shape[0], self.left.shape[1] + tail.shape[1], dtype=torch.long)
        assert self.cache_argument is not None  # _left_pass hands out a prefix only when there is one
        return self._call_model(embedding, tail, attention_mask=mask, **{self.cache_argument: cache}).logits


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """The text of one sequence of ids (``decode`` is typed for batches too, which give a list)."""
    return cast(str, tokenizer.decode(ids))


def _cache_argument(model: torch.nn.Module) -> str | None:
    """The forward() argument that takes a key/value cache (renamed in transformers 5), if any."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def prediction_table(result: PredictionResult) -> list[dict[str, str | int]]:
    """Rows aligned by rank, one column per variant: ``'store 31.2%'``, with ``' (new)'`` marked."""
    rows: list[dict[str, str | int]] = []
    for rank in range(result.k):
        row: dict[str, str | int] = {"rank": rank + 1}
        for name, variant in result.variants.items():
            if rank < len(variant.predictions):
                item = variant.predictions[rank]
                shown = item.token.strip() or repr(item.token)
                row[name] = f"{shown} {item.probability:.1%}" + (" (new)" if item.new else "")
            else:
                row[name] = ""
        rows.append(row)
    return rows


def prediction_summary(result: PredictionResult) -> list[dict[str, Any]]:
    """One row per variant: its top-1, whether the reference top-1 survived, its rank, new / lost tokens."""
    return [
        {
            "variant": name,
            "top1": variant.predictions[0].token.strip() if variant.predictions else "",
            "top1 kept": variant.top1_kept,
            "original top1 rank": variant.reference_top1_rank,
            "KL (nats)": round(variant.kl_nats, 4),
            "new": [p.token.strip() for p in variant.predictions if p.new],
            "lost": [token.strip() for token in variant.lost],
            "seconds": round(variant.seconds, 3),
        }
        for name, variant in result.variants.items()
    ]


__all__ = [
    "Blank",
    "Prediction",
    "PredictionResult",
    "VariantPredictions",
    "blank_pattern",
    "kl_divergence",
    "parse_blank",
    "predict_blank",
    "prediction_summary",
    "prediction_table",
]
