from __future__ import annotations

import pytest
import torch

from embviz.artifacts import WEIGHTS_FILE, load_artifact, read_manifest, save_artifact
from embviz.backbones import Backbone
from embviz.compressors import (
    CompressedEmbedding,
    QuantizedLowRank,
    RowQuantizer,
    SVDCompressor,
    compressor_from_config,
    make_compressor,
    method_ids,
)
from embviz.compressors.quantize import (
    dequantize_rows,
    pack_int4,
    quantize_rows,
    unpack_int4,
)
from embviz.errors import BadInputError
from embviz.evaluation import plan_sweep
from embviz.metrics import is_linear_low_rank

QUANT_IDS = ("quant-int8", "quant-int4", "svd-int8", "svd-int4")


def _matrix(rows: int = 40, cols: int = 9) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))


def _fit(method: str, matrix: torch.Tensor, rank: int = 4) -> CompressedEmbedding:
    return make_compressor(method, None if method.startswith("quant") else rank).fit(matrix)


@pytest.mark.parametrize(("bits", "row_bytes"), [(8, 9), (4, 5)])
def test_row_quantizer_byte_count_is_exact(bits: int, row_bytes: int) -> None:
    compressed = RowQuantizer(bits).fit(_matrix(40, 9))  # odd D: int4 pads each row to 5 bytes
    assert compressed.bytes == 40 * row_bytes + 40 * 2
    assert compressed.params == 40 * 9 and compressed.rank is None and not compressed.low_rank
    assert compressed.byte_ratio == pytest.approx(4 * 40 * 9 / compressed.bytes)
    assert compressed.label == f"int{bits} rows (per-row scale)" and compressed.method == f"quant-int{bits}"


def test_quantized_low_rank_byte_count_and_factors() -> None:
    matrix = _matrix(40, 9)
    compressed = QuantizedLowRank(SVDCompressor(3)).fit(matrix)
    assert compressed.method == "svd-int8" and compressed.rank == 3
    assert compressed.bytes == 40 * 3 + 40 * 2 + 3 * 9 * 2
    assert is_linear_low_rank(compressed)
    assert torch.equal(compressed.decoder, compressed.decoder.half().float())  # fp16 decoder
    svd = SVDCompressor(3).fit(matrix)
    scales = compressed.qscales.float().unsqueeze(1)
    assert ((compressed.codes - svd.codes).abs() <= scales / 2 + 1e-6).all()
    torch.testing.assert_close(compressed.reconstruct(), svd.reconstruct(), rtol=0, atol=0.05)


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_at_most_half_a_step(bits: int) -> None:
    matrix = _matrix(50, 7) * torch.logspace(-3, 2, 50).unsqueeze(1)
    codes, scales = quantize_rows(matrix, bits)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16
    assert int(codes.abs().max()) <= qmax
    restored = codes.float() * scales.float().unsqueeze(1)
    bound = scales.float().unsqueeze(1) / 2
    assert ((restored - matrix).abs() <= bound * (1 + 1e-5) + 1e-7).all()


def test_zero_rows_get_zero_scale_and_no_nan() -> None:
    matrix = _matrix(6, 5)
    matrix[2] = 0.0
    for bits in (8, 4):
        codes, scales = quantize_rows(matrix, bits)
        assert scales[2] == 0 and not codes[2].any()
        compressed = RowQuantizer(bits).fit(matrix)
        assert torch.isfinite(compressed.dense).all() and not compressed.dense[2].any()


def test_bad_input_is_refused() -> None:
    with pytest.raises(BadInputError):
        quantize_rows(torch.tensor([[1.0, float("nan")]]), 8)
    with pytest.raises(BadInputError):
        quantize_rows(torch.tensor([[1e9, 0.0]]), 8)  # scale beyond float16
    with pytest.raises(BadInputError):
        RowQuantizer(bits=5)
    with pytest.raises(BadInputError):
        QuantizedLowRank(SVDCompressor(3), bits=16)
    with pytest.raises(BadInputError):
        QuantizedLowRank(RowQuantizer())  # not low-rank
    with pytest.raises(BadInputError):
        RowQuantizer().fit(torch.zeros(3))


