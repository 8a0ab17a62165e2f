"""The folders the page may read and write, and the one guard every path typed into the page goes through: the page
is a local server, so a path field must not become a way to read or overwrite any file the user can reach."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UraeError

KINDS = ("outputs", "adapters", "runs", "datasets")  # the page's folders, as `urae-lite ui` names its options


@dataclass(frozen=True)
class Folders:
    """Absolute, symlink-resolved roots: images go to `outputs`, adapters are read (and the 4K conversion cached)
    in `adapters`, training runs live in `runs`, training data is read from `datasets`."""

    outputs: Path
    adapters: Path
    runs: Path
    datasets: Path

    @classmethod
    def create(cls, **folders: str | os.PathLike) -> Folders:
        """The folders, made if missing (one line when one cannot be)."""
        roots = {}
        for kind in KINDS:
            path = Path(folders[kind]).expanduser()
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UraeError(f"--{kind} {path}: cannot create it ({e.strerror or e}); choose another folder") from e
            roots[kind] = path.resolve()
        return cls(**roots)

    def roots(self) -> list[Path]:
        return [getattr(self, kind) for kind in KINDS]

    def describe(self) -> str:
        return ", ".join(f"{kind} {getattr(self, kind)}" for kind in KINDS)

    def inside(self, text: str | os.PathLike, *kinds: str) -> Path:
        """`text` as a path inside one of `kinds`' folders (all of them when none is named): a relative path is
        taken inside the first one; `..` and symlinks are resolved before the check. Anything else is one line."""
        kinds = kinds or KINDS
        raw = str(text).strip()
        if not raw:
            raise UraeError(f"no path given: choose one inside {self._named(kinds)}")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = getattr(self, kinds[0]) / path
        real = path.resolve()  # follows symlinks that exist, and `..`
        for kind in kinds:
            root = getattr(self, kind)
            if real == root or root in real.parents:
                return real
        raise UraeError(f"{raw} is outside the folders this page may use ({self._named(kinds)}); choose a path inside")

    def _named(self, kinds) -> str:
        return ", ".join(f"{kind}: {getattr(self, kind)}" for kind in kinds)

    def listing(self, kind: str, pattern: str = "*", folders: bool = False) -> list[str]:
        """Entries of one folder matching `pattern` (files, or sub-folders), relative to it, sorted; a symlink to
        somewhere outside the folder is not offered (`inside` would refuse it)."""
        root = getattr(self, kind)
        found = [p for p in root.glob(pattern) if (p.is_dir() if folders else p.is_file())]
        inside = [p for p in found if p.resolve() == root or root in p.resolve().parents]
        return sorted(str(p.relative_to(root)) for p in inside if not p.name.startswith("."))
