"""The real packaged backbones (slow: the first smollm2 load dequantises its GGUF, about 25 s)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _info(name: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "embviz.cli", "info", name, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_smollm2_facts() -> None:
    info = _info("smollm2")
    assert (info["kind"], info["vocab_size"], info["hidden_size"], info["tied"]) == (
        "causal",
        49152,
        576,
        True,
    )
    assert info["embedding_params"] == 49152 * 576


def test_minilm_facts() -> None:
    info = _info("minilm")
    assert (info["kind"], info["vocab_size"], info["hidden_size"]) == ("masked", 30522, 384)
    assert info["trained_head"] is False


def test_smollm2_predicts_paris() -> None:
    from embviz.sources import load_model

    backbone = load_model("smollm2")
    ids = backbone.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    top = backbone.logits(ids)[0, -1].argmax().item()
    assert backbone.tokenizer.decode([top]).strip() == "Paris"


def test_smollm2_ships_its_embedding_as_gguf_q8_0() -> None:
    info = _info("smollm2")
    assert (info["source_format"], info["source_bits_per_weight"]) == ("GGUF Q8_0", 8.5)
    assert _info("minilm")["source_format"] == "float32"
