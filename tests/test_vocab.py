from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embviz.errors import BadInputError
from embviz.vocab import display_token, find_token, suggest, visible_text

BPE = ["<unk>", "Ġparis", "Paris", "par", "is", "Ġthe", "the", "Ċ", "Ġ"]
WORDPIECE = ["[PAD]", "[MASK]", "paris", "##is", "the", "1"]


def test_word_start_form_is_preferred() -> None:
    assert find_token(BPE, "paris") == 1
    assert find_token(BPE, "Paris") == 2
    assert find_token(BPE, "␣paris") == 1
    assert find_token(BPE, "the") == 5
    assert find_token(WORDPIECE, "paris") == 2
    assert find_token(WORDPIECE, "##is") == 3
    assert find_token(WORDPIECE, "PARIS") == 2


def test_raw_ids_and_errors() -> None:
    assert find_token(BPE, "#7") == 7
    with pytest.raises(BadInputError, match="outside"):
        find_token(BPE, "#99")
    with pytest.raises(BadInputError, match="not a single token"):
        find_token(BPE, "london")
    with pytest.raises(BadInputError, match="type a token"):
        find_token(BPE, "   ")


def test_display_and_suggest() -> None:
    assert display_token("Ġparis") == "␣paris"
    assert display_token("Ċ") == "↵"
    assert display_token("Ġ") == "Ġ"
    assert suggest(BPE, "par") == ["par", "Paris", "␣paris"]
    assert suggest(WORDPIECE, "i") == ["##is"]
    assert suggest(BPE, "") == []


@given(st.text(max_size=30))
def test_find_token_never_crashes(query: str) -> None:
    try:
        token_id = find_token(BPE, query)
    except BadInputError as error:
        assert str(error)
    else:
        assert 0 <= token_id < len(BPE)


def test_visible_text_shows_whitespace() -> None:
    assert visible_text(" market") == " market"
    assert visible_text("\n") == "↵"
    assert visible_text("  ") == "␣␣"
    assert visible_text("") == "∅"
