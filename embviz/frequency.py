"""Row weights for frequency-aware compressors: how often text uses each token of the vocabulary.

Perplexity is dominated by frequent tokens, so a compressor that spends its budget where the text is gets
far more out of it (weighted SVD, a frequency-weighted AE loss, mixed-precision rows, direction VQ). Three
sources, none of which ever sees a slice that is scored (SPEC §2, held-out domains):

- ``general`` (the default): ``wordfreq``'s counts plus the token counts of the backbone-generated everyday
  text (the ``smollm`` corpus's ``train`` slice, :func:`generated_counts`), each per million. wordfreq lists
  words only, so line breaks, quotes, brackets, colons and the like (among the most frequent tokens of any
  text: 10-20% of the tokens of Python's documentation) sit at its add-one floor; the generated text
  counts them, the line breaks between its paragraphs included (:func:`train_counts`). Neither source has
  seen a scored text.
- ``wordfreq``: general English word frequencies from the ``wordfreq`` package, mapped to
  token ids with the backbone's own tokenizer (:func:`wordfreq_counts`). It has seen none of the bundled
  corpora, so in-domain and out-of-domain scores are equally fair.
- ``corpora``: token counts in the ``train`` slices of the bundled fitting corpora (:func:`train_counts`,
  cached per vocabulary by :func:`embviz.metrics.corpus_frequencies`); in-domain for ``bible`` /
  ``shakespeare`` / ``britannica`` scores.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from embviz.backbones import Backbone
from embviz.cache import cached_arrays, config_key, optional_cache_dir, sha256_bytes
from embviz.compressors.weights import RowWeights
from embviz.corpora import FITTING_CORPORA
from embviz.errors import BadInputError
from embviz.metrics import corpus_frequencies
from embviz.vocab import WORD_START_MARKERS

WeightSource = Literal["general", "wordfreq", "corpora"]
WEIGHT_SOURCES: tuple[WeightSource, ...] = ("general", "wordfreq", "corpora")
DEFAULT_WEIGHT_SOURCE: WeightSource = "general"
"""Weights that never saw any scored text (published tables use these)."""
WEIGHT_CORPORA: tuple[str, ...] = FITTING_CORPORA
"""Corpora whose ``train`` slices are counted by the ``corpora`` source (all but the held-out domains)."""
DEFAULT_POWER = 1.0
"""Weight = (count + 1) ** power; 1 weights rows by how often they occur (best measured perplexity)."""
WORDFREQ_TOP_N = 30_000
"""English words (most frequent first) that :func:`wordfreq_counts` tokenises: down to about one use per
million words, where a word's mass falls under the add-one floor of the weights."""
WORDFREQ_FORMS: tuple[tuple[str, float], ...] = (
    (" {word}", 0.89),  # mid-sentence, after a space
    (" {Word}", 0.08),  # capitalised after a space: sentence starts, names, titles
    ("{Word}", 0.03),  # at the start of a line or text
)
"""How a word occurs in running text, with the share of its occurrences each form gets."""
WORDFREQ_PUNCTUATION: tuple[tuple[str, float], ...] = ((",", 0.06), (".", 0.05))
"""Marks that follow a word, per word of English prose (about one comma in 17 words, one sentence in 20)."""
WORDFREQ_FALLBACK_SHARE = 0.01
"""A row no listed word reaches gets this share of the frequency of the word it spells (a rare surface form
such as ``ĠTHE``; 0 for a row that spells no English word)."""
_WORDFREQ_CACHE_VERSION = 1
_WORDFREQ_MEMO: dict[str, np.ndarray] = {}


def train_counts(backbone: Backbone, corpora: Sequence[str] = WEIGHT_CORPORA) -> np.ndarray:
    """How often each token occurs in the ``train`` slices of ``corpora`` read as a model reads them, their
    units joined by line breaks (:func:`~embviz.metrics.corpus_frequencies`; int64, one per vocabulary row)."""
    counts = np.zeros(backbone.vocab_size, dtype=np.int64)
    for corpus in corpora:
        counts += corpus_frequencies(backbone.tokenizer, backbone.tokens, corpus, "train")[
            : backbone.vocab_size
        ]
    return counts


GENERATED_CORPUS = "smollm"
"""The backbone-generated everyday text (:mod:`embviz.textgen`) whose ``train`` slice the ``general`` source
counts; its ``test`` slice is scored only in the BERT track, by methods that take no row weights."""


def generated_counts(backbone: Backbone) -> np.ndarray:
    """How often each token occurs per million tokens of the generated everyday text's ``train`` slice."""
    counts = train_counts(backbone, (GENERATED_CORPUS,)).astype(np.float64)
    return counts * (1e6 / max(1.0, float(counts.sum())))


def _wordfreq_version() -> str:
    return importlib.metadata.version("wordfreq")


def spelled_word(token: str) -> str:
    """The word a vocabulary entry spells: word-boundary markers (``Ġ``, ``▁``, ``##``) stripped, lowercased."""
    for marker in (*WORD_START_MARKERS, "##"):
        token = token.removeprefix(marker)
    return token.strip().lower()


def _written_form(word: str) -> str:
    """wordfreq lists words lowercased; the pronoun I (and I'm, I've, ...) is always written capitalised."""
    return "I" + word[1:] if word == "i" or word.startswith("i'") else word


