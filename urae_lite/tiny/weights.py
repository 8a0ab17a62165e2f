"""Random FluxTransformer2DModel weights for any config, one tensor at a time, streamed or written as a folder.

Memory and speed do not depend on weight values, so benchmarks can measure the real 11.9 B architecture without
downloading it. Values are deterministic from (seed, tensor name).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .folders import atomic_folder

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def _meta_transformer(config: dict) -> FluxTransformer2DModel:
    """Instantiate the transformer without allocating weights, to read names and shapes for any size."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends only on (seed, name): tensors can be made in any order or alone."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _random_tensor(name: str, shape: torch.Size, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Random values of a plausible scale: unit-gain matrices, norm scales near 1, small biases.

    Scale matters because activations must stay finite through 57 blocks, and quantisers see realistic ranges.
    """
    generator = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
    values = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    if len(shape) >= 2:
        values.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
    elif "norm" in name and name.endswith("weight"):
        values.mul_(0.02).add_(1.0)
    else:
        values.mul_(0.02)
    return values.to(dtype)


def iter_random_transformer_tensors(
    config: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(state_dict_name, tensor)`` for a random FluxTransformer2DModel, one tensor at a time.

    Lets benchmarks stream full-size FLUX weights into a loader with no disk and never more than one
    tensor alive here. Values depend on (seed, name, device): the CPU and CUDA generators differ.
    """
    device = torch.device(device)
    for name, meta in _meta_transformer(config).state_dict().items():
        yield name, _random_tensor(name, meta.shape, seed, dtype, device)


def _shard_name(index: int, total: int) -> str:
    """diffusers' shard file name, e.g. ``diffusion_pytorch_model-00001-of-00003.safetensors``."""
    return f"diffusion_pytorch_model-{index:05d}-of-{total:05d}.safetensors"


def _write_shards(folder: Path, tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Stream tensors into safetensors shards, holding at most one shard (plus one tensor) in memory.

    The shard count is known only at the end, so shards are written under provisional names and renamed.
    """
    from safetensors.torch import save_file

    provisional: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    total_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        path = folder / f"shard-{len(provisional):05d}.tmp"
        save_file(pending, str(path), metadata={"format": "pt"})
        provisional.append((path, list(pending)))
        pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.nbytes
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        pending_bytes += size
        total_bytes += size
    if pending or not provisional:
        flush()

    if len(provisional) == 1:
        provisional[0][0].rename(folder / WEIGHTS_NAME)
        return
    weight_map: dict[str, str] = {}
    for index, (path, names) in enumerate(provisional, start=1):
        final = _shard_name(index, len(provisional))
        path.rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    index_json = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index_json, indent=2, sort_keys=True) + "\n")


def write_random_transformer(
    path: str | os.PathLike,
    config: dict,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2**30,
) -> Path:
    """Write a random-weight FluxTransformer2DModel folder (config.json + safetensors) in diffusers layout.

    Never materialises the model: tensors are generated and flushed shard by shard, so the full 22 GiB
    FLUX.1-dev checkpoint can be written on a machine with a few GiB of RAM, and the result is exactly
    what ``FluxTransformer2DModel.from_pretrained`` and our streaming loader expect from a real download.
    An existing folder at ``path`` is replaced atomically.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    target = Path(path)
    with atomic_folder(target) as staging:
        _meta_transformer(config).save_config(staging)
        _write_shards(staging, iter_random_transformer_tensors(config, seed=seed, dtype=dtype), max_shard_bytes)
    return target
