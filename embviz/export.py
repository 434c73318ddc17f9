"""Deployable exports: a Hugging Face model folder whose token embedding is stored in compressed form.

:func:`export_compressed` writes, atomically (a temporary sibling renamed into place):

* ``config.json`` (and ``generation_config.json`` for causal models) and the tokenizer files;
* ``model.safetensors``: every weight except the token embedding, under the names ``save_pretrained``
  uses. In ``tied`` mode the output projection is the compressed matrix too, so no V x D matrix is stored;
  in ``input`` mode the output layer keeps the original matrix: for a tied model it is stored once, untied
  (``tie_word_embeddings`` false in the config), so the folder saves nothing on the output head;
* ``compressed_embedding.safetensors``: the embedding in the form its byte count promises, the same tensors
  an artifact stores (:mod:`embviz.artifacts`): float32 ``codes`` + ``decoder`` (+ ``decoder_bias``) for
  SVD / AE, int8 (int4 packed two per byte) ``qcodes`` + float16 ``qscales`` for quantised rows, and
  quantised codes + a float16 decoder for quantised low-rank methods. Its metadata carries the sha256 of the
  manifest, so an edit to either is detected;
* ``embviz_export.json``: method, label, rank, mode, compressor config, byte counts, the output head's
  treatment, the source model and matrix fingerprint, versions, and the sha256 and size of every file.

:func:`load_compressed` checks all of that (any corruption or tampering is one :class:`ExportError`),
loads the weights from safetensors only (never a pickle, never remote code), decodes the embedding exactly
as :meth:`~embviz.compressors.base.CompressedEmbedding.reconstruct` does and installs it as the input
embedding (and the tied output layer in ``tied`` mode). The resulting :class:`~embviz.backbones.Backbone`
computes the same logits as the source backbone running the in-memory variant in that mode, and
:func:`embviz.sources.load_model` (hence every CLI command) goes through it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file

from embviz.artifacts import (
    MANIFEST_FILE,
    MANIFEST_HASH_KEY,
    WEIGHTS_FILE,
    canonical_json,
    decode_tensors,
    encode_tensors,
    json_roundtrip,
    matrix_fingerprint,
    read_safetensors_metadata,
    variant_key,
    versions,
)
from embviz.backbones import MODES, Backbone, Mode, input_embedding_weight, quiet_transformers
from embviz.cache import atomic_directory, sha256_bytes, sha256_file
from embviz.compressors.base import CompressedEmbedding
from embviz.corpora import resolve_texts
from embviz.errors import BadInputError, EmbvizError
from embviz.perplexity import (
    DEFAULT_MAX_TOKENS,
    REFERENCE,
    build_eval_set,
    evaluate_perplexity,
    score_variant,
)
from embviz.resources import check_memory, config_parameters, format_bytes, model_memory
from embviz.rng import seeded

if TYPE_CHECKING:  # transformers is imported where it is used: its import takes seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EXPORT_FORMAT = "embviz-export"
EXPORT_VERSION = 1
EXPORT_MANIFEST = "embviz_export.json"
EMBEDDING_FILE = "compressed_embedding.safetensors"
MODEL_FILE = "model.safetensors"


class ExportError(EmbvizError):
    """An export cannot be written, or a folder is not a valid, untampered embviz export."""


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding an embviz export (its manifest or its compressed embedding)."""
    try:
        return any((Path(path) / name).is_file() for name in (EXPORT_MANIFEST, EMBEDDING_FILE))
    except (OSError, ValueError):
        return False


def artifact_folder(path: str | Path) -> Path:
    """The artifact folder for ``path``: the folder itself, or the folder of its weights / manifest file."""
    path = Path(path)
    return path.parent if path.is_file() and path.name in (WEIGHTS_FILE, MANIFEST_FILE) else path


