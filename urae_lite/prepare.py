"""`urae-lite prepare`: quantize a FLUX transformer once and save it, so later loads read the small file.

Layout: `config.json`, `urae_lite_quant.json` (marker: format, source), and `quantized-XXXXX.safetensors` shards.
Quantized linears use the keys diffusers/transformers use for serialized bitsandbytes (`<m>.weight`,
`<m>.weight.absmax`, `<m>.weight.quant_map`, `<m>.weight.nested_absmax`, `<m>.weight.nested_quant_map`,
`<m>.weight.quant_state.bitsandbytes__nf4`) or quanto (`<m>.weight._data`, `<m>.weight._scale`) layers.
This module only writes; `urae_lite.loader` reads a prepared folder back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .destinations import check_output_dir
from .errors import UraeError
from .loader import empty_transformer
from .model_files import PREPARED_MARKER, ModelFiles, as_model_files
from .quant import QuantizedWeight, get_format
from .safetensors_io import atomic_save_file, write_json
from .targets import block_linear_names

FORMAT_VERSION = 1


def prepare(
    model: str | os.PathLike | ModelFiles,
    out: str | os.PathLike,
    quant: str = "nf4",
    device: str = "cpu",
    shard_bytes: int = 2 * 2**30,
    progress: bool = True,
    base_pipeline: str | os.PathLike | None = None,
) -> Path:
    """Stream the checkpoint, quantize block linears on `device`, write shards; never holds the whole model."""
    fmt = get_format(quant)  # an unknown name fails before anything is read
    check_output_dir(out)
    src = as_model_files(model, base_pipeline)
    if src.format == "prepared":
        raise UraeError(f"{src.transformer} is already a prepared checkpoint; pass the original model folder")
    config, reader = src.config, src.reader()  # a folder or a single (BFL) transformer file
    linears = set(block_linear_names(empty_transformer(config)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("quantized-*.safetensors"):
        stale.unlink()
    shard: dict[str, torch.Tensor] = {}
    shard_size, files = 0, []
    for name, t in tqdm(
        reader.iter_tensors(),
        total=len(reader.keys()),
        desc=f"quantizing ({quant})",
        unit="tensor",
        disable=not progress,
    ):
        module, _, leaf = name.rpartition(".")
        if module in linears and leaf == "weight":
            tensors = QuantizedWeight.quantize(t.to(device), fmt).to_state_tensors(module)
        else:
            tensors = {name: t.to(torch.bfloat16) if t.is_floating_point() else t}
        for k, v in tensors.items():
            shard[k] = v.cpu()
            shard_size += v.numel() * v.element_size()
        if shard_size >= shard_bytes:
            files.append(_flush(out, shard, len(files), fmt.name))
            shard, shard_size = {}, 0
    if shard:
        files.append(_flush(out, shard, len(files), fmt.name))
    write_json(out / "config.json", config)
    write_json(
        out / PREPARED_MARKER,
        {
            "quant": fmt.name,
            "source": str(src.transformer),
            "format_version": FORMAT_VERSION,
            "shards": [f.name for f in files],
        },
    )
    return out


def _flush(out: Path, shard: dict[str, torch.Tensor], index: int, quant: str) -> Path:
    return atomic_save_file(shard, out / f"quantized-{index:05d}.safetensors", {"urae_lite_quant": quant})