@pytest.mark.parametrize("columns", [1, 6, 7])
def test_int4_packing_round_trips_exactly(columns: int) -> None:
    codes = torch.randint(-8, 8, (11, columns), generator=torch.Generator().manual_seed(1)).to(torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (11, (columns + 1) // 2)
    assert torch.equal(unpack_int4(packed, columns), codes)


def test_dequantize_rejects_mismatched_storage() -> None:
    codes, scales = quantize_rows(_matrix(4, 6), 8)
    with pytest.raises(ValueError):
        dequantize_rows(codes, scales, 4, 6)  # int8 codes are not packed int4
    with pytest.raises(ValueError):
        dequantize_rows(codes, scales.float(), 8, 6)


@pytest.mark.parametrize("method", QUANT_IDS)
def test_artifact_round_trip_is_exact_and_stores_the_compressed_form(method: str, tmp_path) -> None:
    matrix = _matrix(60, 9)
    compressed = _fit(method, matrix)
    manifest = save_artifact(tmp_path / "a", compressed, "tiny", "f" * 64)
    loaded = load_artifact(tmp_path / "a", "f" * 64)
    assert torch.equal(loaded.reconstruct(), compressed.reconstruct())
    for name in ("codes", "decoder", "dense", "qcodes", "qscales"):
        left, right = getattr(compressed, name), getattr(loaded, name)
        assert (left is None and right is None) or (torch.equal(left, right) and left.dtype == right.dtype)
    assert (loaded.method, loaded.config, loaded.bytes) == (
        compressed.method,
        compressed.config,
        compressed.bytes,
    )
    assert "dense" not in manifest["tensors"] and "codes" not in manifest["tensors"]
    assert read_manifest(tmp_path / "a")["bytes"] == compressed.bytes
    float32_size = 4 * sum(
        t.numel() for t in (compressed.dense, compressed.codes, compressed.decoder) if t is not None
    )
    assert (tmp_path / "a" / WEIGHTS_FILE).stat().st_size < float32_size / 2 + 1024


def test_registry_ids_and_configs() -> None:
    for method in QUANT_IDS:
        assert method in method_ids()
        compressor = make_compressor(method, None if method.startswith("quant") else 5)
        assert compressor.method == method
        assert compressor_from_config(compressor.get_config()).get_config() == compressor.get_config()
    assert make_compressor("quant-int8", 17).get_config()["rank"] is None  # the rank is ignored
    with pytest.raises(BadInputError):
        make_compressor("svd-int8", None)
    with pytest.raises(BadInputError):
        make_compressor("svd", None)
    with pytest.raises(BadInputError):
        make_compressor("quant-int8", None, bits=4)


def test_rank_for_byte_ratio_meets_float32_svd_at_equal_bytes() -> None:
    vocab, hidden = 1000, 64
    for ratio in (2.0, 4.0, 8.0):
        rank = QuantizedLowRank.rank_for_byte_ratio(vocab, hidden, ratio)
        budget = 4 * vocab * hidden / ratio
        assert QuantizedLowRank.stored_bytes(vocab, hidden, rank) <= budget
        assert rank == hidden - 1 or QuantizedLowRank.stored_bytes(vocab, hidden, rank + 1) > budget
    with pytest.raises(BadInputError):
        QuantizedLowRank.rank_for_byte_ratio(vocab, hidden, 1.0)
    with pytest.raises(BadInputError):
        QuantizedLowRank.rank_for_byte_ratio(vocab, hidden, 10_000.0)


def test_sweep_plan_runs_dense_quantisers_once_at_their_byte_ratio(tiny_causal: Backbone) -> None:
    vocab, hidden = tiny_causal.vocab_size, tiny_causal.hidden_size
    jobs = plan_sweep(tiny_causal, ["quant-int8", "svd-int8", "svd"], [2.0, 4.0], [3], "fast", by="bytes")
    dense = [job for job in jobs if job.method == "quant-int8"]
    assert len(dense) == 1 and dense[0].target_ratio == pytest.approx(4 * hidden / (hidden + 2), abs=1e-4)
    int8 = [job.compressor.get_config()["rank"] for job in jobs if job.method == "svd-int8"]
    assert int8[-1] == 3
    for rank, ratio in zip(int8[:2], (2.0, 4.0), strict=True):
        assert rank == QuantizedLowRank.rank_for_byte_ratio(vocab, hidden, ratio)
    # By parameters, the quantised method gets its float base's rank: same numbers, fewer bytes.
    by_params = plan_sweep(tiny_causal, ["svd-int8", "svd"], [2.0, 4.0], None, "fast", by="params")
    ranks = [job.compressor.get_config()["rank"] for job in by_params]
    assert ranks[:2] == ranks[2:] and ranks[:2] != int8[:2]


@pytest.mark.parametrize(("method", "atol"), [("quant-int8", 0.05), ("quant-int4", None)])
def test_backbone_runs_on_a_quantised_dense_variant(
    tiny_causal: Backbone, method: str, atol: float | None
) -> None:
    batch = tiny_causal.tokenizer(["the king of france lived in paris."], return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    plain = tiny_causal.logits(ids, mask)
    variant = _fit(method, tiny_causal.embedding)
    for mode in ("input", "tied"):
        logits = tiny_causal.logits(ids, mask, embedding=variant.reconstruct(), mode=mode)
        assert torch.isfinite(logits).all()
        if atol is not None:
            assert float((logits - plain).abs().max()) < atol
