"""The shared-link workaround: every page runs inside ``app.py`` (shared controls, URL binding), never bare.

The Streamlit behaviour it works around: a ``pages/`` folder beside the main script makes Streamlit treat the
app as a *legacy* multipage app (``PagesManager.uses_pages_directory``) until some session has called
``st.navigation``. On a fresh server, a shared link such as ``/neighbours?tok=king`` opened before anyone has
visited the app therefore runs ``pages/neighbours.py`` on its own, without ``app.py``'s sidebar or its URL
binding. :func:`use_app_router` switches the server to ``st.navigation`` routing and reruns; the rerun keeps
the URL and goes through ``app.py``.
"""

from __future__ import annotations

import streamlit as st


def use_app_router() -> None:
    """Make sure this page runs inside ``app.py``; call it first in every page."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()
