"""embviz's on-disk cache: where it lives, atomic writes, locks and configuration keys.

Everything expensive (converted backbones, artifacts, neighbour tables, maps, sweeps) is stored under
``embviz_home()`` keyed by a hash of its full configuration. Writes go to a temporary sibling first and are
renamed into place, so a crash never leaves a half-written entry under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock
import platformdirs

from embviz.errors import EmbvizError

HOME_ENV = "EMBVIZ_HOME"


def embviz_home() -> Path:
    """The cache root: ``$EMBVIZ_HOME`` if set, else the user's cache directory (``~/.cache/embviz``)."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("embviz"))


def cache_dir(*parts: str) -> Path:
    """A writable sub-directory of the cache, created on demand.

    Raises:
        EmbvizError: the cache cannot be created or written (read-only disk, a file in the way).
    """
    path = embviz_home().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbvizError(f"cache directory {path} is not usable ({exc.strerror}); set {HOME_ENV}") from exc
    if not os.access(path, os.W_OK):
        raise EmbvizError(f"cache directory {path} is read-only; set {HOME_ENV} to a writable folder")
    return path


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


@contextlib.contextmanager
def locked(path: Path, timeout: float = 1800.0) -> Iterator[None]:
    """An inter-process lock on ``path`` (a ``.lock`` file beside it), so two processes build once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock", timeout=timeout):
        yield


def resolve_inside(root: Path, name: str) -> Path:
    """``root / name``, refusing names that would escape ``root`` (``..``, absolute paths, links)."""
    candidate = (root / name).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise EmbvizError(f"path {name!r} escapes {root}")
    return candidate
