"""Adapter lists for generation: every URAE 4K file becomes its exact LoRA conversion, made once and cached.

The authors' 4K file holds minor-component factors that only mean something against the SVD of (base + 2K LoRA).
`convert_urae_4k` turns the pair into one exact LoRA; doing that on every run would cost one SVD per
target, so the result is written beside the 4K file as `<4k stem>.<key>.converted.safetensors`, where `key`
hashes the 2K and 4K file contents and a fingerprint of the base weights (the conversion is specific to dev or
schnell). If that folder is read-only the cache goes to `$URAE_LITE_CACHE/converted`. See docs/adapter-formats.md.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from .adapter_io import AdapterFile, read_adapter
from .cache_dir import cache_root
from .convert import convert_urae_4k
from .errors import UraeError
from .model_files import ModelFiles
from .safetensors_io import file_digest

SAMPLE_BYTES = 2**20  # bytes hashed at each sampled offset of a base weight file
SAMPLE_STRIDE = 2**30  # one sample per GiB, plus the header and the file's end
CONVERTED = ".converted.safetensors"  # the name ending of a cached 4K conversion


def base_fingerprint(folder: Path) -> str:
    """Content fingerprint of a (possibly 22 GiB) checkpoint without reading it all: each weight file's size,
    safetensors header (names, shapes, dtypes) and 1 MiB samples every GiB and at the end."""
    h = hashlib.sha256()
    for path in [folder] if folder.is_file() else sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(header_len))
            for offset in [*range(8 + header_len, size, SAMPLE_STRIDE), max(size - SAMPLE_BYTES, 0)]:
                f.seek(offset)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def cache_key(base: Path, lora: AdapterFile, minor: AdapterFile) -> str:
    parts = [base_fingerprint(base), file_digest(lora.path), file_digest(minor.path)]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]


def _cache_dirs(minor_path: Path) -> list[Path]:
    return [minor_path.parent, cache_root() / "converted"]


def converted_4k(
    model: ModelFiles, lora: AdapterFile, minor: AdapterFile, svd_device: str | None = None, progress: bool = True
) -> Path:
    """Path of the exact LoRA for base + 2K + 4K, converting only when no cached file has this content key."""
    base = model.full_precision  # a `prepare`d folder points at its source
    name = f"{Path(minor.path).stem}.{cache_key(base, lora, minor)}{CONVERTED}"
    dirs = _cache_dirs(Path(minor.path))
    for d in dirs:
        if (d / name).is_file():
            return d / name
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            return convert_urae_4k(model, lora, minor, d / name, svd_device=svd_device, progress=progress)
    raise UraeError(
        f"cannot write the converted 4K adapter to {dirs[0]} or {dirs[1]}: set URAE_LITE_CACHE to a writable folder"
    )


def resolve_adapters(
    model: ModelFiles, adapters: Sequence[str | os.PathLike], svd_device: str | None = None, progress: bool = True
) -> list[AdapterFile]:
    """Read the adapter files in order; each URAE 4K file replaces itself and the LoRA listed right before it
    (its 2K adapter) by their cached conversion, which already contains that LoRA."""
    out: list[AdapterFile] = []
    for path in adapters:
        f = read_adapter(path)
        if f.kind == "urae_minor":
            if not out or out[-1].kind != "lora":
                raise UraeError(f"{path} is a URAE 4K adapter: list the 2K adapter it was trained on right before it")
            f = read_adapter(converted_4k(model, out.pop(), f, svd_device, progress))
        out.append(f)
    return out