def _encode(backbone: Backbone, texts: list[str]) -> list[list[int]]:
    return backbone.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _compute_wordfreq_counts(backbone: Backbone, top_n: int) -> np.ndarray:
    import wordfreq

    vocab = backbone.vocab_size
    listed = wordfreq.top_n_list("en", top_n)
    table = wordfreq.get_frequency_dict("en")
    frequencies = np.array([table.get(word, 0.0) for word in listed], dtype=np.float64)
    words = [_written_form(word) for word in listed]
    counts = np.zeros(vocab, dtype=np.float64)

    def add(ids: list[int], mass: float) -> None:
        for i in ids:
            if 0 <= i < vocab:
                counts[i] += mass

    for form, share in WORDFREQ_FORMS:
        texts = [form.format(word=word, Word=word[:1].upper() + word[1:]) for word in words]
        encoded = _encode(backbone, texts)
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        ids = np.fromiter((i for row in encoded for i in row), dtype=np.int64)
        mass = np.repeat(frequencies * share, lengths)
        inside = (ids >= 0) & (ids < vocab)
        counts += np.bincount(ids[inside], weights=mass[inside], minlength=vocab)
    # A mark after a word: the tokens " the," adds to " the" (robust to tokenizers that mark word starts).
    total = float(frequencies.sum())
    probe = _encode(backbone, [" the", *(f" the{mark}" for mark, _ in WORDFREQ_PUNCTUATION)])
    for (_, rate), marked in zip(WORDFREQ_PUNCTUATION, probe[1:], strict=True):
        tail = marked[len(probe[0]) :] if marked[: len(probe[0])] == probe[0] else marked
        add(tail, rate * total)
    unreached = np.flatnonzero(counts == 0)
    tokens = backbone.tokens
    for row in unreached:
        word = spelled_word(tokens[row])
        if word:
            counts[row] = WORDFREQ_FALLBACK_SHARE * wordfreq.word_frequency(word, "en")
    return counts * 1e6


def wordfreq_counts(backbone: Backbone, top_n: int = WORDFREQ_TOP_N) -> np.ndarray:
    """Expected occurrences of each token per million words of general English (float64, one per row).

    wordfreq's ``top_n`` English words, each in the forms of :data:`WORDFREQ_FORMS` (mid-sentence, capitalised,
    line-initial), are tokenised with the backbone's tokenizer, and each word's frequency (times the form's
    share) is added to every token of its tokenisation, so word pieces get the mass of all the words they
    build. The marks of :data:`WORDFREQ_PUNCTUATION` (wordfreq counts no punctuation) get their rate times the
    listed words' total frequency. A row no listed word reaches gets :data:`WORDFREQ_FALLBACK_SHARE` of
    ``wordfreq.word_frequency`` of the word it spells (:func:`spelled_word`), else 0. Cached per vocabulary,
    ``top_n`` and wordfreq version.
    """
    if top_n < 1:
        raise BadInputError(f"top_n must be at least 1, got {top_n}")
    tokens = backbone.tokens
    config = {
        "v": _WORDFREQ_CACHE_VERSION,
        "vocab": sha256_bytes("\x00".join(tokens).encode()),
        "top_n": top_n,
        "forms": WORDFREQ_FORMS,
        "punctuation": WORDFREQ_PUNCTUATION,
        "fallback": WORDFREQ_FALLBACK_SHARE,
        "wordfreq": _wordfreq_version(),
    }
    key = config_key(config)
    if key in _WORDFREQ_MEMO:  # same vocabulary in this process (tests build many caches, one tokenizer)
        return _WORDFREQ_MEMO[key].copy()
    folder = optional_cache_dir("frequencies")
    path = folder / f"wordfreq-en-{key}.npz" if folder else None

    def valid(arrays: dict[str, np.ndarray]) -> bool:
        counts = arrays.get("counts")
        return counts is not None and counts.shape == (len(tokens),) and bool((counts >= 0).all())

    def compute() -> dict[str, np.ndarray]:
        return {"counts": _compute_wordfreq_counts(backbone, top_n)}

    counts = cached_arrays(path, compute, valid)["counts"]
    _WORDFREQ_MEMO[key] = counts
    return counts.copy()


def frequency_weights(
    backbone: Backbone,
    power: float = DEFAULT_POWER,
    corpora: Sequence[str] = WEIGHT_CORPORA,
    source: WeightSource = DEFAULT_WEIGHT_SOURCE,
) -> RowWeights:
    """Row weights ``(count + 1) ** power`` (add-one, so rows no text uses still count) from ``source``.

    ``general``: count = :func:`wordfreq_counts` + :func:`generated_counts`. ``wordfreq``: count =
    :func:`wordfreq_counts` (per million words of general English). ``corpora``: count = :func:`train_counts`
    of ``corpora`` (unused by the other two). The weights' ``source`` names which, and goes into artifact
    configurations and cache keys.
    """
    words = (
        f"general English word frequencies (wordfreq {_wordfreq_version()}, top {WORDFREQ_TOP_N} words "
        "tokenised)"
    )
    if source == "general":
        counts = torch.from_numpy(wordfreq_counts(backbone) + generated_counts(backbone))
        label = (
            f"{words} plus token counts of {GENERATED_CORPUS}:train (model-generated text), each per million"
        )
    elif source == "wordfreq":
        counts = torch.from_numpy(wordfreq_counts(backbone))
        label = f"{words}, per million words"
    elif source == "corpora":
        counts = torch.from_numpy(train_counts(backbone, corpora).astype(np.float64))
        label = f"token counts in the train slices of {', '.join(corpora)}"
    else:
        raise BadInputError(f"unknown weights source {source!r}; use one of {', '.join(WEIGHT_SOURCES)}")
    return RowWeights((counts + 1.0) ** power, source=label, power=power)
