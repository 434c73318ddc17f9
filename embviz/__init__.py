"""embviz: see what compressing a language model's token embeddings does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embviz.version import __version__

if TYPE_CHECKING:
    from embviz.export import load_compressed

__all__ = ["__version__", "load_compressed"]


def __getattr__(name: str) -> Any:
    """``embviz.load_compressed`` (:func:`embviz.export.load_compressed`), imported on first use."""
    if name == "load_compressed":
        from embviz.export import load_compressed  # the package root stays light: import on first use

        return load_compressed
    raise AttributeError(f"module 'embviz' has no attribute {name!r}")
