"""Adapter files: ours (diffusers LoRA keys), the authors' 2K (peft keys) and 4K (processor keys), others via diffusers.

Formats read (module names are relative to the FLUX transformer, e.g. `transformer_blocks.0.attn.to_q`):
* diffusers / peft LoRA: `transformer.<module>.lora_A.weight` (r, K), `...lora_B.weight` (N, r), optional
  `transformer.<module>.alpha` (scale = alpha / r). The authors' 2K file is this with no alpha (scale 1).
* URAE 4K minor-component: `<block>.attn.processor.to_{q,k,v,out}_{a,b}.weight`, `_a` = A' (r, K), `_b` = B' (N, r).
  These only make sense against the SVD of the base + 2K weights; `convert.py` turns them into plain LoRA.
* anything else diffusers' FLUX LoRA loader understands (kohya, xlabs, ...): converted by
  `FluxLoraLoaderMixin.lora_state_dict`, then read as above.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapted_linear import AdaptedLinear
from .errors import UraeError
from .safetensors_io import atomic_save_file, load_file_checked

URAE_MINOR_KEY = re.compile(r"^(?:transformer\.)?(.+)\.attn\.processor\.to_(q|k|v|out)_(a|b)\.weight$")
PEFT_KEY = re.compile(r"^(.+)\.lora_(A|B)(?:\.default)?\.weight$")
ALPHA_KEY = re.compile(r"^(.+)\.alpha$")
KNOWN_PREFIXES = ("base_model.model.", "transformer.")


@dataclass
class LoraFactors:
    """delta W = scale · B·A for one module."""

    A: torch.Tensor  # (r, K)
    B: torch.Tensor  # (N, r)
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B.float() @ self.A.float())


@dataclass
class AdapterFile:
    """Factors per module, and whether they are plain LoRA or URAE minor components (need the base's SVD)."""

    kind: str  # "lora" | "urae_minor"
    modules: dict[str, LoraFactors]
    path: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def ranks(self) -> set[int]:
        return {f.rank for f in self.modules.values()}


def _strip_prefix(name: str) -> str:
    for p in KNOWN_PREFIXES:
        if name.startswith(p):
            name = name[len(p) :]
    return name


def _parse_minor(tensors: dict[str, torch.Tensor], path: str) -> AdapterFile:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = URAE_MINOR_KEY.match(key)
        if m is None:
            raise UraeError(f"{path}: unexpected key {key} in a URAE 4K adapter file")
        block, proj, ab = m.groups()
        module = f"{block}.attn.{'to_out.0' if proj == 'out' else 'to_' + proj}"
        pairs.setdefault(module, {})[ab] = t
    modules = {}
    for module, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise UraeError(f"{path}: module {module} has only its _{''.join(ab)} factor")
        modules[module] = LoraFactors(ab["a"], ab["b"])
    return AdapterFile("urae_minor", modules, path)


def _parse_peft(tensors: dict[str, torch.Tensor], path: str) -> AdapterFile:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, t in tensors.items():
        if key.startswith(("text_encoder.", "text_encoder_2.")):
            raise UraeError(f"{path}: text-encoder LoRA weights ({key}) are not supported; use a transformer-only LoRA")
        name = _strip_prefix(key)
        if (m := PEFT_KEY.match(name)) is not None:
            factors.setdefault(m.group(1), {})[m.group(2)] = t
        elif (m := ALPHA_KEY.match(name)) is not None:
            alphas[m.group(1)] = float(t.item() if torch.is_tensor(t) else t)
        else:
            raise UraeError(f"{path}: unexpected key {key} (not a FLUX transformer LoRA?)")
    modules = {}
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise UraeError(f"{path}: module {module} lacks its lora_{'B' if 'A' in ab else 'A'} weight")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise UraeError(
                f"{path}: module {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, which do not chain"
            )
        scale = alphas[module] / A.shape[0] if module in alphas else 1.0
        modules[module] = LoraFactors(A, B, scale)
    if not modules:
        raise UraeError(f"{path}: no LoRA weights found")
    return AdapterFile("lora", modules, path)


def _via_diffusers(tensors: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Other FLUX LoRA layouts (kohya, xlabs, ...) converted to diffusers keys by diffusers itself."""
    from diffusers.loaders import FluxLoraLoaderMixin

    try:
        state, alphas = FluxLoraLoaderMixin.lora_state_dict(dict(tensors), return_alphas=True)
    except Exception as e:  # diffusers raises many kinds for layouts it does not know
        raise UraeError(f"{path}: not a LoRA layout urae-lite or diffusers knows ({type(e).__name__}: {e})") from e
    state = dict(state)
    for k, v in (alphas or {}).items():
        state[k] = torch.as_tensor(v)
    return state


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read any supported adapter file; one clear UraeError for missing, corrupt or foreign files."""
    tensors, metadata = load_file_checked(path)
    path = str(path)
    if not tensors:
        raise UraeError(f"{path}: the file holds no tensors")
    if all(URAE_MINOR_KEY.match(k) for k in tensors):
        out = _parse_minor(tensors, path)
    else:
        if not any(PEFT_KEY.match(_strip_prefix(k)) for k in tensors):
            tensors = _via_diffusers(tensors, path)
        out = _parse_peft(tensors, path)
    out.metadata = metadata
    return out


# ---- attaching to a model ---------------------------------------------------------------------------------------
def check_fits(modules: dict[str, nn.Module], adapter: AdapterFile) -> None:
    """Every module exists as an AdaptedLinear with matching shapes, or one UraeError naming the first mismatch.

    `modules` is `dict(model.named_modules())`; meta-device skeletons work too (only shapes are read).
    """
    for name, f in adapter.modules.items():
        layer = modules.get(name)
        if not isinstance(layer, AdaptedLinear):
            hint = "not in this model" if layer is None else f"a {type(layer).__name__}, not an adapted block linear"
            raise UraeError(
                f"adapter {adapter.path} does not match the base: module {name} is {hint} "
                f"(is it a FLUX.1 transformer adapter?)"
            )
        if f.A.shape[1] != layer.in_features or f.B.shape[0] != layer.out_features:
            raise UraeError(
                f"adapter {adapter.path} does not match the base: module {name} has lora_A "
                f"{tuple(f.A.shape)} and lora_B {tuple(f.B.shape)} but the layer is "
                f"{layer.out_features}x{layer.in_features} (out x in)"
            )


def attach_adapter(
    model: nn.Module, adapter: AdapterFile, name: str, trainable: bool = False, dtype: torch.dtype = torch.bfloat16
) -> int:
    """Add the adapter's factors as slice `name` on each of its modules; returns how many modules."""
    if adapter.kind != "lora":
        raise UraeError(
            f"{adapter.path} is a URAE 4K minor-component adapter: it needs the full-precision base. "
            f"Pass it to load_transformer(..., adapters=[2k, 4k]) or run `urae-lite convert` first"
        )
    modules = dict(model.named_modules())
    check_fits(modules, adapter)
    for module, f in adapter.modules.items():
        modules[module].add_slice(name, f.A, f.B, f.scale, trainable=trainable, dtype=dtype)
    return len(adapter.modules)


# ---- saving -----------------------------------------------------------------------------------------------------
def _default_slice(layer: AdaptedLinear, name: str) -> bool:
    """What `save_adapter` writes by default: the trainable slices, plus the frozen −B0·A0 of a minor-component
    adapter, without which B'·A' alone would not be the trained update."""
    from .minor import MINOR_RESIDUAL_SLICE, MINOR_SLICE

    return layer.slices[name].trainable or (name == MINOR_RESIDUAL_SLICE and MINOR_SLICE in layer.slices)


def collect_factors(model: nn.Module, slice_names: list[str] | None = None) -> dict[str, LoraFactors]:
    """One LoRA per module from the chosen slices (default: see `_default_slice`), concatenated.

    Slices of equal scale keep it (written as alpha); different scales are folded into B so the file is exact.
    """
    out: dict[str, LoraFactors] = {}
    for module_name, layer in model.named_modules():
        if not isinstance(layer, AdaptedLinear):
            continue
        chosen = [
            s
            for n, s in layer.slices.items()
            if (n in slice_names if slice_names is not None else _default_slice(layer, n))
        ]
        if not chosen:
            continue
        scales = {s.scale for s in chosen}
        if len(scales) == 1:
            A = torch.cat([s.A.detach() for s in chosen], 0)
            B = torch.cat([s.B.detach() for s in chosen], 1)
            out[module_name] = LoraFactors(A, B, scales.pop())
        else:
            A = torch.cat([s.A.detach() for s in chosen], 0)
            B = torch.cat([(s.B.detach().float() * s.scale).to(s.B.dtype) for s in chosen], 1)
            out[module_name] = LoraFactors(A, B, 1.0)
    return out


def lora_state_dict(factors: dict[str, LoraFactors], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """diffusers FLUX LoRA keys; `alpha` on every module unless all scales are 1 (diffusers reads scale = alpha / r,
    and gives a module without alpha the most common alpha of the others, not its rank)."""
    state: dict[str, torch.Tensor] = {}
    with_alpha = any(f.scale != 1.0 for f in factors.values())
    for module, f in factors.items():
        state[f"transformer.{module}.lora_A.weight"] = f.A.to("cpu", dtype).contiguous()
        state[f"transformer.{module}.lora_B.weight"] = f.B.to("cpu", dtype).contiguous()
        if with_alpha:
            state[f"transformer.{module}.alpha"] = torch.tensor(f.scale * f.rank, dtype=torch.float32)
    return state


def save_adapter(
    model_or_factors: nn.Module | dict[str, LoraFactors],
    path: str | os.PathLike,
    slice_names: list[str] | None = None,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a LoRA file that diffusers' `load_lora_weights` and our `read_adapter` both load."""
    factors = model_or_factors if isinstance(model_or_factors, dict) else collect_factors(model_or_factors, slice_names)
    if not factors:
        raise UraeError("nothing to save: the model carries no (trainable) adapter slices")
    meta = {"format": "urae_lite.lora", "version": "1"}
    meta.update(metadata or {})
    return atomic_save_file(lora_state_dict(factors, dtype), path, meta)
