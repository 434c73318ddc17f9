"""Backbones: one abstraction over masked and causal Hugging Face language models.

A :class:`Backbone` owns exactly one copy of a transformer and never mutates it. Variants of the token
embedding are applied per call (:meth:`Backbone.forward`): the input side through ``inputs_embeds``, the
output side (``tied`` mode) through a forward hook on the output projection that reads a per-thread
override. Concurrent app sessions can therefore share one loaded model.

:meth:`Backbone.from_pretrained` loads one Hugging Face location (a local folder or a hub id), weights from
safetensors only. Which location a user-facing name stands for (built-in names, embviz exports, fitted
heads) is :mod:`embviz.sources`' business.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from embviz.errors import BadInputError, EmbvizError, UnknownModelError
from embviz.resources import (
    check_memory,
    config_parameters,
    folder_model_memory,
    model_memory,
    safetensors_header,
    safetensors_parameters,
)
from embviz.rng import seeded

if TYPE_CHECKING:  # transformers is imported where it is used: its import takes seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Kind = Literal["masked", "causal"]
Mode = Literal["input", "tied"]
MODES: tuple[Mode, ...] = ("input", "tied")

logger = logging.getLogger(__name__)

# Per-thread (per-context) replacement for the output projection's weight, read by a hook registered once.
_OUTPUT_WEIGHT: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "embviz_output_weight", default=None
)


@dataclass(frozen=True)
class BackboneInfo:
    """Facts about a loaded backbone, as printed by ``embviz info``."""

    name: str
    kind: Kind
    vocab_size: int
    hidden_size: int
    tied: bool
    embedding_params: int
    total_params: int
    embedding_share: float
    source: str
    trained_head: bool
    note: str
    source_format: str | None = None
    """How the embedding ships (``float32``, ``bfloat16``, ``GGUF Q8_0``, ...), or None when unknown."""
    source_bits_per_weight: float | None = None
    """Stored bits per weight of the embedding as it ships (float32 32, bfloat16 16, GGUF Q8_0 8.5)."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


SAFETENSORS_FORMATS: dict[str, tuple[str, float]] = {
    "F64": ("float64", 64.0),
    "F32": ("float32", 32.0),
    "BF16": ("bfloat16", 16.0),
    "F16": ("float16", 16.0),
    "F8_E4M3": ("float8_e4m3", 8.0),
    "F8_E5M2": ("float8_e5m2", 8.0),
}
"""safetensors dtypes -> (format name, bits per weight) of an embedding stored in them."""
_EMBEDDING_NAMES = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "embed_in.weight")


def embedding_storage(
    files: Sequence[Path], vocab_size: int, hidden_size: int
) -> tuple[str | None, float | None]:
    """``(format, bits per weight)`` of the V x D embedding as stored in safetensors ``files``, e.g.
    ``("float32", 32.0)`` or ``("bfloat16", 16.0)``, read from their headers (no tensor is read).

    The embedding is the V x D tensor with an embedding's name (``embed_tokens``, ``word_embeddings``,
    ``wte``, ...), else the first V x D tensor. ``(None, None)`` when the headers do not hold one.
    """
    matches: list[tuple[str, str]] = []
    for path in sorted(files):
        header = safetensors_header(path) or {}
        for key, entry in sorted(header.items()):
            shape = entry.get("shape") if isinstance(entry, dict) and key != "__metadata__" else None
            if shape == [vocab_size, hidden_size]:
                matches.append((key, str(entry.get("dtype"))))
    if not matches:
        return None, None
    named = [match for match in matches if match[0].endswith(_EMBEDDING_NAMES)]
    dtype = (named or matches)[0][1]
    return SAFETENSORS_FORMATS.get(dtype, (dtype.lower(), None))


