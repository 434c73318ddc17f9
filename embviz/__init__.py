"""embviz: see what compressing a language model's token embeddings does."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_compressed"]


def __getattr__(name: str) -> Any:
    """``embviz.load_compressed`` (:func:`embviz.export.load_compressed`), imported on first use."""
    if name == "load_compressed":
        from embviz.export import load_compressed

        return load_compressed
    raise AttributeError(f"module 'embviz' has no attribute {name!r}")
