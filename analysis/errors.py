"""The one exception a user of the analysis sees."""

from __future__ import annotations


class AnalysisError(ValueError):
    """A user error (missing path, empty store, unknown metric), with one clear message.

    The CLI prints the message and exits non-zero; anything else is a bug.
    """
