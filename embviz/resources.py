"""Memory guards: estimate what a job needs before starting it, and refuse with the numbers when it won't fit.

A process that runs out of memory is killed without a word (or takes the machine down with it); a
:class:`~embviz.errors.ResourceError` instead says what was asked, how much it needs and how much is free.
Estimates are deliberately simple: a model needs ``parameters x 4 bytes (float32) x 1.3``, with the
parameter count read from the safetensors headers (or the GGUF file, or the config); a neighbour search
needs its unit rows, one block of similarities and the result table.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from embviz.errors import ResourceError

FLOAT32_BYTES = 4
OVERHEAD = 1.3
"""Working memory on top of the float32 parameters (activations, the tokenizer, allocator slack)."""
_MAX_HEADER = 100 * 2**20
_RESERVATIONS = threading.Lock()
_reserved = 0  # bytes held by reserve_memory() blocks running now in this process


def available_memory() -> int | None:
    """Bytes free for new work: ``MemAvailable`` from /proc/meminfo (else psutil), capped by a cgroup limit.

    None when it cannot be told (then nothing is refused).
    """
    free = _meminfo_available()
    if free is None:
        try:
            import psutil

            free = int(psutil.virtual_memory().available)
        except (ImportError, OSError, AttributeError):
            free = None
    limited = _cgroup_available()
    candidates = [value for value in (free, limited) if value is not None]
    return min(candidates) if candidates else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), or None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()), 0)
    except (OSError, ValueError):
        return None


def format_bytes(count: float) -> str:
    """``1536 * 2**20`` -> ``'1.5 GiB'``."""
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} GiB"


def check_memory(what: str, needed: int) -> None:
    """Raise :class:`ResourceError` when ``needed`` bytes exceed the available memory (unknown: no check),
    less what work running now in this process has reserved (:func:`reserve_memory`)."""
    _check(what, needed, reserved_memory())


def _check(what: str, needed: int, reserved: int) -> None:
    available = available_memory()
    if available is None:
        return
    left = max(0, available - reserved)
    if needed > left:
        held = f" ({format_bytes(reserved)} of it is held by work still running here)" if reserved else ""
        raise ResourceError(
            f"{what} needs about {format_bytes(needed)} of memory, but only {format_bytes(left)} is "
            f"available{held}; free some memory or choose something smaller"
        )


def reserved_memory() -> int:
    """Bytes that :func:`reserve_memory` blocks running now in this process hold."""
    return _reserved


@contextlib.contextmanager
def reserve_memory(what: str, needed: int) -> Iterator[None]:
    """:func:`check_memory`, then hold ``needed`` bytes against every later check in this process until the
    block ends: two jobs started at once (the app runs several) cannot both pass a check only one of them
    fits. Conservative: what a running job has already allocated is counted twice (gone from the available
    memory and still reserved)."""
    global _reserved
    with _RESERVATIONS:
        _check(what, needed, _reserved)
        _reserved += needed
    try:
        yield
    finally:
        with _RESERVATIONS:
            _reserved -= needed


# -- estimates ---------------------------------------------------------------------------------------------
def model_memory(parameters: int) -> int:
    """Bytes to hold a model of ``parameters`` numbers as float32, with working overhead."""
    return math.ceil(parameters * FLOAT32_BYTES * OVERHEAD)


def safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file (tensor name -> ``dtype``, ``shape``, offsets; plus
    ``__metadata__``), read without the tensors; None when it is unreadable or not one."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_HEADER:
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return None
    return header if isinstance(header, dict) else None


def safetensors_parameters(files: Iterable[Path]) -> int | None:
    """Numbers stored in safetensors files, from their JSON headers (the tensors are not read)."""
    total = 0
    for path in files:
        header = safetensors_header(path)
        if header is None:
            return None
        try:
            total += sum(
                math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__"
            )
        except (ValueError, KeyError, TypeError):
            return None
    return total


def config_parameters(config: Any) -> int | None:
    """A rough parameter count from a transformer config (embeddings + per-layer attention and MLP)."""
    try:
        vocab, hidden = int(config.vocab_size), int(config.hidden_size)
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        inner = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    except (AttributeError, TypeError, ValueError):
        return None
    tied = bool(getattr(config, "tie_word_embeddings", True))
    return vocab * hidden * (1 if tied else 2) + layers * (4 * hidden * hidden + 3 * hidden * inner)


def folder_model_memory(folder: Path) -> int | None:
    """Memory to load the model in ``folder``: from its safetensors headers, else its GGUF file size."""
    weights = sorted(folder.glob("*.safetensors"))
    if weights:
        parameters = safetensors_parameters(weights)
        return None if parameters is None else model_memory(parameters)
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs:
        return gguf_memory(ggufs[0])
    return None


def gguf_memory(path: Path) -> int:
    """Memory to dequantise a GGUF file to float32: its parameters (at least one per byte of a 4-bit
    file's two) x 4 bytes x 1.3, plus the file itself."""
    size = path.stat().st_size
    return model_memory(2 * size) + size


SEARCH_TILE = (4096, 1024)
"""faiss's brute-force search tile (query rows x key rows) of float32 similarities."""


def neighbour_memory(
    rows: int,
    width: int,
    keys: int,
    k: int,
    block_rows: int,
    *,
    separate_keys: bool = True,
    factors: bool = False,
    index: bool = False,
) -> int:
    """Bytes for a blocked top-k search of ``rows`` queries among ``keys`` rows of ``width`` numbers.

    Counted: the float32 unit query rows and one float64 block while they are normalised; a float32 copy of
    the keys unless the queries are the keys (``separate_keys`` False); the float64 factor rows a low-rank
    variant is searched through (``factors``: codes, their product and its unit rows); an approximate
    index's own copy of the keys, their ids and their reduced rows (``index``); one faiss similarity tile;
    and the result (k+1 ids and scores per row while the row's own id is dropped). The caller's matrix is
    not counted.
    """
    tile = min(rows, SEARCH_TILE[0]) * min(
        keys, SEARCH_TILE[1]
    )  # faiss gets >= SEARCH_TILE[0] queries a call
    total = 4 * rows * width + 8 * min(block_rows, rows) * width + 4 * tile + 16 * rows * (k + 1)
    if separate_keys:
        total += 4 * keys * width
    if factors:
        total += 24 * rows * width
    if index:  # the re-rank copy of the keys, their ids, and their reduced rows (at most D/2 wide)
        total += 4 * keys * width + 8 * keys + 4 * keys * (width // 2)
    return total


# -- the garbage collector ----------------------------------------------------------------------------------
def freeze_long_lived_objects() -> int:
    """Collect garbage, then move every object alive now into the collector's permanent generation
    (:func:`gc.freeze`); returns how many objects it holds.

    For a server after its start-up loads: the imported modules, a backbone and its tokenizer (about 615,000
    tracked objects with smollm2) live as long as the process. Streamlit runs a full collection after every
    script run (``runner.postScriptGC``: each page view, and each second a progress panel polls a background
    job); it then skips them instead of traversing them all, 0.29 s of CPU per run to 0 on a 2-core AMD
    EPYC, taken from the neighbour tables and the browser that share those cores. Frozen objects are still
    freed by reference counting; only reference cycles among them are never collected.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


__all__ = [
    "available_memory",
    "check_memory",
    "config_parameters",
    "folder_model_memory",
    "format_bytes",
    "freeze_long_lived_objects",
    "gguf_memory",
    "model_memory",
    "neighbour_memory",
    "reserve_memory",
    "reserved_memory",
    "safetensors_header",
    "safetensors_parameters",
]
