"""Safetensors I/O: read a (sharded) checkpoint one tensor at a time; write files atomically.

Reading goes through `safetensors.safe_open`. With safetensors ≥ 0.7 we ask for its `pread` backend, which reads
each tensor's bytes into its own buffer; the default mmap backend's touched pages count towards RSS until the file
is closed (measured: a whole shard). With older safetensors the reader falls back to mmap and reopens its file
every `reopen_bytes` to keep host memory at one tensor plus a bounded window, whatever the checkpoint's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UraeError


def open_safetensors(path: Path):
    """`safe_open` with the pread backend where available; a missing or corrupt file is a UraeError naming it."""
    try:
        try:
            return safe_open(str(path), framework="pt", backend="pread")
        except TypeError:  # safetensors < 0.7: no backend argument
            return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise UraeError(f"cannot read {path}: {e} (file truncated or corrupt? download or build it again)") from e


def load_file_checked(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Whole small file (adapters) -> (tensors, metadata), with a clear error when missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise UraeError(f"file not found: {path}")
    with open_safetensors(path) as f:
        try:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise UraeError(f"cannot read {path}: {e} (file truncated or corrupt?)") from e


class CheckpointReader:
    """Tensor-at-a-time access to a diffusers-style checkpoint folder (single or sharded safetensors), or to
    one .safetensors file."""

    def __init__(self, folder: str | os.PathLike, reopen_bytes: int = 256 * 2**20):
        self.folder = Path(folder)
        self.reopen_bytes = reopen_bytes
        if not self.folder.is_dir() and not self.folder.is_file():
            raise UraeError(f"model folder not found: {self.folder}")
        files = [self.folder] if self.folder.is_file() else sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise UraeError(f"no .safetensors weights in {self.folder}: point --model at a diffusers FLUX folder")
        self.key_to_file: dict[str, Path] = {}
        for file in files:
            with open_safetensors(file) as f:
                for k in f.keys():
                    self.key_to_file[k] = file

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.key_to_file:
            raise UraeError(f"tensor {key} missing from {self.folder}")
        with open_safetensors(self.key_to_file[key]) as f:
            return self._read(f, key)

    def _read(self, f, key: str) -> torch.Tensor:
        try:
            return f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise UraeError(f"cannot read {key} from {self.key_to_file[key]}: {e} (file corrupt?)") from e

    def iter_tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) file by file, reopening each file every `reopen_bytes` read."""
        wanted = self.keys() if keys is None else list(keys)
        by_file: dict[Path, list[str]] = {}
        for k in wanted:
            if k not in self.key_to_file:
                raise UraeError(f"tensor {k} missing from {self.folder}")
            by_file.setdefault(self.key_to_file[k], []).append(k)
        for file, names in by_file.items():
            f, read = open_safetensors(file), 0
            try:
                for k in names:
                    if read >= self.reopen_bytes:
                        f.__exit__(None, None, None)
                        f, read = open_safetensors(file), 0
                    t = self._read(f, k)
                    read += t.numel() * t.element_size()
                    yield k, t
            finally:
                f.__exit__(None, None, None)


def temp_file_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temp file in `path`'s folder, for `publish` to rename over `path` once written."""
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def publish(tmp: str, path: Path) -> None:
    """Give the finished temp file the mode a plain `open(path, "w")` would (mkstemp's is 0600, which would leave
    every adapter, checkpoint and image readable by its owner only), then rename it to `path` in one step."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_save_file(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """save_file into a temp file beside `path`, then rename: a killed run never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    publish(tmp, path)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`data` into a temp file beside `path`, then rename: a viewer or a killed run never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_digest(path: str | os.PathLike, chunk: int = 2**20) -> str:
    """Short content hash of a file: names cached conversions and records adapters in image metadata."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]