def _hub_weight_files(repo_id: str) -> list[Path]:
    """The safetensors files of a hub model already in the local Hugging Face cache (none if not there)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> Path | None:
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except ValueError:  # not a valid repo id
            return None
        return Path(found) if isinstance(found, str) else None

    single = cached("model.safetensors")
    if single is not None:
        return [single]
    index = cached("model.safetensors.index.json")
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values()) if index else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [path for shard in sorted(shards) if (path := cached(str(shard))) is not None]


class LoadError(UnknownModelError):
    """transformers could not load a model location; ``reason`` is the first line of why."""

    def __init__(self, name: str, location: str, reason: str) -> None:
        super().__init__(f"cannot load model {name!r} from {location} ({reason})")
        self.reason = reason


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (missing head weights, progress bars) for one block."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()


def _kind_from_architectures(architectures: object) -> Kind | None:
    """``masked`` / ``causal`` from a config's ``architectures`` names, or None when they do not say."""
    for architecture in architectures if isinstance(architectures, list) else []:
        if str(architecture).endswith("ForMaskedLM"):
            return "masked"
        if str(architecture).endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
    return None


def _kind_from_config(config: object) -> Kind:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = _kind_from_architectures(getattr(config, "architectures", None))
    if kind is not None:
        return kind
    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "masked"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise UnknownModelError(f"model type {model_type!r} is neither a masked nor a causal language model")


