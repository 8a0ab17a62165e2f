"""The one folder urae-lite reuses across runs (the tiny model, converted 4K adapters, the kernels' self-check
verdicts): resolved in one place so that `URAE_LITE_CACHE` moves all of it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "URAE_LITE_CACHE"


def cache_root() -> Path:
    """``$URAE_LITE_CACHE``, else ``$XDG_CACHE_HOME/urae_lite`` (default ``~/.cache/urae_lite``)."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "urae_lite"
