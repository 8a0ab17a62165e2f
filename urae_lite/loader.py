"""Streaming loader: diffusers FLUX checkpoint -> FluxTransformer2DModel with quantized, adapted block linears.

The model is built on the meta device and filled tensor by tensor, so the full bf16 model never sits in host
memory: each block weight is read, (optionally) decomposed for minor-component adapters, quantized on the target
device and dropped before the next one is read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapted_linear import AdaptedLinear
from .adapter_io import AdapterFile, check_fits, read_adapter
from .checkpoint import CheckpointReader
from .errors import UraeError
from .minor import MinorSpec, add_minor_slices, minor_components
from .quant import QuantizedWeight, check_quant_format
from .single_file import (
    SingleFileReader,
    base_pipeline_root,
    is_single_file,
    open_single_file,
)
from .targets import block_linear_names, is_adapter_target

PREPARED_MARKER = "urae_lite_quant.json"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ---- where the weights are ----------------------------------------------------------------------------------------
def resolve_model(model: str | os.PathLike) -> Path:
    """`tiny`, a local diffusers FLUX folder, or a Hugging Face hub id -> local pipeline (or transformer) folder;
    a single transformer .safetensors file (ComfyUI / Forge layout) is returned as is."""
    text = str(model)
    if text in ("tiny", "tiny-dev", "tiny-schnell"):
        from .tiny import tiny_flux_path

        return tiny_flux_path("schnell" if text == "tiny-schnell" else "dev")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix != ".safetensors":
            raise UraeError(f"--model {text} is a file but not .safetensors; pass a FLUX transformer .safetensors "
                            f"file or the diffusers folder that holds model_index.json")
        return path
    if text.endswith(".safetensors"):
        raise UraeError(f"model file not found: {text}")
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text, allow_patterns=["*.json", "*.txt", "*.model", "transformer/*",
                                                                 "vae/*", "text_encoder*/*", "tokenizer*/*",
                                                                 "scheduler/*"]))
        except Exception as e:  # offline, gated, unknown repo: all mean the same to the user
            raise UraeError(f"cannot fetch {text} from the Hugging Face hub ({type(e).__name__}); "
                            f"download it once and pass the local folder") from e
    raise UraeError(f"model not found: {text} (a diffusers FLUX folder, a hub id like "
                    f"black-forest-labs/FLUX.1-dev, or 'tiny')")


def transformer_folder(root: Path) -> Path:
    """The folder holding the transformer's config.json and weights (pipeline root or the subfolder itself); a
    single transformer file stands for itself."""
    if root.is_file():
        return root
    for cand in (root / "transformer", root):
        if (cand / "config.json").is_file() or (cand / PREPARED_MARKER).is_file():
            return cand
    raise UraeError(f"{root} has no transformer/config.json: is it a diffusers FLUX folder?")


def load_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UraeError(f"cannot read {folder / 'config.json'}: {e}") from e


def open_transformer(model: str | os.PathLike, base_pipeline: str | os.PathLike | None = None
                     ) -> tuple[dict, CheckpointReader | SingleFileReader]:
    """(config, reader of diffusers-named tensors) for a diffusers folder, hub id, or single transformer file.

    `base_pipeline` is only read for a single file (RoPE axes, and a check that its widths match the file).
    """
    if is_single_file(model):
        return open_single_file(model, base_pipeline)
    folder = transformer_folder(resolve_model(model))
    return load_config(folder), CheckpointReader(folder)


def transformer_reader(model: str | os.PathLike) -> CheckpointReader | SingleFileReader:
    """Diffusers-named tensors of a folder, hub id or single transformer file, when no config is needed."""
    return SingleFileReader(model) if is_single_file(model) else CheckpointReader(transformer_folder(resolve_model(model)))


def components_root(model: str | os.PathLike, base_pipeline: str | os.PathLike | None = None) -> Path:
    """The folder whose VAE, text encoders, tokenizers and scheduler go with `model` (the base pipeline of a
    single transformer file, or `base_pipeline` when given)."""
    if base_pipeline is None and not is_single_file(model):
        return resolve_model(model)
    variant = SingleFileReader(model).variant if is_single_file(model) else "dev"
    return base_pipeline_root(base_pipeline, variant, model)


# ---- building the skeleton -----------------------------------------------------------------------------------
def empty_transformer(config: dict) -> nn.Module:
    """FluxTransformer2DModel on the meta device, block linears swapped for (empty) AdaptedLinear."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    model.requires_grad_(False)  # the base is frozen; only adapter slices added later may train
    for name in block_linear_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin: nn.Linear = getattr(parent, child)
        # the meta bias is a placeholder: _check_complete reports it if the checkpoint never fills it
        setattr(parent, child, AdaptedLinear(None, lin.bias, lin.in_features, lin.out_features))
    return model


