"""Compressed-embedding artifacts on disk, and the cache that builds each configuration once.

An artifact is a folder holding ``weights.safetensors`` (``codes``, ``decoder``, ``decoder_bias`` or
``dense``) and ``manifest.json`` (backbone, method, full compressor config, rank, ratio, params, bytes,
seed, library versions, training history, train seconds, the sha256 fingerprint of the source matrix and
the sha256 of the weights file). A quantised variant stores its integer ``qcodes`` (and float16 ``qscales``;
GGUF blocks keep theirs inside the codes) in place of the float32 ``dense`` or ``codes``; loading turns them
back into floats through the method's registered ``decode`` (:class:`~embviz.compressors.MethodSpec`), and a decoder that is exact in
float16 is stored as float16, so the file's size reflects the deployed form. The weights file's own metadata carries the sha256 of the manifest, so an
edit to either file is detected. Loading never unpickles anything: tensors come from safetensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from embviz.cache import (
    atomic_directory,
    cache_dir,
    config_key,
    locked,
    matrix_fingerprint,
    remove_stale_temporaries,
    sha256_bytes,
)
from embviz.compressors.base import CompressedEmbedding, Compressor, ProgressCallback
from embviz.compressors.registry import find_method
from embviz.errors import EmbvizError
from embviz.resources import reserve_memory
from embviz.version import __version__

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
TENSOR_NAMES = ("codes", "decoder", "decoder_bias", "dense")
QUANTIZED_NAMES = ("qcodes", "qscales", "qbits")
STORED_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "codes": (torch.float32,),
    "decoder": (torch.float32, torch.float16),
    "decoder_bias": (torch.float32,),
    "dense": (torch.float32,),
    "qcodes": (torch.int8, torch.uint8),
    "qscales": (torch.float16,),
    "qbits": (torch.uint8,),
}
"""Every tensor name an artifact may hold, with the dtypes it may be stored in."""
MANIFEST_HASH_KEY = "embviz_manifest_sha256"


class ArtifactError(EmbvizError):
    """An artifact is missing, corrupt, tampered with, or belongs to another matrix."""


@dataclass(frozen=True)
class ArtifactResult:
    """What :func:`compress_cached` produced: the embedding, where it is stored, and whether it was reused."""

    compressed: CompressedEmbedding
    path: Path | None
    cached: bool
    notice: str | None = None


# -- fingerprints --------------------------------------------------------------------------------------


def variant_key(compressed: CompressedEmbedding) -> str:
    """A content hash of a compressed embedding (its stored tensors and decoder activation).

    Used to key the variant's cached perplexities and neighbour tables; the tensors' fingerprints are
    memoised, so this is cheap after the first call.
    """
    parts = [
        f"{name}:{matrix_fingerprint(tensor)}"
        for name in TENSOR_NAMES
        if (tensor := getattr(compressed, name)) is not None
    ]
    parts.append(f"activation:{compressed.decoder_activation}")
    return sha256_bytes("|".join(parts).encode())[:32]


# -- save / load ---------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """The embviz, torch and transformers versions, as recorded in every manifest embviz writes."""
    import transformers

    return {"embviz": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def canonical_json(manifest: dict[str, Any], *, without: str = "weights_sha256") -> bytes:
    """A manifest's hashed form: canonical JSON of every field except ``without`` (the field that itself
    records hashes, so the two can be written together)."""
    body = {key: value for key, value in manifest.items() if key != without}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def json_roundtrip(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, other objects strings)."""
    return json.loads(json.dumps(value, default=str))


def save_artifact(
    path: Path, compressed: CompressedEmbedding, backbone_name: str, fingerprint: str
) -> dict[str, Any]:
    """Write ``compressed`` as an artifact folder at ``path`` (atomically; replaces an existing one).

    Returns the manifest written.
    """
    tensors = encode_tensors(compressed)
    vocab, hidden = compressed.shape
    manifest: dict[str, Any] = json_roundtrip(
        {
            "format_version": FORMAT_VERSION,
            "backbone": backbone_name,
            "method": compressed.method,
            "label": compressed.label,
            "config": compressed.config,
            "shape": [vocab, hidden],
            "rank": compressed.rank,
            "ratio": compressed.ratio,
            "params": compressed.params,
            "bytes": compressed.bytes,
            "stored_bytes": compressed.stored_bytes,
            "decoder_activation": compressed.decoder_activation,
            "tensors": {name: list(tensor.shape) for name, tensor in tensors.items()},
            "seed": compressed.config.get("seed"),
            "versions": versions(),
            "history": compressed.history,
            "train_seconds": compressed.train_seconds,
            "fingerprint": fingerprint,
        }
    )
    weights = save_safetensors(tensors, metadata={MANIFEST_HASH_KEY: sha256_bytes(canonical_json(manifest))})
    manifest["weights_sha256"] = sha256_bytes(weights)
    with atomic_directory(Path(path)) as tmp:
        (tmp / WEIGHTS_FILE).write_bytes(weights)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def encode_tensors(compressed: CompressedEmbedding) -> dict[str, torch.Tensor]:
    """The tensors that store ``compressed`` (in artifacts and exports), on the CPU, by name.

    float32 unless quantised (integer codes and float16 scales) or exactly representable in float16;
    :func:`decode_tensors` turns them back into the embedding.
    """
    tensors = {
        name: tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        for name in TENSOR_NAMES
        if (tensor := getattr(compressed, name)) is not None
    }
    if compressed.qcodes is not None:
        tensors.pop("codes" if compressed.low_rank else "dense")
        tensors.update(
            {
                name: tensor.detach().cpu().contiguous()
                for name in QUANTIZED_NAMES
                if (tensor := getattr(compressed, name)) is not None
            }
        )
    decoder = tensors.get("decoder")
    if decoder is not None and torch.equal(decoder.half().float(), decoder):
        tensors["decoder"] = decoder.half()
    return tensors


