"""Generating the smollm corpus (embviz.textgen) with the tiny causal model: deterministic, resumable, its
provenance in the header, and read back by the corpus reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embviz import corpora, textgen
from embviz.backbones import Backbone
from embviz.errors import BadInputError
from embviz.textgen import GenerationConfig, generate_text

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
CONFIG = GenerationConfig(model="tiny", max_new_tokens=6, batch_size=2)


@pytest.fixture
def chat_model(tiny_causal_path: Path) -> Backbone:
    backbone = Backbone.from_pretrained(str(tiny_causal_path))
    backbone.tokenizer.chat_template = TEMPLATE
    if backbone.tokenizer.pad_token is None:
        backbone.tokenizer.pad_token = backbone.tokenizer.eos_token
    return backbone


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# a header line\nTell me about bread.\nDescribe a bus ride.\nList three fruits.\n")
    return path


def _generate(chat_model: Backbone, prompts: Path, output: Path) -> textgen.GenerationResult:
    return generate_text(load=lambda name: chat_model, config=CONFIG, prompts_file=prompts, output=output)


def test_generation_is_deterministic_and_records_its_provenance(
    chat_model: Backbone, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _generate(chat_model, prompts, tmp_path / "a.txt")
    assert first.prompts == 3 and not first.cached
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "fresh-cache"))
    second = _generate(chat_model, prompts, tmp_path / "b.txt")
    assert not second.cached
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()
    text = (tmp_path / "a.txt").read_text()
    header = json.loads("\n".join(line[2:] for line in text.splitlines() if line.startswith("# ")))
    assert header["config"]["seed"] == 0 and header["prompts"] == 3 and "generate-text" in header["rebuild"]
    assert [line for line in text.splitlines() if line.startswith("## ")] == ["## 0", "## 1", "## 2"]


def test_an_interrupted_generation_resumes_to_the_same_text(
    chat_model: Backbone, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = _generate(chat_model, prompts, tmp_path / "straight.txt")
    answers = next((tmp_path / "embviz-home" / "generated").glob("*.jsonl"))
    lines = answers.read_text().splitlines()
    answers.write_text(lines[0] + "\n" + lines[1][:7])  # one answer kept, the next torn mid-write
    calls: list[str] = []
    resumed = generate_text(
        load=lambda name: calls.append(name) or chat_model,  # type: ignore[func-returns-value]
        config=CONFIG,
        prompts_file=prompts,
        output=tmp_path / "resumed.txt",
    )
    assert calls == ["tiny"] and resumed.prompts == 3
    assert (tmp_path / "resumed.txt").read_text() == (tmp_path / "straight.txt").read_text()
    again = _generate(chat_model, prompts, tmp_path / "again.txt")
    assert again.cached and straight.words == again.words


def test_a_model_without_a_chat_template_or_no_prompts_is_refused(
    tiny_causal: Backbone, tmp_path: Path, prompts: Path
) -> None:
    tiny_causal.tokenizer.chat_template = None
    with pytest.raises(BadInputError, match="chat"):
        generate_text(
            load=lambda name: tiny_causal, config=CONFIG, prompts_file=prompts, output=tmp_path / "x"
        )
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a header\n")
    with pytest.raises(BadInputError, match="no prompts"):
        generate_text(load=lambda name: tiny_causal, config=CONFIG, prompts_file=empty)


def test_the_shipped_corpus_reads_as_train_valid_test_answers() -> None:
    texts = {split: corpora.load_texts("smollm", split) for split in corpora.SPLITS}
    assert all(texts.values())
    assert len(texts["train"]) > 10 * len(texts["test"])
    assert not set(texts["train"]) & set(texts["test"])
    assert len(textgen.read_prompts()) == 240
