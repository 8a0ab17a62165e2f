"""`urae-lite prepare`: quantize a FLUX transformer once and save it, so later loads read the small file.

Layout: `config.json`, `urae_lite_quant.json` (marker: format, source), and `quantized-XXXXX.safetensors` shards.
Quantized linears use the keys diffusers/transformers use for serialized bitsandbytes (`<m>.weight`,
`<m>.weight.absmax`, `<m>.weight.quant_map`, `<m>.weight.nested_absmax`, `<m>.weight.nested_quant_map`,
`<m>.weight.quant_state.bitsandbytes__nf4`) or quanto (`<m>.weight._data`, `<m>.weight._scale`) layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapter_io import AdapterFile, attach_adapter, read_adapter
from .checkpoint import CheckpointReader, atomic_save_file, write_json
from .destinations import check_output_dir
from .errors import UraeError
from .loader import (
    PREPARED_MARKER,
    _check_complete,
    empty_transformer,
    load_config,
    open_transformer,
    resolve_model,
    transformer_folder,
)
from .minor import MinorSpec
from .quant import QuantizedWeight, check_quant_format
from .targets import block_linear_names

FORMAT_VERSION = 1


def prepare(model: str | os.PathLike, out: str | os.PathLike, quant: str = "nf4", device: str = "cpu",
            shard_bytes: int = 2 * 2**30, progress: bool = True,
            base_pipeline: str | os.PathLike | None = None) -> Path:
    """Stream the checkpoint, quantize block linears on `device`, write shards; never holds the whole model."""
    check_quant_format(quant)
    check_output_dir(out)
    src = transformer_folder(resolve_model(model))
    if (src / PREPARED_MARKER).is_file():
        raise UraeError(f"{src} is already a prepared checkpoint; pass the original model folder")
    config, reader = open_transformer(src, base_pipeline)  # a folder or a single (BFL) transformer file
    linears = set(block_linear_names(empty_transformer(config)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("quantized-*.safetensors"):
        stale.unlink()
    shard: dict[str, torch.Tensor] = {}
    shard_size, files = 0, []
    for name, t in tqdm(reader.iter_tensors(), total=len(reader.keys()), desc=f"quantizing ({quant})",
                        unit="tensor", disable=not progress):
        module, _, leaf = name.rpartition(".")
        if module in linears and leaf == "weight":
            tensors = QuantizedWeight.quantize(t.to(device), quant).to_state_tensors(module)
        else:
            tensors = {name: t.to(torch.bfloat16) if t.is_floating_point() else t}
        for k, v in tensors.items():
            shard[k] = v.cpu()
            shard_size += v.numel() * v.element_size()
        if shard_size >= shard_bytes:
            files.append(_flush(out, shard, len(files), quant))
            shard, shard_size = {}, 0
    if shard:
        files.append(_flush(out, shard, len(files), quant))
    write_json(out / "config.json", config)
    write_json(out / PREPARED_MARKER, {"quant": quant, "source": str(src), "format_version": FORMAT_VERSION,
                                       "shards": [f.name for f in files]})
    return out


def _flush(out: Path, shard: dict[str, torch.Tensor], index: int, quant: str) -> Path:
    return atomic_save_file(shard, out / f"quantized-{index:05d}.safetensors", {"urae_lite_quant": quant})


def load_prepared(folder: Path, quant: str, device, dtype: torch.dtype,
                  adapters: Sequence[str | os.PathLike | AdapterFile] = (), minor: MinorSpec | None = None,
                  progress: bool = True) -> nn.Module:
    """Rebuild the model from a prepared folder: quantized tensors are used as stored (bit-identical)."""
    marker = json.loads((folder / PREPARED_MARKER).read_text())
    if marker.get("quant") != quant:
        raise UraeError(f"{folder} was prepared as {marker.get('quant')}, not {quant}: pass "
                        f"--quant {marker.get('quant')} or run `urae-lite prepare --quant {quant}` again")
    missing = [s for s in marker.get("shards", []) if not (folder / s).is_file()]
    if missing:
        raise UraeError(f"{folder} lacks {missing[0]}: the prepare run did not finish; run it again")
    files = [read_adapter(a) if not isinstance(a, AdapterFile) else a for a in adapters]
    if minor is not None or any(f.kind == "urae_minor" for f in files):
        raise UraeError("minor-component adapters need the full-precision weights: pass the original model "
                        "folder, not a prepared one")
    model = empty_transformer(load_config(folder))
    modules = dict(model.named_modules())
    reader = CheckpointReader(folder)
    grouped: dict[str, list[str]] = {}
    for key in reader.keys():
        owner = next((m for m in _prefixes(key) if m in modules and hasattr(modules[m], "slices")), None)
        grouped.setdefault(owner or key, []).append(key)
    from accelerate.utils import set_module_tensor_to_device

    for owner, keys in tqdm(grouped.items(), desc=f"loading prepared ({quant})", disable=not progress):
        if owner in modules:  # an AdaptedLinear: its quantized weight (+ bias)
            layer = modules[owner]
            tensors = {k: reader.get(k).to(device) for k in keys}
            bias = tensors.pop(f"{owner}.bias", None)
            layer.base = QuantizedWeight.from_state_tensors(quant, owner, tensors,
                                                            (layer.out_features, layer.in_features), dtype)
            if bias is not None:
                layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        else:
            set_module_tensor_to_device(model, owner, device, value=reader.get(owner), dtype=dtype)
    _check_complete(model)
    for i, f in enumerate(files):
        attach_adapter(model, f, f"adapter{i}", dtype=dtype)
    return model.eval()


def _prefixes(key: str) -> list[str]:
    """`a.b.weight.absmax` -> ['a.b.weight', 'a.b', 'a']: candidate owning modules, longest first."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