def input_embedding_weight(model: PreTrainedModel) -> torch.Tensor:
    """The weight (V x D) of ``model``'s input embedding layer: the parameter itself, not a copy."""
    # get_input_embeddings() is typed as any nn.Module, whose attributes read as ``Tensor | Module``; it is
    # an embedding layer, and its weight is a Parameter.
    return cast(torch.Tensor, model.get_input_embeddings().weight)


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as tensors there report it: ``cuda`` becomes the current CUDA device (``cuda:0``), ``cpu:0``
    the one CPU device (``cpu``)."""
    target = torch.device(device)
    if target.type == "cpu":
        return torch.device("cpu")
    if target.type == "cuda" and target.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return target


def _output_override_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    weight = _OUTPUT_WEIGHT.get()
    if weight is None:
        return None
    return F.linear(args[0], weight, getattr(module, "bias", None))


class Backbone:
    """A loaded language model plus tokenizer, able to run with a replacement embedding matrix.

    Use :meth:`from_pretrained` to load one; the model is in eval mode and is never modified afterwards.
    """

    def __init__(
        self,
        name: str,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        kind: Kind,
        *,
        source: str = "",
        trained_head: bool = True,
        note: str = "",
        source_format: str | None = None,
        source_bits_per_weight: float | None = None,
    ) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.kind: Kind = kind
        self.source = source or name
        self.trained_head = trained_head
        self.note = note
        self.source_format = source_format
        """How the embedding ships (``float32``, ``GGUF Q8_0``, ...; None when unknown)."""
        self.source_bits_per_weight = source_bits_per_weight
        """Stored bits per weight of the embedding as it ships (32, 16, 8.5, ...; None when unknown)."""
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        output = self.model.get_output_embeddings()
        if output is not None and not getattr(output, "_embviz_hooked", False):
            output.register_forward_hook(_output_override_hook)
            output._embviz_hooked = True

    @classmethod
    def from_pretrained(
        cls,
        location: str | Path,
        *,
        name: str | None = None,
        kind: Kind | None = None,
        trained_head: bool = True,
        note: str = "",
        trust_remote_code: bool = False,
        source_format: str | None = None,
        source_bits_per_weight: float | None = None,
    ) -> Backbone:
        """Load a local Hugging Face folder or a hub id; weights come only from safetensors files.

        ``name`` is what the backbone is called (default: ``location`` as given) and ``kind`` overrides the
        kind read from the config. ``source_format`` / ``source_bits_per_weight`` say how the embedding
        ships when the folder is a conversion (e.g. ``GGUF Q8_0``, 8.5); by default they are read from the
        safetensors headers (:func:`embedding_storage`). Memory is checked before the weights are read. This does not check that
        the hub can be reached: :func:`embviz.sources.load_model` resolves user-facing names and does.

        Raises:
            BadInputError: a local folder whose weights exist only as pickle files.
            LoadError: transformers cannot load it.
            UnknownModelError: the config describes neither a masked nor a causal language model.
            ResourceError: the model does not fit in the available memory.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        location = str(location)
        name = location if name is None else name
        if trust_remote_code:
            logger.warning("trust_remote_code is on: %s may run code from its folder or hub", name)
        local = Path(location).is_dir()
        if local:
            _check_safetensors_only(Path(location), name)
        options = {"trust_remote_code": trust_remote_code, "local_files_only": local or _offline()}
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(location, **options)
                kind = kind or _kind_from_config(config)
                needed = folder_model_memory(Path(location)) if local else None
                parameters = config_parameters(config)
                if needed is None and parameters is not None:
                    needed = model_memory(parameters)
                if needed is not None:
                    check_memory(f"loading {name}", needed)
                auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
                # Heads missing from a checkpoint are initialised; fix the seed so that is reproducible.
                # Weights come only from safetensors files (never a pickle, which can run code).
                with seeded(0):
                    model = auto.from_pretrained(
                        location,
                        config=config,
                        dtype=torch.float32,
                        use_safetensors=True,
                        trust_remote_code=trust_remote_code,
                        local_files_only=options["local_files_only"],
                    )
                tokenizer = AutoTokenizer.from_pretrained(location, **options)
        except EmbvizError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LoadError(name, location, reason[:200]) from exc
        if source_format is None:
            files = sorted(Path(location).glob("*.safetensors")) if local else _hub_weight_files(location)
            embedding = input_embedding_weight(model)
            source_format, source_bits_per_weight = embedding_storage(files, *embedding.shape)
        return cls(
            name,
            model,
            tokenizer,
            kind,
            source=location,
            trained_head=trained_head,
            note=note,
            source_format=source_format,
            source_bits_per_weight=source_bits_per_weight,
        )

    # -- facts ---------------------------------------------------------------------------------------
    @property
    def embedding(self) -> torch.Tensor:
        """The input token-embedding matrix E (V x D), float32, detached. Do not modify it."""
        return input_embedding_weight(self.model).detach()

    @property
    def vocab_size(self) -> int:
        return int(self.embedding.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.embedding.shape[1])

    @property
    def tied(self) -> bool:
        """Whether the output projection shares its weight with the input embedding."""
        output = self.model.get_output_embeddings()
        return output is not None and output.weight.data_ptr() == self.embedding.data_ptr()

    @cached_property
    def tokens(self) -> list[str]:
        """The vocabulary as token strings, indexed by row of :attr:`embedding`."""
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        return [piece if piece is not None else f"<id {i}>" for i, piece in enumerate(pieces)]

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids the tokenizer reserves: its special tokens plus added tokens flagged special.

        ``all_special_ids`` alone misses e.g. SmolLM2's ``<repo_name>`` and ``<jupyter_code>`` markers.
        """
        return frozenset(i for i in reserved_token_ids(self.tokenizer) if i < self.vocab_size)

    def info(self) -> BackboneInfo:
        total = sum(p.numel() for p in self.model.parameters())
        embedding_params = self.vocab_size * self.hidden_size
        return BackboneInfo(
            name=self.name,
            kind=self.kind,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            tied=self.tied,
            embedding_params=embedding_params,
            total_params=total,
            embedding_share=round(embedding_params / total, 4),
            source=self.source,
            trained_head=self.trained_head,
            note=self.note,
            source_format=self.source_format,
            source_bits_per_weight=self.source_bits_per_weight,
        )

    def source_facts(self, bits_per_weight: float) -> dict[str, Any]:
        """How a variant at ``bits_per_weight`` compares with the embedding as this backbone ships it:
        ``source_format``, ``source_bits_per_weight`` and ``bytes_vs_source`` (None where unknown)."""
        shipped = self.source_bits_per_weight
        return {
            "source_format": self.source_format,
            "source_bits_per_weight": shipped,
            "bytes_vs_source": round(shipped / bits_per_weight, 4) if shipped and bits_per_weight else None,
        }

    # -- running with a variant ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the model's weights are (the CPU, as loaded; see :meth:`placed_on`)."""
        return self.embedding.device

    @contextlib.contextmanager
    def placed_on(self, device: str | torch.device) -> Iterator[torch.device]:
        """Run the model on ``device`` (e.g. ``cuda``) for one block, then move it back where it was.

        Yields the device; inputs and replacement embeddings go there (:meth:`forward` does not move them).
        The weights are copied there and back unchanged, so what the model computes does not depend on
        where it ran beyond float rounding; nothing keyed on the backbone (names, fingerprints) changes.
        While the block runs the shared model and :attr:`embedding` live on ``device``: do not use a
        backbone other threads are running at the same time (the CLI runs one command at a time; the app
        never asks for another device). Already there: nothing moves. ``device`` must be valid
        (:func:`embviz.compressors.check_device`).
        """
        target = resolve_device(device)
        home = self.device
        if target == home:
            yield target
            return
        try:
            self.model.to(target)
            yield target
        finally:  # also after a move that failed halfway (e.g. out of device memory)
            self.model.to(home)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        embedding: torch.Tensor | None = None,
        mode: Mode = "input",
        **model_kwargs: Any,
    ) -> Any:
        """The model's output (``.logits``, and a key/value cache when ``model_kwargs`` ask for one) with an
        optional replacement embedding matrix, under ``torch.inference_mode``.

        ``mode="input"`` replaces only the input embedding (the paper's setting; the output layer keeps the
        original matrix); ``mode="tied"`` also uses ``embedding`` as the output projection. The shared model
        is not modified, so calls from several threads with different variants are safe.

        Raises:
            BadInputError: an unknown mode, an embedding of the wrong shape, or tied mode on an untied model.
        """
        if mode not in MODES:
            raise BadInputError(f"unknown substitution mode {mode!r}; use one of {', '.join(MODES)}")
        with torch.inference_mode():
            if embedding is None:
                return self.model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
            self._check_variant(embedding, mode)
            embeds = F.embedding(input_ids, embedding)
            token = _OUTPUT_WEIGHT.set(embedding if mode == "tied" else None)
            try:
                return self.model(inputs_embeds=embeds, attention_mask=attention_mask, **model_kwargs)
            finally:
                _OUTPUT_WEIGHT.reset(token)

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        embedding: torch.Tensor | None = None,
        mode: Mode = "input",
    ) -> torch.Tensor:
        """Token logits (batch x seq x V) with an optional replacement embedding matrix (see :meth:`forward`)."""
        options = {"use_cache": False} if self.kind == "causal" else {}
        return self.forward(input_ids, attention_mask, embedding=embedding, mode=mode, **options).logits

    def input_gradients(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The gradient of the summed cross-entropy at the scored positions (``labels`` other than -100, aligned
        with the logits as :mod:`embviz.perplexity` builds them) with respect to every position's input
        embedding row: batch x seq x D, float32, zero where ``attention_mask`` is 0.

        The original embedding, the weights untouched (they do not require gradients); used to measure
        which directions of an embedding row the model is sensitive to (:mod:`embviz.sensitivity`).
        """
        embeds = F.embedding(input_ids, self.embedding).clone().requires_grad_(True)
        options = {"use_cache": False} if self.kind == "causal" else {}
        with torch.enable_grad():
            logits = self.model(inputs_embeds=embeds, attention_mask=attention_mask, **options).logits
            # cross_entropy's default ignore_index (-100) is the label of unscored positions
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
            (gradient,) = torch.autograd.grad(loss, embeds)
        return gradient.detach() * attention_mask[..., None].to(gradient.dtype)

    def _check_variant(self, embedding: torch.Tensor, mode: Mode) -> None:
        if tuple(embedding.shape) != (self.vocab_size, self.hidden_size):
            raise BadInputError(
                f"replacement embedding has shape {tuple(embedding.shape)}, "
                f"expected {(self.vocab_size, self.hidden_size)} for {self.name}"
            )
        if mode == "tied" and not self.tied:
            raise BadInputError(f"{self.name} has separate input and output embeddings: use mode 'input'")


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _check_safetensors_only(folder: Path, name: str) -> None:
    """Refuse a model folder whose weights exist only as pickles (loading a pickle can run any code)."""
    config = folder / "config.json"
    try:
        explicit = json.loads(config.read_text(encoding="utf-8")).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        explicit = None  # no or broken config: transformers reports that
    if explicit is not None and not str(explicit).endswith((".safetensors", ".safetensors.index.json")):
        raise BadInputError(
            f"{name}: its config names the weights file {explicit!r}; only safetensors are loaded"
        )
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")):
        return
    pickles = sorted(path.name for path in folder.iterdir() if path.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise BadInputError(
            f"{name} has weights only in pickle files ({', '.join(pickles[:3])}); embviz loads weights only "
            "from safetensors, which cannot run code. Convert the model (save_pretrained writes safetensors)."
        )


def reserved_token_ids(tokenizer: object) -> frozenset[int]:
    """Ids a tokenizer reserves: its special tokens plus added tokens flagged special.

    ``all_special_ids`` alone misses e.g. SmolLM2's ``<repo_name>`` / ``<jupyter_code>`` markers, which are
    added tokens with ``special=True``; pass this to :func:`token_classes` as ``special_ids``.
    """
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    flagged = {int(i) for i, token in added.items() if getattr(token, "special", False)}
    return frozenset({int(i) for i in getattr(tokenizer, "all_special_ids", [])} | flagged)


def info_from_files(
    folder: Path,
    *,
    name: str | None = None,
    kind: Kind | None = None,
    trained_head: bool = True,
    note: str = "",
    source_format: str | None = None,
    source_bits_per_weight: float | None = None,
) -> BackboneInfo | None:
    """Facts about the model in ``folder`` read from its ``config.json`` and safetensors headers, unloaded.

    ``source_format`` / ``source_bits_per_weight`` as in :meth:`Backbone.from_pretrained` (by default the
    embedding's stored dtype, from the headers).

    About a second instead of several (no model classes are imported, no weights read). ``total_params``
    then counts the parameters stored in the checkpoint (a head the loader would initialise, such as
    minilm's masked-LM head, is not among them). None when the files do not say (no safetensors, no
    explicit architecture and no ``kind``): load the model instead.
    """
    weights = sorted(folder.glob("*.safetensors"))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    kind = kind or _kind_from_architectures(config.get("architectures"))
    vocab, hidden = config.get("vocab_size"), config.get("hidden_size")
    total = safetensors_parameters(weights) if weights else None
    if kind is None or not isinstance(vocab, int) or not isinstance(hidden, int) or not total:
        return None
    if source_format is None:
        source_format, source_bits_per_weight = embedding_storage(weights, vocab, hidden)
    return BackboneInfo(
        name=str(folder) if name is None else name,
        kind=kind,
        vocab_size=vocab,
        hidden_size=hidden,
        tied=bool(config.get("tie_word_embeddings", True)),
        embedding_params=vocab * hidden,
        total_params=total,
        embedding_share=round(vocab * hidden / total, 4),
        source=str(folder),
        trained_head=trained_head,
        note=note,
        source_format=source_format,
        source_bits_per_weight=source_bits_per_weight,
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def _hub_cached(repo_id: str) -> bool:
    """Whether a hub id already has a config in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine gets an answer at once instead of minutes of retries."""
    if _offline():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname or "", endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def hub_available(repo_id: str) -> bool:
    """Whether ``repo_id`` can be loaded from the hub: its config is cached locally, or the hub answers."""
    return _hub_cached(repo_id) or _hub_reachable()
