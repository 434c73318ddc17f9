"""embviz's on-disk cache: where it lives, atomic writes, locks, configuration keys, matrix fingerprints
and validated arrays (:func:`cached_arrays`).

Everything expensive (converted backbones, artifacts, neighbour tables, maps, Gram matrices, sweeps) is
stored under ``embviz_home()`` keyed by a hash of its full configuration. Writes go to a temporary sibling first and are
renamed into place, so a crash never leaves a half-written entry under the final name. A cache that cannot
be used (read-only, a file in the way, a full disk) is reported once and the work is done uncached.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import weakref
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import platformdirs
import torch

from embviz.errors import EmbvizError

HOME_ENV = "EMBVIZ_HOME"

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()


def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time this process meets it (one notice per broken cache)."""
    with _WARNED_LOCK:
        if message in _WARNED:
            return
        _WARNED.add(message)
    logger.warning(message)


def embviz_home() -> Path:
    """The cache root: ``$EMBVIZ_HOME`` if set, else the user's cache directory (``~/.cache/embviz``)."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("embviz"))


def _plain_name(part: str) -> str:
    """A single folder name: no separators, no ``.`` / ``..``, no NUL (cache paths never leave the cache)."""
    if part in ("", ".", "..") or any(bad in part for bad in ("/", "\\", "\x00")):
        raise EmbvizError(f"path {part!r} escapes the cache ({HOME_ENV})")
    return part


def cache_dir(*parts: str) -> Path:
    """A writable sub-directory of the cache, created on demand (``parts`` are plain folder names).

    Raises:
        EmbvizError: the cache cannot be created or written (read-only disk, a file in the way).
    """
    home = embviz_home()
    path = home.joinpath(*map(_plain_name, parts))
    for folder in dict.fromkeys((home, path)):  # the root first, so its problem is the one reported
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise EmbvizError(
                f"cache directory {folder} is not usable ({reason}); set {HOME_ENV} to a writable folder"
            ) from exc
        if not os.access(folder, os.W_OK):
            raise EmbvizError(f"cache directory {folder} is read-only; set {HOME_ENV} to a writable folder")
    return path


def optional_cache_dir(*parts: str) -> Path | None:
    """:func:`cache_dir`, or None when the cache is unusable (reported once): the caller computes uncached."""
    try:
        return cache_dir(*parts)
    except EmbvizError as exc:
        warn_once(f"{exc}; computing without caching")
        return None


def cache_problem() -> str | None:
    """Why the cache cannot be used, in one line, or None when it can."""
    try:
        cache_dir()
    except EmbvizError as exc:
        return str(exc)
    return None


def config_key(config: dict[str, Any], length: int = 16) -> str:
    """A stable hash of a JSON-serialisable configuration (key order does not matter)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def write_if_possible(path: Path, data: bytes) -> bool:
    """:func:`atomic_write_bytes` for a cache entry; a failure (disk full, read-only) is reported, not raised."""
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        warn_once(f"could not write to the cache folder {path.parent} ({exc.strerror or exc}); not cached")
        return False
    return True


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(final: Path) -> None:
    """Delete temporaries a killed writer left beside ``final`` (call while holding ``final``'s lock)."""
    for stale in final.parent.glob(f".{final.name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()


@contextlib.contextmanager
def locked(path: Path, timeout: float = 1800.0) -> Iterator[None]:
    """An inter-process lock on ``path`` (a ``.lock`` file beside it), so two processes build once.

    Where the lock file cannot be created (a read-only cache) the block runs unlocked, reported once.
    """
    lock = filelock.FileLock(str(path) + ".lock", timeout=timeout)
    acquired = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        acquired = True
    except filelock.Timeout:
        raise
    except OSError as exc:
        warn_once(f"cannot lock in the cache folder {path.parent} ({exc.strerror or exc}); running unlocked")
    try:
        yield
    finally:
        if acquired:
            lock.release()


def resolve_inside(root: Path, name: str) -> Path:
    """``root / name``, refusing names that would escape ``root`` (``..``, absolute paths, links)."""
    candidate = (root / name).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise EmbvizError(f"path {name!r} escapes {root}")
    return candidate


def cached_arrays(
    path: Path | None,
    compute: Callable[[], dict[str, np.ndarray]],
    valid: Callable[[dict[str, np.ndarray]], bool],
) -> dict[str, np.ndarray]:
    """Load the arrays stored at ``path`` (an ``.npz``), or compute, store atomically and return them.

    A file that cannot be read or fails ``valid`` is treated as missing and rewritten. A lock makes two
    processes asking for the same entry compute it once. With ``path`` None (no usable cache), or when the
    entry cannot be written, the arrays are computed and returned uncached.
    """
    if path is None:
        return compute()
    with locked(path):
        remove_stale_temporaries(path)
        stored = _load_npz(path)
        if stored is not None:
            if valid(stored):
                return stored
            logger.warning("cache entry %s failed validation; recomputing", path)
        arrays = compute()
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)  # read back with allow_pickle=False as well
        write_if_possible(path, buffer.getvalue())
        return arrays


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        logger.warning("cache entry %s is unreadable (%s); recomputing", path, exc)
        return None


_FINGERPRINTS: dict[int, tuple[weakref.ref, tuple, str]] = {}


def matrix_fingerprint(embedding: torch.Tensor) -> str:
    """sha256 of the matrix as C-contiguous float32 bytes, prefixed by its shape.

    Memoised per tensor storage (while that storage is alive and not modified in place, as tracked by the
    tensor's version counter), so repeated calls on a backbone's embedding cost nothing.
    """
    storage = embedding.untyped_storage()
    identity = (
        tuple(embedding.shape),
        embedding.stride(),
        embedding.storage_offset(),
        embedding.dtype,
        str(embedding.device),
        embedding._version,
    )
    cached = _FINGERPRINTS.get(id(storage))
    if cached is not None and cached[0]() is storage and cached[1] == identity:
        return cached[2]
    digest = hashlib.sha256(f"float32:{'x'.join(map(str, embedding.shape))}:".encode())
    matrix = embedding.detach().to(device="cpu", dtype=torch.float32).contiguous()
    for start in range(0, matrix.shape[0], 8192):
        digest.update(matrix[start : start + 8192].numpy().data.cast("B"))
    fingerprint = digest.hexdigest()
    key = id(storage)
    _FINGERPRINTS[key] = (weakref.ref(storage, lambda _: _FINGERPRINTS.pop(key, None)), identity, fingerprint)
    return fingerprint
