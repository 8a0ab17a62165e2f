"""Where commands write their results: checked before any work starts, with a fallback when the final write fails.

A 4K generation or a long conversion must not end in a traceback at the save: every command that writes checks
its destination first (a parent that is a file, a folder where a file is expected, no permission, a read-only or
full disk) and says so in one line; a final write that still fails goes to a fallback file, and the message says
where.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .errors import UraeError

#: less free space than this at the destination is treated as a full disk
MIN_FREE_BYTES = 16 * 2**20


def _probe(path: Path, test: Callable[[Path], bool]) -> bool:
    """`path.exists()` / `path.is_dir()`, False where a parent cannot be entered (no search permission): Python
    3.11 raises there, and the folder check then names the nearest folder that refuses instead of a traceback."""
    try:
        return test(path)
    except OSError:
        return False


def _existing_ancestor(path: Path) -> Path:
    """The nearest part of `path` that exists (the folder a write would create the rest in)."""
    for candidate in (path, *path.parents):
        if _probe(candidate, Path.exists):
            return candidate
    return Path(".").resolve()


def _check_folder(folder: Path, option: str, target: Path, min_free_bytes: int) -> None:
    """`folder` (the existing part of `target`'s path) can take new files."""
    if not folder.is_dir():
        raise UraeError(f"{option} {target}: {folder} is a file, not a folder; choose another {option}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UraeError(
            f"{option} {target}: cannot write in {folder} (no permission or a read-only disk); choose another {option}"
        )
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise UraeError(
            f"{option} {target}: the disk holding {folder} is full ({free / 2**20:.0f} MiB free, "
            f"{min_free_bytes / 2**20:.0f} MiB needed); free some space or choose another {option}"
        )


def check_output_file(path: str | os.PathLike, option: str = "--out", min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """A file can be created (or replaced) at `path`; call before any work. Returns the path."""
    target = Path(path).expanduser()
    if _probe(target, Path.is_dir):
        raise UraeError(
            f"{option} {target} is a folder: give a file name inside it, e.g. {target / 'out'}{target.suffix or ''}"
        )
    _check_folder(_existing_ancestor(target.parent), option, target, min_free_bytes)
    return target


def check_output_dir(path: str | os.PathLike, option: str = "--out", min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Files can be written in folder `path` (created if missing); call before any work. Returns the path."""
    target = Path(path).expanduser()
    if _probe(target, Path.exists) and not target.is_dir():
        raise UraeError(f"{option} {target} is a file, not a folder; choose another {option}")
    _check_folder(_existing_ancestor(target), option, target, min_free_bytes)
    return target


def fallback_path(path: str | os.PathLike) -> Path:
    """Where a result goes when its own destination fails: the temp folder, named after the wanted file."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / "urae-lite-unsaved" / f"{stamp}-{Path(path).name}"


def write_with_fallback(path: str | os.PathLike, write: Callable[[Path], Path], what: str) -> Path:
    """`write(path)`; if that fails, `write(fallback_path(path))` and a UraeError saying where the result is."""
    try:
        return write(Path(path))
    except OSError as e:
        reason = e.strerror or str(e)
        spare = fallback_path(path)
        try:
            saved = write(spare)
        except OSError as e2:
            raise UraeError(
                f"cannot write the {what} to {path} ({reason}) nor to {spare} "
                f"({e2.strerror or e2}); free some disk space and run again"
            ) from e2
        raise UraeError(f"cannot write the {what} to {path} ({reason}); it was saved to {saved} instead") from e
