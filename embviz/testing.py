"""Tiny random models for tests, demos and CI: built from a config in seconds, no download.

``example_compressor(spec, V, D)`` gives a small, quick configuration of any registered compression method
(what the method contract test and the export tests fit). ``build_tiny_model("masked", folder)`` writes a Hugging Face folder (a 2-layer BertForMaskedLM, hidden 32,
with a WordPiece tokenizer trained on a few sentences); ``"causal"`` writes a 2-layer LlamaForCausalLM with a
byte-level BPE tokenizer. Load either with ``Backbone.from_pretrained(folder)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from embviz.compressors import Compressor, DirectionMetric, MethodSpec, RowWeights

if TYPE_CHECKING:  # transformers is imported where it is used: its import takes seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

EXAMPLE_RANK = 4
EXAMPLE_RATIO = 4.0

SENTENCES = [
    "I went to the market to buy some bread and milk.",
    "The king of France lived in a great palace in Paris.",
    "The queen of England lived in London near the river.",
    "In the beginning God created the heavens and the earth.",
    "She said that the city was full of people and music.",
    "They walked to the shop at 9 o'clock, then went home.",
    "Is this the way to the station? No, it is over there!",
    "He wrote 3 letters, 12 poems and 1,200 words every day.",
    "A cat, a dog and two birds sat by the old stone wall.",
    "The students read the book and asked the teacher questions.",
    "Love is not love which alters when it alteration finds.",
    "To be, or not to be: that is the question.",
    "The ship sailed across the sea to a distant island.",
    "We ate apples, oranges and bread in the garden.",
    "The children played in the park until the sun went down.",
    "Rain fell on the fields and the farmers were glad.",
]


def _train_tokenizer(kind: Literal["masked", "causal"], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = SENTENCES * 4
    if kind == "masked":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        tokenizer.train_from_iterator(
            text, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
        )
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    specials = ["<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def build_tiny_model(
    kind: Literal["masked", "causal"],
    folder: Path,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    layers: int = 2,
    vocab_size: int = 400,
) -> Path:
    """Write a tiny random masked (BERT) or causal (Llama) model with a real tokenizer to ``folder``."""
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(kind, vocab_size)
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    model: PreTrainedModel
    if kind == "masked":
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden_size,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = BertForMaskedLM(config)
    else:
        llama_config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=2 * hidden_size,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(llama_config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def example_compressor(
    spec: MethodSpec,
    vocab_size: int,
    hidden_size: int,
    *,
    rank: int = EXAMPLE_RANK,
    ratio: float = EXAMPLE_RATIO,
) -> Compressor:
    """A small, quick configuration of a registered method for a V x D matrix (tests, demos).

    Rank-sized methods get ``rank``, byte-sized ones ``ratio``, fixed-size ones their own size; methods that
    train run one epoch of batches of 64; frequency-aware ones get a synthetic ramp of row weights.
    """
    if spec.sizing == "rank":
        size = spec.size(vocab_size, hidden_size, rank=rank)
    elif spec.sizing == "bytes":
        size = spec.size(vocab_size, hidden_size, ratio=ratio)
    else:
        size = spec.size(vocab_size, hidden_size)
    options: dict[str, Any] = {"epochs": 1, "batch_size": 64} if "epochs" in spec.options else {}
    return spec.build(size, **options, **example_inputs(spec, vocab_size, hidden_size))


def example_inputs(spec: MethodSpec, vocab_size: int, hidden_size: int) -> dict[str, Any]:
    """What ``spec`` needs from a model to fit, synthetic and deterministic (:func:`example_row_weights`,
    :func:`example_direction_metric`): the keyword arguments of :meth:`MethodSpec.build`."""
    return spec.model_inputs(
        row_weights=lambda: example_row_weights(vocab_size),
        direction_metric=lambda: example_direction_metric(hidden_size),
    )


def example_row_weights(vocab_size: int) -> RowWeights:
    """Deterministic synthetic token frequencies (a ramp from 0.1 to 3), for frequency-aware examples."""
    return RowWeights(torch.linspace(0.1, 3.0, vocab_size), source="example ramp")


def example_direction_metric(hidden_size: int) -> DirectionMetric:
    """A deterministic synthetic direction metric: a few costly directions (the first coordinates, 50x to
    2x the rest), as a model's Fisher has."""
    diagonal = torch.ones(hidden_size, dtype=torch.float64)
    leading = max(1, hidden_size // 8)
    diagonal[:leading] = torch.linspace(50.0, 2.0, leading, dtype=torch.float64)
    return DirectionMetric(torch.diag(diagonal), source="example: leading coordinates costly")
