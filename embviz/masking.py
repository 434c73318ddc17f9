"""BERT-style whole-word masking and padded batches, shared by the perplexity protocol and the MLM-head fit.

Words are drawn in random order until :data:`MASK_RATE` of a line's tokens are selected (a word is never
split to hit the target exactly); each selected token becomes the mask token (80%), a random non-special
token (10%) or stays (10%), as in Hugging Face's ``DataCollatorForWholeWordMask``. Labels hold the original
token at selected positions and :data:`IGNORE_INDEX` everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MASK_RATE = 0.15
IGNORE_INDEX = -100
"""The label of a position that is not scored (PyTorch's cross-entropy default)."""

Example = tuple[list[int], list[int]]
"""One sequence: (input ids, labels)."""


@dataclass(frozen=True)
class EvalBatch:
    """Padded inputs plus, per position, the token its logits must predict (``-100``: not scored)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def word_groups(
    encoded: Any, index: int, ids: list[int], tokenizer: Any, special: frozenset[int], shift: int
) -> list[list[int]]:
    """Positions (plus ``shift``) of each whole word of one line's ``ids``, special tokens excluded, in order.

    ``encoded`` is the tokenizer's output for a list of lines and ``index`` this line's place in it.
    """
    if getattr(encoded, "is_fast", False):
        word_ids = encoded.word_ids(index)[: len(ids)]
        # Consecutive pieces of one word share a word id.
        starts = [p == 0 or word_ids[p] is None or word_ids[p] != word_ids[p - 1] for p in range(len(ids))]
    else:
        # Slow tokenizers: WordPiece marks a word's continuation pieces with a leading '##'.
        tokens = tokenizer.convert_ids_to_tokens(ids)
        starts = [p == 0 or not token.startswith("##") for p, token in enumerate(tokens)]
    groups: list[list[int]] = []
    for position, token_id in enumerate(ids):
        if token_id in special:
            continue
        if starts[position] or not groups or groups[-1][-1] != position - 1 + shift:
            groups.append([])
        groups[-1].append(position + shift)
    return groups


def mask_line(
    ids: list[int],
    words: list[list[int]],
    rng: np.random.Generator,
    mask_id: int,
    random_pool: np.ndarray,
    rate: float = MASK_RATE,
) -> Example:
    """Whole-word masking of one line: (corrupted input ids, labels with -100 where not scored). ``rate`` is
    the share of tokens selected (the perplexity protocol always uses :data:`MASK_RATE`)."""
    content = sum(len(word) for word in words)
    target = max(1, round(content * rate))
    chosen: list[int] = []
    for w in rng.permutation(len(words)):
        if len(chosen) >= target:
            break
        if len(chosen) + len(words[w]) > target:  # never split a word to hit the target exactly
            continue
        chosen.extend(words[w])
    chosen.sort()
    draws = rng.random(len(chosen))
    replacements = rng.choice(random_pool, size=len(chosen))
    inputs, labels = list(ids), [IGNORE_INDEX] * len(ids)
    for position, draw, replacement in zip(chosen, draws, replacements, strict=True):
        labels[position] = ids[position]
        if draw < 0.8:
            inputs[position] = mask_id
        elif draw < 0.9:
            inputs[position] = int(replacement)
    return inputs, labels


def pad_batches(
    examples: list[Example],
    pad_id: int,
    *,
    batch_size: int | None = None,
    max_padded_tokens: int | None = None,
) -> tuple[EvalBatch, ...]:
    """Length-sorted padded batches of ``batch_size`` examples, or else of at most ``max_padded_tokens``
    (rows x longest row) each; with neither, one batch."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    groups: list[list[int]] = [[]]
    for i in order:
        longest = len(examples[i][0])  # sorted, so the newest example is the longest of its group
        if groups[-1] and (
            len(groups[-1]) == batch_size
            or (
                batch_size is None
                and max_padded_tokens is not None
                and (len(groups[-1]) + 1) * longest > max_padded_tokens
            )
        ):
            groups.append([])
        groups[-1].append(i)
    batches = []
    for group in groups:
        width = max(len(examples[i][0]) for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            inputs, targets = examples[i]
            ids[row, : len(inputs)] = torch.tensor(inputs)
            labels[row, : len(targets)] = torch.tensor(targets)
            mask[row, : len(inputs)] = 1
        batches.append(EvalBatch(ids, mask, labels))
    return tuple(batches)


__all__ = [
    "IGNORE_INDEX",
    "MASK_RATE",
    "EvalBatch",
    "Example",
    "mask_line",
    "pad_batches",
    "word_groups",
]
