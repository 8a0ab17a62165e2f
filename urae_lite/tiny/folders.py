"""Atomic folder writes: a model folder is built beside its target and renamed into place.

Readers see the old folder or the complete new one, never a partial one, so an interrupted build never leaves a
half-written model that a later run would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success swap it in, on failure delete it.

    Staging on the same filesystem makes the final rename atomic.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        _make_readable(staging)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """Give the staged tree ordinary permissions (folders 0755, files 0644).

    ``mkdtemp`` creates 0700 folders and some savers write 0600 files; a shared model cache must not keep those.
    """
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging``; an old folder is moved aside first (rename cannot overwrite one)."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old / "folder")
    try:
        os.replace(staging, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.replace(old / "folder", target)  # put the previous folder back rather than lose it
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """Sorted, indented JSON: stable bytes across runs, readable diffs (inside a staging folder, so not atomic)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
