"""llama.cpp's GGUF block formats as reference methods, and bits per weight everywhere.

The GGUF methods must store exactly what the ``gguf`` package (hence llama.cpp) stores: the package's own
quantise gives our bytes, its own dequantise gives our reconstruction, and the bits per weight are the
llama.cpp figures. The contract test (tests/test_method_contract.py) covers storing, reloading and exports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from embviz.artifacts import compress_cached, decode_tensors, encode_tensors, load_artifact, read_manifest
from embviz.backbones import Backbone
from embviz.cli import main
from embviz.compressors import GGUFQuantizer, get_method, make_compressor, method_ids
from embviz.compressors.gguf_formats import FAMILY, GGUF_TYPES, gguf_bits_per_weight
from embviz.errors import BadInputError
from embviz.export import export_compressed, load_compressed

LLAMA_CPP_BITS = {"Q8_0": 8.5, "Q5_1": 6.0, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_0": 4.5}
"""Bits per weight of llama.cpp's 32-weight block types, as llama.cpp documents them."""


@pytest.fixture(scope="module")
def matrix() -> torch.Tensor:
    """A 576-column matrix (smollm2's width) with rows of very different scales."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(96, 576, generator=generator)
    return rows * torch.logspace(-3, 1, 96).unsqueeze(1)


def test_the_five_32_block_types_are_registered_and_no_k_quant() -> None:
    ids = method_ids(family=FAMILY)
    assert ids == ("gguf-q8_0", "gguf-q5_1", "gguf-q5_0", "gguf-q4_1", "gguf-q4_0")
    assert not any("_k" in method for method in method_ids())
    for name in GGUF_TYPES:
        spec = get_method(f"gguf-{name.lower()}")
        assert spec.sizing == "fixed" and spec.stores == ("qcodes",)
        assert spec.label == f"GGUF {name} (llama.cpp, {LLAMA_CPP_BITS[name]:.1f} bits/weight)"
        assert "256" in spec.description and "Q2_K" in spec.description  # why no k-quant is offered
        assert gguf_bits_per_weight(name) == LLAMA_CPP_BITS[name]


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_bits_per_weight_are_llama_cpp_figures(name: str, matrix: torch.Tensor) -> None:
    compressed = GGUFQuantizer(name).fit(matrix)
    assert compressed.bits_per_weight == LLAMA_CPP_BITS[name]
    assert compressed.bytes == compressed.qcodes.numel() == get_method(compressed.method).fixed_bytes(96, 576)
    facts = compressed.facts()
    assert facts["bits_per_weight"] == LLAMA_CPP_BITS[name]
    assert facts["bytes_vs_bf16"] == round(16 / LLAMA_CPP_BITS[name], 4)
    assert facts["byte_ratio"] == round(32 / LLAMA_CPP_BITS[name], 4)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_stored_bytes_round_trip_with_the_gguf_package(name: str, matrix: torch.Tensor) -> None:
    qtype = GGMLQuantizationType[name]
    compressed = make_compressor(f"gguf-{name.lower()}", None).fit(matrix)
    ours = compressed.qcodes.numpy()
    assert ours.dtype == np.uint8 and ours.shape == (96, 576 // 32 * GGML_QUANT_SIZES[qtype][1])
    # The package's own quantisation of our input gives our bytes ...
    assert np.array_equal(quantize(matrix.numpy(), qtype), ours)
    # ... and its own dequantisation of our bytes gives our reconstruction, bit for bit.
    assert np.array_equal(dequantize(ours, qtype), compressed.reconstruct().numpy())
    error = (compressed.reconstruct() - matrix).norm() / matrix.norm()
    assert 0 < error < 0.1


def test_rows_that_are_not_whole_blocks_are_refused_with_one_clear_error() -> None:
    spec = get_method("gguf-q4_0")
    with pytest.raises(BadInputError) as caught:
        spec.size(1000, 100)
    message = str(caught.value)
    assert "\n" not in message and "multiple of 32" in message and "100" in message
    with pytest.raises(BadInputError, match="multiple of 32"):
        GGUFQuantizer("Q8_0").fit(torch.randn(10, 100))
    with pytest.raises(BadInputError, match="GGUF type must be one of"):
        GGUFQuantizer("Q4_K")
    with pytest.raises(BadInputError, match="NaN"):
        GGUFQuantizer("Q8_0").fit(torch.full((2, 32), float("nan")))


def test_an_artifact_reloads_through_the_methods_decoder(tiny_causal: Backbone) -> None:
    compressor = GGUFQuantizer("Q5_1")
    result = compress_cached(tiny_causal.name, tiny_causal.embedding, compressor)
    assert result.path is not None
    loaded = load_artifact(result.path)
    assert loaded.qscales is None and torch.equal(loaded.qcodes, result.compressed.qcodes)
    assert torch.equal(loaded.reconstruct(), result.compressed.reconstruct())
    manifest = read_manifest(result.path)
    with pytest.raises(ValueError, match="not registered here"):
        decode_tensors({**manifest, "method": "gguf-q3_k"}, dict(encode_tensors(result.compressed)))
    truncated = {"qcodes": result.compressed.qcodes[:, :-1].contiguous()}
    with pytest.raises(ValueError, match="do not fit"):
        decode_tensors({**manifest, "tensors": {"qcodes": list(truncated["qcodes"].shape)}}, truncated)


def test_compress_json_states_bits_against_bf16_and_the_source_format(
    tiny_causal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compress", str(tiny_causal_path), "--method", "gguf-q4_0", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["bits_per_weight"] == 4.5 and payload["bytes_vs_bf16"] == round(16 / 4.5, 4)
    assert (payload["source_format"], payload["source_bits_per_weight"]) == ("float32", 32.0)
    assert payload["bytes_vs_source"] == round(32 / 4.5, 4)


def test_an_export_ships_in_its_compressed_format(tiny_causal: Backbone, tmp_path: Path) -> None:
    compressed = GGUFQuantizer("Q4_0").fit(tiny_causal.embedding)
    export_compressed(tiny_causal, compressed, tmp_path / "export", mode="tied")
    loaded = load_compressed(tmp_path / "export")
    assert loaded.source_bits_per_weight == 4.5
    assert loaded.source_format == f"embviz export: {compressed.label}"
    info = loaded.info()
    assert (info.source_format, info.source_bits_per_weight) == (loaded.source_format, 4.5)


def test_bits_per_weight_count_every_stored_byte(tiny_causal: Backbone) -> None:
    vocab, hidden = tiny_causal.embedding.shape
    int8 = make_compressor("quant-int8", None).fit(tiny_causal.embedding)
    assert int8.bits_per_weight == pytest.approx(8 * (hidden + 2) / hidden)  # codes + an fp16 scale per row
    svd = make_compressor("svd", 4).fit(tiny_causal.embedding)
    assert svd.bits_per_weight == pytest.approx(32 * (vocab * 4 + 4 * hidden) / (vocab * hidden))
    assert svd.bytes_vs_bf16 == pytest.approx(16 / svd.bits_per_weight)
    assert svd.facts()["bits_per_weight"] == round(svd.bits_per_weight, 4)


@pytest.mark.slow
def test_smollm2s_q8_0_embedding_is_reproduced_byte_for_byte() -> None:
    """Re-quantising smollm2's (dequantised Q8_0) embedding gives exactly the bytes its GGUF file ships."""
    from gguf import GGUFReader

    from embviz.sources import _smollm2_gguf, load_model

    backbone = load_model("smollm2")
    assert (backbone.source_format, backbone.source_bits_per_weight) == ("GGUF Q8_0", 8.5)
    compressed = GGUFQuantizer("Q8_0").fit(backbone.embedding)
    shipped = next(t for t in GGUFReader(_smollm2_gguf()).tensors if t.name == "token_embd.weight")
    assert compressed.bytes == shipped.n_bytes == 30_081_024
    assert np.array_equal(
        np.asarray(shipped.data).reshape(compressed.qcodes.shape), compressed.qcodes.numpy()
    )
