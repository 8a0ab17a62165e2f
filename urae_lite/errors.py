"""One exception type for mistakes a user can fix; the CLI prints its message as one line and exits non-zero."""

from __future__ import annotations


class UraeError(Exception):
    """A user-facing error: bad input, missing or corrupt files, an adapter that does not fit the base.

    The message must say what is wrong and what to do; the CLI shows it without a traceback.
    """
