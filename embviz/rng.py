"""Seeded use of torch's global random generator, safe when several threads do it at once.

PyTorch's default initialisation (``nn.Linear``), ``torch.svd_lowrank`` and a head that Hugging Face
initialises while loading all draw from the one process-wide generator. Seeding it in one thread while
another draws from it would change both results, so every seeded block holds one lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_GLOBAL_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global generator seeded by ``seed``, then restore it; one thread at a time."""
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