def read_safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's JSON header (read without loading tensors)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not a mapping")
    return metadata


def read_manifest(path: Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of an artifact folder (not validated against the weights).

    Raises:
        ArtifactError: missing, unreadable, or not a JSON object of this format version.
    """
    if Path(path).exists() and not Path(path).is_dir():
        raise ArtifactError(f"no artifact at {path} (an artifact is a folder, this is a file)")
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"no artifact at {path} (manifest missing)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"manifest of {path} does not parse ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"manifest of {path} is not an embviz artifact of format {FORMAT_VERSION}")
    return manifest


def load_artifact(path: Path, expected_fingerprint: str | None = None) -> CompressedEmbedding:
    """Load and validate an artifact folder.

    Checks that the manifest parses, the weights hash matches, the manifest is the one the weights were
    saved with, tensor shapes agree with the manifest, and (when given) the source-matrix fingerprint.

    Raises:
        ArtifactError: any check fails.
    """
    return _load(Path(path), expected_fingerprint)[0]


def _load(path: Path, expected_fingerprint: str | None) -> tuple[CompressedEmbedding, dict[str, Any]]:
    manifest = read_manifest(path)
    try:
        data = (path / WEIGHTS_FILE).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"weights of {path} cannot be read ({exc.strerror or exc})") from exc
    if sha256_bytes(data) != manifest.get("weights_sha256"):
        raise ArtifactError(f"weights of {path} do not match their recorded hash (truncated or modified)")
    try:
        metadata = read_safetensors_metadata(data)
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ArtifactError(f"weights of {path} are not a valid safetensors file ({exc})") from exc
    if metadata.get(MANIFEST_HASH_KEY) != sha256_bytes(canonical_json(manifest)):
        raise ArtifactError(f"manifest of {path} was modified after the artifact was written")
    if expected_fingerprint is not None and manifest.get("fingerprint") != expected_fingerprint:
        raise ArtifactError(f"artifact {path} was made from a different embedding matrix")
    try:
        compressed = decode_tensors(manifest, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"artifact {path} is inconsistent ({exc})") from exc
    return compressed, manifest


def decode_tensors(manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CompressedEmbedding:
    """The compressed embedding from the tensors :func:`encode_tensors` gave and the manifest describing them.

    ``manifest`` needs ``tensors`` (name -> shape), ``method``, ``config``, ``rank``, ``shape``,
    ``history``, ``train_seconds``, ``stored_bytes`` and ``decoder_activation``.

    Raises:
        ValueError, KeyError, TypeError: the tensors or the manifest are inconsistent.
    """
    unknown = set(tensors) - set(STORED_DTYPES)
    shapes = {name: list(tensor.shape) for name, tensor in tensors.items()}
    if unknown or shapes != manifest["tensors"]:
        raise ValueError(f"tensors {shapes} differ from the manifest's {manifest['tensors']}")
    if any(tensor.dtype not in STORED_DTYPES[name] for name, tensor in tensors.items()):
        raise ValueError("a tensor is stored in a dtype its role does not allow")
    spec = find_method(manifest["method"])  # None: a method this installation does not register
    if spec is not None and set(tensors) != set(spec.stores):
        raise ValueError(f"{spec.id} stores {', '.join(spec.stores)}, not {', '.join(sorted(tensors))}")
    if "decoder" in tensors:
        tensors["decoder"] = tensors["decoder"].to(torch.float32)
    if set(tensors) & set(QUANTIZED_NAMES):
        # How stored codes become floats is the method's own business (its spec's ``decode``).
        if spec is None or spec.decode is None:
            raise ValueError(
                f"method {manifest['method']!r} is not registered here, so its quantised tensors cannot be "
                "decoded"
            )
        vocab, hidden = manifest["shape"]
        decoded = spec.decode(manifest["config"], dict(tensors), (int(vocab), int(hidden)), manifest["rank"])
        if not set(decoded) <= {"codes", "dense"} or set(decoded) & set(tensors):
            raise ValueError(
                f"{spec.id} decodes into {', '.join(sorted(decoded))} beside {', '.join(sorted(tensors))}"
            )
        tensors.update(decoded)
    compressed = CompressedEmbedding(
        method=manifest["method"],
        config=manifest["config"],
        codes=tensors.get("codes"),
        decoder=tensors.get("decoder"),
        decoder_bias=tensors.get("decoder_bias"),
        dense=tensors.get("dense"),
        history=manifest["history"],
        train_seconds=float(manifest["train_seconds"]),
        stored_bytes=manifest["stored_bytes"],
        decoder_activation=manifest["decoder_activation"],
        qcodes=tensors.get("qcodes"),
        qscales=tensors.get("qscales"),
        qbits=tensors.get("qbits"),
    )
    bias = compressed.decoder_bias
    if list(compressed.shape) != manifest["shape"] or compressed.rank != manifest["rank"]:
        raise ValueError(f"shape {compressed.shape} rank {compressed.rank} differ from the manifest")
    if bias is not None and (compressed.dense is not None or tuple(bias.shape) != (compressed.shape[1],)):
        raise ValueError(f"decoder bias of shape {tuple(bias.shape)} does not fit")
    return compressed


# -- the artifact cache --------------------------------------------------------------------------------
def _slug(name: str) -> str:
    """A folder-safe name for a backbone (a path or hub id gets its tail plus a short hash)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    if safe == name and len(name) <= 64:
        return name
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.rstrip("/\\")).name).strip("._")[:40] or "model"
    return f"{tail}-{sha256_bytes(name.encode())[:8]}"


