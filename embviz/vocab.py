"""Finding and showing tokens: what a user types ("paris") -> a row of the embedding matrix, and back.

Byte-level BPE vocabularies (GPT-2, SmolLM2) mark a leading space with ``Ġ``; SentencePiece uses ``▁``;
WordPiece (BERT) marks continuations with ``##``. Users type plain words, so lookups try the word as a whole
token first (with a leading-space marker), then exactly as typed, then case-insensitively.
"""

from __future__ import annotations

from collections.abc import Sequence

from embviz.errors import BadInputError

WORD_START_MARKERS = ("Ġ", "▁")


def display_token(token: str) -> str:
    """A readable form of a vocabulary entry: ``Ġparis`` -> ``␣paris``, ``Ċ`` -> ``↵``."""
    for marker in WORD_START_MARKERS:
        if token.startswith(marker) and len(token) > 1:
            return "␣" + token[len(marker) :]
    return token.replace("Ċ", "↵").replace("ĉ", "⇥") or "∅"


def visible_text(text: str) -> str:
    """Decoded text with invisible characters shown: newline ``↵``, tab ``⇥``, a space-only text ``␣``."""
    shown = text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return shown.replace(" ", "␣") if shown and not shown.strip() else shown or "∅"


def _candidates(query: str) -> list[str]:
    return [marker + query for marker in WORD_START_MARKERS] + [query]


def find_token(tokens: Sequence[str], query: str, index: dict[str, int] | None = None) -> int:
    """The row id for ``query`` (a token or a word), preferring the word-start form.

    Accepts ``#123`` for a raw id. Raises :class:`BadInputError` with suggestions when nothing matches.
    """
    query = query.strip()
    if not query:
        raise BadInputError("type a token to focus on")
    digits = query[1:]
    if query.startswith("#") and digits.isascii() and digits.isdigit():  # ASCII only: int('²') fails
        if len(digits) > 18 or int(digits) >= len(tokens):
            raise BadInputError(f"token id {digits[:20]} is outside the vocabulary (0..{len(tokens) - 1})")
        return int(digits)
    index = index if index is not None else {token: i for i, token in enumerate(tokens)}
    if query.startswith("␣"):
        query = query[1:]
    for candidate in _candidates(query):
        if candidate in index:
            return index[candidate]
    lowered = query.lower()
    for candidate in _candidates(lowered):
        if candidate in index:
            return index[candidate]
    hints = suggest(tokens, query, limit=5)
    hint = f"; close matches: {', '.join(hints)}" if hints else ""
    raise BadInputError(f"{query!r} is not a single token of this vocabulary{hint}")


def suggest(tokens: Sequence[str], query: str, limit: int = 20) -> list[str]:
    """Display forms of tokens that start with ``query``, shortest first, for autocompletion."""
    query = query.strip().lower().removeprefix("␣")
    if not query:
        return []
    matches = []
    for token in tokens:
        shown = display_token(token)
        if shown.removeprefix("␣").removeprefix("##").lower().startswith(query):
            matches.append(shown)
    return sorted(matches, key=lambda shown: (len(shown.removeprefix("␣")), shown))[:limit]