# -- writing ---------------------------------------------------------------------------------------------
def _key_of(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    """The state-dict name of ``module``'s weight inside ``model``."""
    return next((f"{name}.weight" for name, sub in model.named_modules() if sub is module), None)


def _model_tensors(backbone: Backbone, mode: Mode) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The non-embedding weights to store (``input`` mode on a tied model: the output matrix, untied).

    Returns the tensors and a description of the embedding's keys: ``input_key``, ``removed_keys`` (not
    stored: the compressed matrix stands in for them) and ``output_head``.
    """
    model = backbone.model
    embedding = input_embedding_weight(model).detach()
    shared = embedding.untyped_storage().data_ptr()
    state = model.state_dict()
    removed = [key for key, tensor in state.items() if tensor.untyped_storage().data_ptr() == shared]
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        if key not in removed:  # a second name for one storage gets its own copy (safetensors needs that)
            tensors[key] = tensor.detach().clone() if storage in seen else tensor.detach().contiguous()
            seen.add(storage)
    input_key = _key_of(model, model.get_input_embeddings())
    if mode == "input" and backbone.tied:
        output_key = _key_of(model, model.get_output_embeddings())
        assert output_key is not None  # a tied model has an output layer, and it is one of its modules
        tensors[output_key] = embedding.clone()
        removed.remove(output_key)
        head = "original matrix, stored untied in model.safetensors (input mode saves nothing on it)"
    elif mode == "input":
        head = "the model's own (untied) output layer, stored in model.safetensors"
    else:
        head = "the compressed matrix (tied to the input embedding; not stored separately)"
    return tensors, {"input_key": input_key, "removed_keys": removed, "output_head": head}


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty folder (unless ``overwrite`` and it is an export)."""
    try:
        if out.exists() and not out.is_dir():
            raise ExportError(f"output path {out} exists and is not a folder")
        if not out.is_dir() or not any(out.iterdir()):
            return
    except OSError as exc:
        raise ExportError(f"cannot use output folder {out} ({exc.strerror or exc})") from exc
    if not overwrite:
        raise ExportError(f"output folder {out} exists and is not empty; pass --force to replace an export")
    if not is_export(out):
        raise ExportError(
            f"output folder {out} is not empty and is not an embviz export; refusing to replace it "
            "(even with --force): choose a new folder"
        )


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def export_compressed(
    backbone: Backbone,
    compressed: CompressedEmbedding,
    out_dir: str | Path,
    *,
    mode: Mode = "tied",
    overwrite: bool = False,
    artifact: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``backbone`` with ``compressed`` as its token embedding to the HF folder ``out_dir``.

    ``mode="tied"`` makes the compressed matrix the output projection too (the backbone must be tied);
    ``"input"`` keeps the original output layer. ``overwrite`` replaces an existing export at ``out_dir``
    (a non-empty folder that is not an export is never replaced). ``artifact`` is recorded as provenance.

    Returns the export's facts: ``folder``, byte counts (``embedding_bytes`` on disk, ``original_bytes``
    of the float32 matrix, ``ratio``, ``folder_bytes``, ...), ``output_head`` and ``warnings``.

    Raises:
        BadInputError: bad mode, tied mode on an untied model, or an embedding of the wrong shape.
        ExportError: the target is not usable, cannot be written, or the stored form's bytes exceed the
            method's stated byte count.
    """
    if mode not in MODES:
        raise BadInputError(f"unknown substitution mode {mode!r}; use one of {', '.join(MODES)}")
    if compressed.shape != (backbone.vocab_size, backbone.hidden_size):
        raise BadInputError(
            f"compressed embedding has shape {compressed.shape}, expected "
            f"{(backbone.vocab_size, backbone.hidden_size)} for {backbone.name}"
        )
    if mode == "tied" and not backbone.tied:
        raise BadInputError(f"{backbone.name} has separate input and output embeddings: use mode 'input'")
    out = Path(out_dir)
    _check_target(out, overwrite)
    embedding_tensors = encode_tensors(compressed)
    stored = _nbytes(embedding_tensors)
    if stored > compressed.bytes:
        raise ExportError(
            f"the stored form of {compressed.label} takes {stored:,} bytes, more than the "
            f"{compressed.bytes:,} its method states; not exporting a misleading size"
        )
    model_tensors, keys = _model_tensors(backbone, mode)
    vocab, hidden = compressed.shape
    original = 4 * vocab * hidden
    manifest: dict[str, Any] = json_roundtrip(
        {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "embviz_version": versions()["embviz"],
            "versions": versions(),
            "source_model": backbone.name,
            "source": backbone.source,
            "source_fingerprint": matrix_fingerprint(backbone.embedding),
            "artifact": str(artifact) if artifact is not None else None,
            "kind": backbone.kind,
            "trained_head": backbone.trained_head,
            "note": backbone.note,
            "mode": mode,
            "source_tied": backbone.tied,
            **keys,
            "method": compressed.method,
            "label": compressed.label,
            "rank": compressed.rank,
            "config": compressed.config,
            "shape": [vocab, hidden],
            "decoder_activation": compressed.decoder_activation,
            "stored_bytes": compressed.stored_bytes,
            "train_seconds": compressed.train_seconds,
            "tensors": {name: list(tensor.shape) for name, tensor in embedding_tensors.items()},
            "dtypes": {name: str(tensor.dtype) for name, tensor in embedding_tensors.items()},
            "bytes": {
                "embedding_tensors": stored,
                "stated": compressed.bytes,
                "original_float32": original,
                "byte_ratio": original / stored,
                "model_file_tensors": _nbytes(model_tensors),
            },
        }
    )
    weights = save_safetensors(
        embedding_tensors,
        metadata={MANIFEST_HASH_KEY: sha256_bytes(canonical_json(manifest, without="files"))},
    )
    config = copy.deepcopy(backbone.model.config)
    config.architectures = [type(backbone.model).__name__]
    if mode == "input" and backbone.tied:
        config.tie_word_embeddings = False
    try:
        with atomic_directory(out) as tmp, quiet_transformers():
            config.save_pretrained(tmp)
            generation = getattr(backbone.model, "generation_config", None)
            if backbone.kind == "causal" and generation is not None:
                generation.save_pretrained(tmp)
            backbone.tokenizer.save_pretrained(tmp)
            save_file(model_tensors, tmp / MODEL_FILE, metadata={"format": "pt"})
            (tmp / EMBEDDING_FILE).write_bytes(weights)
            manifest["files"] = {
                path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
                for path in sorted(tmp.iterdir())
            }
            (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            _usual_permissions(tmp)
    except OSError as exc:
        raise ExportError(f"cannot write the export to {out} ({exc.strerror or exc})") from exc
    return _facts(out, manifest)


def _usual_permissions(folder: Path) -> None:
    """Give every file the mode the user's umask gives a new file (safetensors and mkdtemp use 0600/0700)."""
    mode = (folder / EXPORT_MANIFEST).stat().st_mode & 0o666
    for path in folder.iterdir():
        path.chmod(mode)
    folder.chmod(mode | (mode & 0o444) >> 2)