def _adapter_plan(adapters: Sequence[str | os.PathLike | AdapterFile]) -> list[tuple[str, AdapterFile]]:
    """Read the adapter files (small) and name their slices adapter0, adapter1, ..."""
    plan = []
    for i, a in enumerate(adapters):
        f = a if isinstance(a, AdapterFile) else read_adapter(a)
        if f.kind == "urae_minor" and not any(p.kind == "lora" for _, p in plan):
            raise UraeError(f"{f.path} is a URAE 4K adapter: list the 2K adapter it was trained on before it")
        plan.append((f"adapter{i}", f))
    return plan


# ---- streaming fill --------------------------------------------------------------------------------------------------
def fill_transformer(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], quant: str,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                     adapters: Sequence[str | os.PathLike | AdapterFile] = (), minor: MinorSpec | None = None,
                     total: int | None = None, progress: bool = True) -> nn.Module:
    """Consume (name, tensor) pairs into the meta skeleton from `empty_transformer`."""
    from accelerate.utils import set_module_tensor_to_device

    check_quant_format(quant)
    plan = _adapter_plan(adapters)
    modules = dict(model.named_modules())
    for _, f in plan:
        check_fits(modules, f)
    bar = tqdm(tensors, total=total, desc=f"loading transformer ({quant})", unit="tensor", disable=not progress)
    for name, tensor in bar:
        module_name, _, leaf = name.rpartition(".")
        layer = modules.get(module_name)
        if isinstance(layer, AdaptedLinear) and leaf == "weight":
            _fill_linear(module_name, layer, tensor, quant, device, dtype, plan, minor)
        elif isinstance(layer, AdaptedLinear) and leaf == "bias":
            layer.bias = nn.Parameter(tensor.to(device, dtype), requires_grad=False)
        else:
            try:
                set_module_tensor_to_device(model, name, device, value=tensor, dtype=dtype)
            except (AttributeError, ValueError, KeyError) as e:
                raise UraeError(f"checkpoint tensor {name} {tuple(tensor.shape)} does not fit the model config: {e}")
        del tensor
    _check_complete(model)
    return model


