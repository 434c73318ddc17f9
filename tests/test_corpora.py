from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embviz.corpora import (
    CORPORA,
    FITTING_CORPORA,
    HELD_OUT_CORPORA,
    SPLITS,
    assign_splits,
    load_texts,
    parse_text_spec,
    read_text_file,
    resolve_texts,
    user_texts,
)
from embviz.errors import BadInputError


@given(st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=200))
def test_units_of_one_chunk_share_a_split(keys: list[str]) -> None:
    # consecutive units with one key form a chunk; a key seen again later is the same chunk
    splits = assign_splits(keys)
    by_key: dict[str, set[str]] = {}
    for key, split in zip(keys, splits, strict=True):
        by_key.setdefault(key, set()).add(split)
    assert all(len(s) == 1 for s in by_key.values())


def test_split_proportions() -> None:
    splits = assign_splits(str(i) for i in range(1000))
    assert (splits.count("train"), splits.count("valid"), splits.count("test")) == (900, 50, 50)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CORPORA))
def test_packaged_corpora_splits_are_disjoint_deterministic_and_nonempty(name: str) -> None:
    parts = {split: load_texts(name, split) for split in SPLITS}
    assert all(parts[split] for split in SPLITS)
    assert len(parts["train"]) > 10 * len(parts["test"])
    load_texts.cache_clear()
    assert {split: load_texts(name, split) for split in SPLITS} == parts

    # disjoint by construction; the texts themselves repeat: short units ("ACT I.", "[Exit.]") often, long ones
    # rarely (parallel Gospel and Kings/Chronicles verses are about 1% of a Bible split)
    def long_units(split: str) -> set[str]:
        return {text for text in parts[split] if len(text.split()) >= 12}

    for a, b in (("train", "test"), ("train", "valid"), ("valid", "test")):
        assert len(long_units(a) & long_units(b)) <= 0.02 * len(long_units(b))
    if name == "bible":
        assert not any("{" in text for text in parts["test"])


def test_text_specs() -> None:
    assert parse_text_spec("bible:test") == ("bible", "test")
    assert parse_text_spec("shakespeare") == ("shakespeare", "test")
    with pytest.raises(BadInputError, match="unknown corpus"):
        parse_text_spec("quran:test")
    with pytest.raises(BadInputError, match="unknown split"):
        parse_text_spec("bible:dev")


def test_user_text_files(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("first line\n\n  second   line \n", encoding="utf-8")
    assert read_text_file(good) == ["first line", "second line"]
    assert resolve_texts(str(good)) == ("first line", "second line")
    cases = {
        "empty.txt": (b"  \n\n", "no text"),
        "binary.bin": (b"\x00\x01\x02abc", "binary"),
        "latin1.txt": ("café".encode("latin-1"), "not UTF-8"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BadInputError, match=message):
            read_text_file(path)
    with pytest.raises(BadInputError, match="no such text file"):
        read_text_file(tmp_path / "missing.txt")


@given(st.text(max_size=300))
def test_user_texts_never_returns_blank_lines(text: str) -> None:
    try:
        lines = user_texts(text)
    except BadInputError:
        assert not text.split()
    else:
        assert lines and all(line.strip() == line and line for line in lines)


# -- held-out domains (issue 14) ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pydoc", "modern"])
def test_held_out_domains_load_disjoint_nonempty_and_deterministic(name: str) -> None:
    assert name in HELD_OUT_CORPORA and name not in FITTING_CORPORA
    parts = {split: load_texts(name, split) for split in SPLITS}
    assert all(parts[split] for split in SPLITS)
    assert len(parts["train"]) > 10 * len(parts["test"])
    for a, b in (("train", "test"), ("train", "valid"), ("valid", "test")):
        assert not set(parts[a]) & set(parts[b])
    load_texts.cache_clear()
    assert {split: load_texts(name, split) for split in SPLITS} == parts
    units = [text for split in SPLITS for text in parts[split]]
    assert all(text.strip() == text and len(text.split()) >= 8 for text in units)
    if name == "pydoc":  # prose only: no doctest prompts, grammar rules or heading underlines
        assert not any(">>>" in text or "::=" in text or "****" in text for text in units)
        assert sum(len(text.split()) for text in parts["test"]) > 1000
    else:  # the header (provenance, licence) is not text
        assert not any(text.startswith("#") or "CC0" in text for text in units)
        assert 3000 <= sum(len(text.split()) for text in units) <= 5500


def test_held_out_domains_resolve_as_text_specs() -> None:
    assert resolve_texts("pydoc:test") == load_texts("pydoc", "test")
    assert resolve_texts("modern") == load_texts("modern", "test")
    assert parse_text_spec("modern:valid") == ("modern", "valid")
    assert set(FITTING_CORPORA) == {"bible", "shakespeare", "britannica", "smollm"}