def _facts(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The summary of a written export (as printed by ``embviz export``)."""
    files = manifest["files"]
    counts = manifest["bytes"]
    embedding_file = files[EMBEDDING_FILE]["bytes"]
    warnings = []
    if manifest["mode"] == "input" and manifest["source_tied"]:
        warnings.append(
            f"input mode keeps the original {manifest['shape'][0]} x {manifest['shape'][1]} output matrix "
            f"({format_bytes(counts['original_float32'])}, untied) in {MODEL_FILE}: for a tied model it saves "
            "nothing on disk for the output head; use --mode tied to store the matrix only compressed"
        )
    return {
        "folder": str(out),
        "source_model": manifest["source_model"],
        "method": manifest["method"],
        "label": manifest["label"],
        "rank": manifest["rank"],
        "mode": manifest["mode"],
        "embedding_file_bytes": embedding_file,
        "embedding_bytes": counts["embedding_tensors"],
        "stated_bytes": counts["stated"],
        "original_bytes": counts["original_float32"],
        "ratio": round(counts["byte_ratio"], 4),
        "file_ratio": round(counts["original_float32"] / embedding_file, 4),
        "model_file_bytes": files[MODEL_FILE]["bytes"],
        "folder_bytes": sum(entry["bytes"] for entry in files.values())
        + (out / EXPORT_MANIFEST).stat().st_size,
        "output_head": manifest["output_head"],
        "warnings": warnings,
    }


# -- loading ---------------------------------------------------------------------------------------------
def read_export_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed ``embviz_export.json`` of an export folder (files not yet checked).

    Raises:
        ExportError: missing, unreadable, or not an export manifest of this format version.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ExportError(f"no embviz export at {folder} (not a folder)")
    try:
        manifest = json.loads((folder / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ExportError(f"no embviz export at {folder} ({EXPORT_MANIFEST} missing)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{EXPORT_MANIFEST} of {folder} does not parse ({exc})") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != EXPORT_FORMAT
        or manifest.get("format_version") != EXPORT_VERSION
        or not isinstance(manifest.get("files"), dict)
    ):
        raise ExportError(f"{folder} is not an embviz export of format version {EXPORT_VERSION}")
    return manifest


def _verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present with its recorded hash, nothing unlisted beside them."""
    files = manifest["files"]
    present = {path.name for path in folder.iterdir()} - {EXPORT_MANIFEST}
    if not {EMBEDDING_FILE, MODEL_FILE, "config.json"} <= set(files):
        raise ExportError(f"the manifest of {folder} does not list the export's files")
    if present - set(files):
        raise ExportError(
            f"{folder} holds files its manifest does not list: {', '.join(sorted(present - set(files)))}"
        )
    for name, entry in files.items():
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ExportError(f"the manifest of {folder} lists a file outside the folder: {name!r}")
        path = folder / name
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise ExportError(
                f"{name} of the export {folder} cannot be read ({exc.strerror or exc})"
            ) from exc
        if not isinstance(entry, dict) or digest != entry.get("sha256"):
            raise ExportError(
                f"{name} of the export {folder} does not match its recorded hash (modified or truncated)"
            )


def _read_embedding(folder: Path, manifest: dict[str, Any]) -> CompressedEmbedding:
    """The compressed embedding, after checking that the manifest is the one it was written with."""
    data = (folder / EMBEDDING_FILE).read_bytes()
    try:
        metadata = read_safetensors_metadata(data)
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{EMBEDDING_FILE} of {folder} is not a valid safetensors file ({exc})") from exc
    if metadata.get(MANIFEST_HASH_KEY) != sha256_bytes(canonical_json(manifest, without="files")):
        raise ExportError(f"{EXPORT_MANIFEST} of {folder} was modified after the export was written")
    try:
        return decode_tensors({**manifest, "history": []}, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"the compressed embedding of {folder} is inconsistent ({exc})") from exc


def _load_model(folder: Path, manifest: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The HF model (embedding still unset) and tokenizer from the folder: safetensors, no remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    options = {"trust_remote_code": False, "local_files_only": True}
    auto = AutoModelForMaskedLM if manifest.get("kind") == "masked" else AutoModelForCausalLM
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(folder, **options)
            if [config.vocab_size, config.hidden_size] != manifest["shape"]:
                raise ExportError(f"the config of {folder} does not fit its {manifest['shape']} embedding")
            parameters = config_parameters(config)
            if parameters is not None:
                check_memory(f"loading the export {folder}", model_memory(parameters))
            with seeded(0):  # the embedding is initialised before it is replaced: keep that reproducible
                loaded = auto.from_pretrained(
                    folder,
                    config=config,
                    dtype=torch.float32,
                    use_safetensors=True,
                    output_loading_info=True,
                    trust_remote_code=False,
                    local_files_only=True,
                )
            # with output_loading_info, from_pretrained returns (model, info); it is typed as the model alone
            model, info = cast("tuple[PreTrainedModel, dict[str, Any]]", loaded)
            tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    except EmbvizError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot load the export {folder} ({reason[:200]})") from exc
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ()) | {str(k) for k in info.get("mismatched_keys") or ()}
    if not missing <= set(manifest["removed_keys"]) or unexpected:
        raise ExportError(
            f"the weights of {folder} do not fit its config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return model, tokenizer


def _install(model: PreTrainedModel, matrix: torch.Tensor, mode: str, folder: Path) -> None:
    """Make ``matrix`` the input embedding (and, in tied mode, the output projection)."""
    embedding = input_embedding_weight(model)
    output = model.get_output_embeddings()
    shares = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    if mode == "input" and shares:
        raise ExportError(f"{folder}: the model ties its output layer to the embedding despite its config")
    with torch.no_grad():
        embedding.copy_(matrix)
        if mode == "tied" and not shares:
            output.weight.copy_(matrix)


def load_compressed(path: str | Path, *, name: str | None = None) -> Backbone:
    """Load an export written by :func:`export_compressed` as a working :class:`Backbone`.

    Validates the manifest, every file's sha256 and the compressed tensors, loads the non-embedding weights
    (safetensors only, no remote code), decodes the embedding (dequantised rows, or ``codes @ decoder``
    (+ bias, ELU if set)) and installs it. ``name`` defaults to ``path`` as given. The backbone's
    ``source_format`` is the export's method label and ``source_bits_per_weight`` the compressed embedding's
    stored bits per weight, from the manifest.

    Raises:
        ExportError: not an export, a file missing, corrupt or modified, or weights that do not fit.
    """
    folder = Path(path)
    manifest = read_export_manifest(folder)
    _verify_files(folder, manifest)
    compressed = _read_embedding(folder, manifest)
    if manifest.get("mode") not in MODES or manifest.get("kind") not in ("masked", "causal"):
        raise ExportError(f"{EXPORT_MANIFEST} of {folder} names an unknown mode or model kind")
    model, tokenizer = _load_model(folder, manifest)
    _install(model, compressed.reconstruct(), manifest["mode"], folder)
    digest = sha256_bytes(json.dumps(manifest["files"], sort_keys=True).encode())[:12]
    return Backbone(
        name or str(path),
        model,
        tokenizer,
        manifest["kind"],
        source=f"{folder} (embviz export {digest}: {manifest['label']}, {manifest['mode']} mode)",
        trained_head=bool(manifest.get("trained_head", True)),
        note=str(manifest.get("note") or ""),
        source_format=f"embviz export: {manifest['label']}",
        source_bits_per_weight=round(compressed.bits_per_weight, 4),
    )


# -- verification ----------------------------------------------------------------------------------------
def verify_export(
    backbone: Backbone,
    compressed: CompressedEmbedding,
    folder: str | Path,
    *,
    mode: Mode,
    text: str = "bible:test",
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Load the export back and compare it with the in-memory variant on held-out ``text``.

    Runs both on every batch of the perplexity protocol: ``identical_logits`` (``torch.equal`` on all of
    them), ``max_abs_logit_diff``, and both perplexities, the variant's through the same cached evaluation
    ``embviz evaluate`` uses, the export's computed afresh.
    """
    loaded = load_compressed(folder)
    texts = resolve_texts(text)
    budget = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    eval_set = build_eval_set(backbone, texts, max_tokens=budget)
    export_set = build_eval_set(loaded, texts, max_tokens=budget)
    matrix = compressed.reconstruct()
    identical, worst = True, 0.0
    for ours, theirs in zip(eval_set.batches, export_set.batches, strict=True):
        if not torch.equal(ours.input_ids, theirs.input_ids):
            raise ExportError(f"the export's tokenizer encodes {text!r} differently from {backbone.name}'s")
        expected = backbone.logits(ours.input_ids, ours.attention_mask, embedding=matrix, mode=mode)
        got = loaded.logits(theirs.input_ids, theirs.attention_mask)
        identical = identical and torch.equal(expected, got)
        worst = max(worst, float((expected - got).abs().max()))
    report = evaluate_perplexity(
        backbone,
        eval_set,
        {"compressed": matrix},
        mode=mode,
        variant_keys={"compressed": variant_key(compressed)},
    )
    variant = report.results["compressed"]
    exported = score_variant(loaded, export_set)
    return {
        "text": text,
        "tokens": exported.tokens,
        "perplexity_original": report.results[REFERENCE].perplexity,
        "identical_logits": identical,
        "max_abs_logit_diff": worst,
        "perplexity_variant": variant.perplexity,
        "perplexity_export": exported.perplexity,
        "perplexity_equal": variant.perplexity == exported.perplexity,
    }


__all__ = [
    "EMBEDDING_FILE",
    "EXPORT_MANIFEST",
    "MODEL_FILE",
    "ExportError",
    "artifact_folder",
    "export_compressed",
    "is_export",
    "load_compressed",
    "read_export_manifest",
    "verify_export",
]
