"""User-facing errors: raised by the core, shown as one clear line by the CLI and the app."""

from __future__ import annotations


class EmbvizError(Exception):
    """A problem the user can fix (bad model name, rank out of range, unreadable text, ...).

    The CLI prints ``str(error)`` on one line and exits with status 2; the app shows it with ``st.error``.
    """


class UnknownModelError(EmbvizError):
    """The backbone name is neither built in, a local folder, nor reachable on a hub."""


class BadInputError(EmbvizError):
    """An argument, widget value or text that cannot be used as given."""


class ResourceError(EmbvizError):
    """The work would not fit in memory (the message carries the estimate)."""
