from __future__ import annotations

import pytest
import torch

from embviz.backbones import Backbone
from embviz.errors import BadInputError, UnknownModelError
from embviz.sources import inspect_model, load_model


def _batch(backbone: Backbone) -> dict[str, torch.Tensor]:
    return backbone.tokenizer(
        ["the king of france lived in paris.", "i went to the market."], return_tensors="pt", padding=True
    )


def test_info_reports_shape_kind_and_tying(tiny_backbone: Backbone) -> None:
    info = tiny_backbone.info()
    assert info.vocab_size == tiny_backbone.embedding.shape[0] == len(tiny_backbone.tokens)
    assert info.hidden_size == 32
    assert info.tied is True
    assert info.embedding_params == info.vocab_size * 32
    assert info.kind == ("masked" if "masked" in tiny_backbone.name else "causal")


def test_identity_replacement_matches_plain_forward(tiny_backbone: Backbone) -> None:
    batch = _batch(tiny_backbone)
    plain = tiny_backbone.logits(batch["input_ids"], batch["attention_mask"])
    for mode in ("input", "tied"):
        swapped = tiny_backbone.logits(
            batch["input_ids"], batch["attention_mask"], embedding=tiny_backbone.embedding.clone(), mode=mode
        )
        torch.testing.assert_close(swapped, plain, rtol=0, atol=1e-5)


def test_input_mode_changes_inputs_only_and_tied_mode_changes_output_layer(tiny_backbone: Backbone) -> None:
    batch = _batch(tiny_backbone)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    original = tiny_backbone.embedding.clone()
    plain = tiny_backbone.logits(ids, mask)

    # Change only rows that the batch never uses: input mode cannot see them, tied mode scores them.
    unused = torch.ones(original.shape[0], dtype=torch.bool)
    unused[ids.unique()] = False
    variant = original.clone()
    variant[unused] = torch.randn(
        int(unused.sum()), original.shape[1], generator=torch.Generator().manual_seed(0)
    )
    input_only = tiny_backbone.logits(ids, mask, embedding=variant, mode="input")
    tied = tiny_backbone.logits(ids, mask, embedding=variant, mode="tied")
    torch.testing.assert_close(input_only, plain, rtol=0, atol=1e-5)
    assert not torch.allclose(tied[..., unused], plain[..., unused], atol=1e-3)
    torch.testing.assert_close(tied[..., ~unused], plain[..., ~unused], rtol=0, atol=1e-5)

    # Changing the used rows changes the logits in input mode.
    scaled = original * 3.0
    assert not torch.allclose(tiny_backbone.logits(ids, mask, embedding=scaled), plain, atol=1e-3)

    # The shared model is untouched: same weights, same plain logits afterwards.
    torch.testing.assert_close(tiny_backbone.embedding, original, rtol=0, atol=0)
    output_weight = tiny_backbone.model.get_output_embeddings().weight
    torch.testing.assert_close(output_weight, original, rtol=0, atol=0)
    torch.testing.assert_close(tiny_backbone.logits(ids, mask), plain, rtol=0, atol=0)


def test_wrong_shape_and_mode_are_refused(tiny_backbone: Backbone) -> None:
    ids = _batch(tiny_backbone)["input_ids"]
    with pytest.raises(BadInputError, match="shape"):
        tiny_backbone.logits(ids, embedding=torch.zeros(3, 32))
    with pytest.raises(BadInputError, match="mode"):
        tiny_backbone.logits(ids, embedding=tiny_backbone.embedding, mode="both")  # type: ignore[arg-type]


def test_unknown_model_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(UnknownModelError, match=r"cannot load|unknown model"):
        load_model(str(tmp_path / "no-such-folder"))
    with pytest.raises(UnknownModelError):
        load_model("no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownModelError):
        load_model(str(tmp_path / "empty"))


def test_tokens_cover_the_vocabulary(tiny_masked: Backbone) -> None:
    assert tiny_masked.tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tiny_masked.special_ids >= {0, 1, 2, 3, 4}


def test_inspect_reads_the_same_facts_as_loading(tiny_backbone: Backbone) -> None:
    assert inspect_model(tiny_backbone.source) == tiny_backbone.info()


def test_inspect_falls_back_to_loading_when_files_do_not_say(tiny_masked_path, tmp_path) -> None:
    import json
    import shutil

    folder = tmp_path / "no-architectures"
    shutil.copytree(tiny_masked_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("architectures", None)
    (folder / "config.json").write_text(json.dumps(config))
    info = inspect_model(str(folder))
    assert info.kind == "masked" and info.hidden_size == 32


def test_a_backbone_knows_the_format_its_embedding_ships_in(tiny_backbone: Backbone) -> None:
    assert (tiny_backbone.source_format, tiny_backbone.source_bits_per_weight) == ("float32", 32.0)
    info = tiny_backbone.info().to_dict()
    assert (info["source_format"], info["source_bits_per_weight"]) == ("float32", 32.0)


@pytest.mark.parametrize(("dtype", "expected"), [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_a_half_precision_folder_ships_in_its_stored_dtype(tiny_causal_path, tmp_path, dtype, expected):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / expected
    shutil.copytree(tiny_causal_path, folder)
    weights = folder / "model.safetensors"
    tensors = {name: tensor.to(dtype) for name, tensor in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    backbone = load_model(str(folder))
    assert backbone.embedding.dtype == torch.float32  # loaded as float32, shipped in half precision
    assert (backbone.source_format, backbone.source_bits_per_weight) == (expected, 16.0)
    assert inspect_model(str(folder)) == backbone.info()


def test_the_embedding_is_found_by_name_among_same_shaped_tensors(tmp_path) -> None:
    from safetensors.torch import save_file

    from embviz.backbones import embedding_storage

    tensors = {
        "lm_head.weight": torch.zeros(10, 4, dtype=torch.float32),
        "model.embed_tokens.weight": torch.zeros(10, 4, dtype=torch.bfloat16),
        "model.norm.weight": torch.zeros(4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    assert embedding_storage([tmp_path / "model.safetensors"], 10, 4) == ("bfloat16", 16.0)
    assert embedding_storage([tmp_path / "model.safetensors"], 11, 4) == (None, None)
    assert embedding_storage([], 10, 4) == (None, None)


def test_a_gguf_embeddings_format_comes_from_the_gguf_packages_block_sizes(tmp_path) -> None:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    from embviz.sources import gguf_embedding_format

    for qtype, bits in ((GGMLQuantizationType.Q8_0, 8.5), (GGMLQuantizationType.Q4_1, 5.0)):
        path = tmp_path / f"{qtype.name}.gguf"
        writer = GGUFWriter(str(path), "llama")
        rows = quantize(np.random.default_rng(0).standard_normal((8, 64), dtype=np.float32), qtype)
        writer.add_tensor("token_embd.weight", rows, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert gguf_embedding_format(path) == (f"GGUF {qtype.name}", bits)