def artifact_key(backbone_name: str, fingerprint: str, config: dict[str, Any]) -> str:
    """The cache key of a (backbone, matrix, compressor configuration) triple."""
    return config_key(
        {
            "backbone": backbone_name,
            "fingerprint": fingerprint,
            "compressor": config,
            "format": FORMAT_VERSION,
        }
    )


def artifact_path(backbone_name: str, fingerprint: str, compressor: Compressor) -> Path:
    """Where :func:`compress_cached` keeps this configuration (raises EmbvizError if the cache is unusable)."""
    config = compressor.get_config()
    rank = f"-r{config['rank']}" if config.get("rank") else ""
    key = artifact_key(backbone_name, fingerprint, config)
    return cache_dir("artifacts", _slug(backbone_name)) / f"{compressor.method}{rank}-{key}"


def fit_reservation(
    compressor: Compressor, embedding: torch.Tensor
) -> contextlib.AbstractContextManager[None]:
    """The memory a fit needs by its method's prediction, reserved while the block it opens runs (refused
    with :class:`~embviz.errors.ResourceError` before any work when it does not fit); a method the registry
    does not know reserves nothing."""
    spec = find_method(compressor.method)
    if spec is None or embedding.ndim != 2:
        return contextlib.nullcontext()
    vocab, hidden = embedding.shape
    rank = compressor.get_config().get("rank")
    return reserve_memory(
        f"fitting {spec.label} on a {vocab:,} x {hidden:,} matrix",
        spec.memory_to_fit(vocab, hidden, rank if isinstance(rank, int) else None),
    )


def compress_cached(
    backbone_name: str,
    embedding: torch.Tensor,
    compressor: Compressor,
    progress: ProgressCallback | None = None,
) -> ArtifactResult:
    """Load this configuration's artifact from the cache, or fit, save and return it.

    Two processes asking for the same configuration build it once (a file lock). A cached entry that fails
    validation is rebuilt, and ``notice`` says so; if the cache itself is unusable the compressor is fitted
    without caching (``path`` None, ``notice`` set). A cancelled fit (:class:`TrainingCancelled`) saves
    nothing.
    """
    fingerprint = matrix_fingerprint(embedding)
    try:
        path = artifact_path(backbone_name, fingerprint, compressor)
    except EmbvizError as exc:
        with fit_reservation(compressor, embedding):
            compressed = compressor.fit(embedding, progress)
        return ArtifactResult(compressed, None, False, f"artifact cache unusable ({exc}); result not saved")
    notice = None
    with locked(path):
        remove_stale_temporaries(path)  # left by a process killed while saving
        if path.exists():
            try:
                compressed, manifest = _load(path, fingerprint)
                if manifest["backbone"] != backbone_name or manifest["config"] != json_roundtrip(
                    compressor.get_config()
                ):
                    raise ArtifactError("its manifest describes another configuration")
                return ArtifactResult(compressed, path, True)
            except ArtifactError as exc:
                notice = f"cached artifact was corrupt ({exc}); rebuilt"
                logger.warning(notice)
        with fit_reservation(compressor, embedding):
            compressed = compressor.fit(embedding, progress)
        try:
            save_artifact(path, compressed, backbone_name, fingerprint)
        except OSError as exc:
            message = f"could not save the artifact ({exc.strerror or exc}); result not cached"
            return ArtifactResult(compressed, None, False, f"{notice}; {message}" if notice else message)
    return ArtifactResult(compressed, path, False, notice)
