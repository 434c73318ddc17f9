from __future__ import annotations

import pytest
import torch

from embviz.backbones import Backbone
from embviz.errors import BadInputError, UnknownModelError


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
        Backbone.from_pretrained(str(tmp_path / "no-such-folder"))
    with pytest.raises(UnknownModelError):
        Backbone.from_pretrained("no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownModelError):
        Backbone.from_pretrained(str(tmp_path / "empty"))


def test_tokens_cover_the_vocabulary(tiny_masked: Backbone) -> None:
    assert tiny_masked.tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tiny_masked.special_ids >= {0, 1, 2, 3, 4}


def test_inspect_reads_the_same_facts_as_loading(tiny_backbone: Backbone) -> None:
    from embviz.backbones import inspect_backbone

    assert inspect_backbone(tiny_backbone.source) == tiny_backbone.info()


def test_inspect_falls_back_to_loading_when_files_do_not_say(tiny_masked_path, tmp_path) -> None:
    import json
    import shutil

    from embviz.backbones import inspect_backbone

    folder = tmp_path / "no-architectures"
    shutil.copytree(tiny_masked_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("architectures", None)
    (folder / "config.json").write_text(json.dumps(config))
    info = inspect_backbone(str(folder))
    assert info.kind == "masked" and info.hidden_size == 32