def _fill_linear(name: str, layer: AdaptedLinear, weight: torch.Tensor, quant: str, device, dtype,
                 plan: list[tuple[str, AdapterFile]], minor: MinorSpec | None) -> None:
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise UraeError(f"checkpoint weight {name} is {tuple(weight.shape)} but the config expects "
                        f"{(layer.out_features, layer.in_features)}")
    layer.base = QuantizedWeight.quantize(weight.to(device), quant, dtype)
    w1: torch.Tensor | None = None  # W0 + the LoRAs listed so far, in fp32, only when an SVD needs it
    for slice_name, f in plan:
        factors = f.modules.get(name)
        if factors is None:
            continue
        if f.kind == "lora":
            layer.add_slice(slice_name, factors.A, factors.B, factors.scale, trainable=False, dtype=dtype)
            if w1 is not None or _needs_svd(name, plan, minor):
                w1 = (weight.float() if w1 is None else w1) + factors.delta()
        else:  # URAE 4K: SVD of the base + 2K weights, as the authors' loader does
            base = weight.float() if w1 is None else w1
            B0, A0 = minor_components(fused_like_authors(base, weight.dtype), factors.rank,
                                      minor.svd_device if minor else None)
            layer.add_slice(f"{slice_name}_residual", A0, -B0, trainable=False, dtype=dtype)
            layer.add_slice(slice_name, factors.A, factors.B, 1.0, trainable=False, dtype=dtype)
            if w1 is not None or _needs_svd(name, plan, minor):  # what later SVDs see: the weight as it now is
                w1 = base + factors.delta() - B0 @ A0
    if minor is not None and is_adapter_target(name, minor.targets):
        base = weight.float() if w1 is None else fused_like_authors(w1, weight.dtype)
        B0, A0 = minor_components(base, minor.rank, minor.svd_device)
        add_minor_slices(layer, A0, B0, trainable=minor.trainable, dtype=dtype)


def fused_like_authors(w1: torch.Tensor, base_dtype: torch.dtype) -> torch.Tensor:
    """W0 + B2·A2 rounded to the checkpoint dtype, as a fused bf16 model holds it before the authors' SVD.

    The smallest singular triplets are sensitive to this rounding, so reproducing it keeps B0, A0 close to theirs.
    """
    return w1.to(base_dtype).float() if base_dtype in (torch.bfloat16, torch.float16) else w1


def _needs_svd(name: str, plan: list[tuple[str, AdapterFile]], minor: MinorSpec | None) -> bool:
    if minor is not None and is_adapter_target(name, minor.targets):
        return True
    return any(f.kind == "urae_minor" and name in f.modules for _, f in plan)


def _check_complete(model: nn.Module) -> None:
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    missing += [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, AdaptedLinear) and m.base is None]
    if missing:
        raise UraeError(f"checkpoint is missing {len(missing)} tensors (first: {missing[0]}): "
                        f"incomplete download or a non-FLUX checkpoint")


# ---- public entry points -------------------------------------------------------------------------------------------
def load_transformer(model: str | os.PathLike, quant: str = "nf4", device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.bfloat16, adapters: Sequence[str | os.PathLike | AdapterFile] = (),
                     minor: MinorSpec | None = None, progress: bool = True,
                     base_pipeline: str | os.PathLike | None = None) -> nn.Module:
    """FLUX transformer with NF4/FP8/bf16 block linears and the given adapters attached as frozen slices.

    `model`: a diffusers folder, hub id, `tiny`, a folder written by `urae-lite prepare`, or a single transformer
    file (BFL or diffusers keys; `base_pipeline` as in `open_transformer`). `adapters` are loaded in
    order as frozen slices `adapter0, adapter1, ...` (a URAE 4K file must follow its 2K LoRA). `minor` adds a
    trainable minor-component adapter initialised from the (base + adapters) weights.
    """
    check_quant_format(quant)
    folder = transformer_folder(resolve_model(model))
    if (folder / PREPARED_MARKER).is_file():
        from .prepare import load_prepared

        return load_prepared(folder, quant, device, dtype, adapters, minor, progress)
    config, reader = open_transformer(folder, base_pipeline)
    skeleton = empty_transformer(config)
    filled = fill_transformer(skeleton, reader.iter_tensors(), quant, device, dtype, adapters, minor,
                              total=len(reader.keys()), progress=progress)
    filled.eval()
    return filled


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, AdaptedLinear):
            yield name, m


def add_lora(model: nn.Module, name: str, rank: int, alpha: float | None = None, targets: str = "authors",
             seed: int = 0) -> int:
    """A fresh trainable LoRA slice on every target; no-op at init (B = 0). Returns the number of modules."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for module_name, layer in adapted_layers(model):
        if is_adapter_target(module_name, targets):
            layer.add_lora(name, rank, alpha, generator=gen)
            count += 1
    return count

