"""The one list of the app's pages.

``app.py`` builds ``st.navigation`` from :data:`PAGES`; ``tests/test_app.py``, ``tests/e2e`` and
``scripts/screenshots.py`` read it too. Adding a page is its file under ``pages/`` (starting with
:func:`pages.routing.use_app_router`) plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

import streamlit as st


@dataclass(frozen=True)
class PageSpec:
    """One page: its script, its navigation entry and the heading (``st.title``) it draws."""

    path: str
    """The script, relative to the repository root (``pages/neighbours.py``)."""
    title: str
    """The label in the navigation menu."""
    icon: str
    heading: str
    """The page's ``st.title``, which the browser tests and screenshots wait for."""
    default: bool = False
    """The page at ``/`` (exactly one)."""

    @property
    def name(self) -> str:
        """The script's stem (``neighbours``)."""
        return PurePosixPath(self.path).stem

    @property
    def url_path(self) -> str:
        """Where Streamlit serves it: ``""`` for the default page, else the script's stem."""
        return "" if self.default else self.name


PAGES: tuple[PageSpec, ...] = (
    PageSpec(
        "pages/compress.py", "Compress", ":material/compress:", "Compress the token embedding", default=True
    ),
    PageSpec("pages/neighbours.py", "Neighbours", ":material/hub:", "Nearest neighbours"),
    PageSpec("pages/angles.py", "Angles", ":material/architecture:", "Reconstruction angles"),
    PageSpec("pages/map.py", "Map", ":material/map:", "Map of the vocabulary"),
    PageSpec("pages/predictions.py", "Predictions", ":material/edit_note:", "Fill in the blank"),
    PageSpec("pages/perplexity.py", "Perplexity", ":material/trending_up:", "Perplexity vs compression"),
    PageSpec("pages/size.py", "Size vs quality", ":material/stacked_line_chart:", "Size vs quality"),
    PageSpec("pages/why_direction.py", "Why direction?", ":material/school:", "Why direction?"),
)


def streamlit_pages() -> list[st.Page]:
    """``st.Page`` objects for ``st.navigation`` (call inside a script run)."""
    return [st.Page(page.path, title=page.title, icon=page.icon, default=page.default) for page in PAGES]
