"""`urae-lite convert`: the authors' 4K minor-component adapter -> one exact rank-(r2 + 2·r) plain LoRA.

The authors' loader builds, per target, W1 = W0 + B2·A2 (2K LoRA fused), takes the SVD of W1 in fp32, replaces the
base by W1 − B0·A0 and loads (A', B') from the 4K file. The effective weight is

    W0 + B2·A2 − B0·A0 + B'·A'  =  W0 + lora_B·lora_A,
    lora_A = cat([A2, −A0, A'], 0)   lora_B = cat([B2, B0, B'], 1)

so the result loads in any LoRA loader (diffusers included) with no base modification. B0, A0 depend on W0, so a
converted file is specific to the base it was made from (dev or schnell). One matrix is in memory at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapter_io import AdapterFile, LoraFactors, read_adapter, save_adapter
from .destinations import check_output_file, write_with_fallback
from .errors import UraeError
from .export import check_format, write_lora
from .loader import fused_like_authors
from .minor import minor_components
from .model_files import ModelFiles, as_model_files, open_weights

STORED_DTYPE = torch.bfloat16  # the converted factors on disk, in either format


def convert_urae_4k(
    model: str | os.PathLike | ModelFiles,
    adapter_2k: str | os.PathLike | AdapterFile,
    adapter_4k: str | os.PathLike | AdapterFile,
    out: str | os.PathLike,
    svd_device: str | None = None,
    progress: bool = True,
    fmt: str = "diffusers",
    base_pipeline: str | os.PathLike | None = None,
) -> Path:
    """Write the exact rank-48 (for r = 16) LoRA equivalent of base + 2K + 4K; returns `out`. `fmt`: diffusers
    keys (default) or kohya keys for ComfyUI / Forge. `base_pipeline`: as for a single-file `model` elsewhere."""
    check_output_file(out)
    check_format(fmt)
    lora = adapter_2k if isinstance(adapter_2k, AdapterFile) else read_adapter(adapter_2k)
    minor = adapter_4k if isinstance(adapter_4k, AdapterFile) else read_adapter(adapter_4k)
    if lora.kind != "lora":
        raise UraeError(f"{lora.path} is not a LoRA file (the 2K adapter comes first, then the 4K one)")
    if minor.kind != "urae_minor":
        raise UraeError(f"{minor.path} is not a URAE 4K minor-component file (keys ...attn.processor.to_q_a.weight)")
    files = as_model_files(model, base_pipeline)
    reader = open_weights(files.full_precision)  # a diffusers folder or a single (BFL) file: same tensors
    factors: dict[str, LoraFactors] = {}
    for name, f4 in tqdm(minor.modules.items(), desc="SVD per target", disable=not progress):
        w0 = reader.get(f"{name}.weight")
        if tuple(w0.shape) != (f4.B.shape[0], f4.A.shape[1]):
            raise UraeError(
                f"{minor.path} does not match the base: module {name} has A {tuple(f4.A.shape)}, "
                f"B {tuple(f4.B.shape)} but the weight is {tuple(w0.shape)}"
            )
        f2 = lora.modules.get(name)
        w1 = w0.float() + (f2.delta() if f2 is not None else 0.0)
        B0, A0 = minor_components(fused_like_authors(w1, w0.dtype), f4.rank, svd_device)
        As, Bs = [-A0, f4.A.float()], [B0, f4.B.float()]
        if f2 is not None:
            As.insert(0, f2.A.float())
            Bs.insert(0, f2.B.float() * f2.scale)
        factors[name] = LoraFactors(torch.cat(As, 0), torch.cat(Bs, 1), 1.0)
    for name, f2 in lora.modules.items():  # 2K-only modules keep their LoRA
        factors.setdefault(name, LoraFactors(f2.A.float(), f2.B.float() * f2.scale, 1.0))
    meta = {"converted_from": f"{Path(lora.path).name} + {Path(minor.path).name}", "base": files.model}
    # both formats store the same bf16 factors at scale 1 (one rounding each); kohya's layout is export.py's, where a
    # fused module of one scale keeps its parts' factors bit for bit, so the kohya file is the diffusers file exactly
    stored = {n: LoraFactors(f.A.to(STORED_DTYPE), f.B.to(STORED_DTYPE), f.scale) for n, f in factors.items()}
    if fmt == "kohya":  # ComfyUI / Forge keys on the original (fused) module names
        return write_lora(stored, out, fmt, meta)
    return write_with_fallback(out, lambda path: save_adapter(stored, path, metadata=meta), "converted adapter")
