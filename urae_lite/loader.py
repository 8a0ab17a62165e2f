"""Streaming loader: the transformer a `ModelFiles` names -> FluxTransformer2DModel with quantized, adapted block
linears, built as a `LoadSpec` says.

The model is built on the meta device and filled tensor by tensor, so the full bf16 model never sits in host
memory: each block weight is read, (optionally) decomposed for minor-component adapters, quantized on the target
device and dropped before the next one is read. A folder written by `urae-lite prepare` is read back here too,
its quantized tensors used as stored.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapted_linear import AdaptedLinear
from .adapter_io import AdapterFile, attach_adapter, check_fits, read_adapter
from .block_swap import swapped_block_names
from .errors import UraeError
from .memory import MemorySettings
from .minor import MinorSpec, add_minor_slices, minor_components
from .model_files import ModelFiles, as_model_files
from .quant import QuantFormat, QuantizedWeight, get_format
from .targets import block_linear_names, is_adapter_target


# ---- what to build -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadSpec:
    """How to build the transformer: the base's storage format (a QuantFormat, or its name), the device it is
    quantized on and the compute dtype, frozen adapters attached in order as `adapter0, adapter1, ...` (a URAE 4K
    file right after its 2K LoRA), an optional minor-component adapter initialised from the (base + adapters)
    weights, and `park_blocks`: the last N blocks' frozen tensors stay in host memory as they load, for
    `enable_block_swap` with the same N (checked by the caller's MemorySettings)."""

    quant: QuantFormat | str = "nf4"
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.bfloat16
    adapters: Sequence[str | os.PathLike | AdapterFile] = ()
    minor: MinorSpec | None = None
    progress: bool = True
    park_blocks: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "quant", get_format(self.quant))
        object.__setattr__(self, "device", torch.device(self.device))
        object.__setattr__(self, "adapters", tuple(self.adapters))


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
def fill_transformer(
    model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], spec: LoadSpec, total: int | None = None
) -> nn.Module:
    """Consume (name, tensor) pairs into the meta skeleton from `empty_transformer`, as `spec` says.

    The blocks `spec.park_blocks` names (the last ones, `single_transformer_blocks.37`, ...) have their frozen
    tensors moved to host memory as soon as they are made (quantized on the device first), for block swap: the
    device never holds those blocks while loading."""
    from accelerate.utils import set_module_tensor_to_device

    parked = swapped_block_names(model.config, spec.park_blocks)
    plan = _adapter_plan(spec.adapters)
    modules = dict(model.named_modules())
    for _, f in plan:
        check_fits(modules, f)
    bar = tqdm(
        tensors, total=total, desc=f"loading transformer ({spec.quant.name})", unit="tensor", disable=not spec.progress
    )
    for name, tensor in bar:
        module_name, _, leaf = name.rpartition(".")
        layer = modules.get(module_name)
        home = HOST if _in_blocks(name, parked) else spec.device
        if isinstance(layer, AdaptedLinear) and leaf == "weight":
            _fill_linear(module_name, layer, tensor, spec, plan)
            if home is HOST:
                park_frozen(layer)
        elif isinstance(layer, AdaptedLinear) and leaf == "bias":
            layer.bias = nn.Parameter(tensor.to(home, spec.dtype), requires_grad=False)
        else:
            try:
                set_module_tensor_to_device(model, name, home, value=tensor, dtype=spec.dtype)
            except (AttributeError, ValueError, KeyError) as e:
                raise UraeError(
                    f"checkpoint tensor {name} {tuple(tensor.shape)} does not fit the model config: {e}"
                ) from e
        del tensor
    _check_complete(model)
    return model


def _fill_linear(
    name: str, layer: AdaptedLinear, weight: torch.Tensor, spec: LoadSpec, plan: list[tuple[str, AdapterFile]]
) -> None:
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise UraeError(
            f"checkpoint weight {name} is {tuple(weight.shape)} but the config expects "
            f"{(layer.out_features, layer.in_features)}"
        )
    dtype, minor = spec.dtype, spec.minor
    layer.base = QuantizedWeight.quantize(weight.to(spec.device), spec.quant, dtype)
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
            B0, A0 = minor_components(
                fused_like_authors(base, weight.dtype), factors.rank, minor.svd_device if minor else None
            )
            layer.add_slice(f"{slice_name}_residual", A0, -B0, trainable=False, dtype=dtype)
            layer.add_slice(slice_name, factors.A, factors.B, 1.0, trainable=False, dtype=dtype)
            if w1 is not None or _needs_svd(name, plan, minor):  # what later SVDs see: the weight as it now is
                w1 = base + factors.delta() - B0 @ A0
    if minor is not None and is_adapter_target(name, minor.targets):
        base = weight.float() if w1 is None else fused_like_authors(w1, weight.dtype)
        B0, A0 = minor_components(base, minor.rank, minor.svd_device)
        add_minor_slices(layer, A0, B0, trainable=minor.trainable, dtype=dtype)


HOST = torch.device("cpu")  # where parked blocks wait for block swap


def _in_blocks(name: str, blocks: tuple[str, ...]) -> bool:
    return bool(blocks) and any(name.startswith(f"{b}.") for b in blocks)


def park_frozen(layer: AdaptedLinear) -> None:
    """The layer's frozen tensors (quantized base, bias, frozen slices) to host memory; trainable slices stay. A
    bias still to come in the stream (on `meta`) is placed at the host when it arrives."""
    layer.base.to(HOST)
    if layer.bias is not None and not layer.bias.is_meta:
        layer.bias = nn.Parameter(layer.bias.data.to(HOST), requires_grad=False)
    for piece in layer.slices.values():
        if not piece.trainable:
            piece.to(HOST)


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
        raise UraeError(
            f"checkpoint is missing {len(missing)} tensors (first: {missing[0]}): "
            f"incomplete download or a non-FLUX checkpoint"
        )


# ---- a prepared folder -------------------------------------------------------------------------------------------
def _read_prepared(files: ModelFiles, spec: LoadSpec) -> nn.Module:
    """Rebuild the model from a `prepare`d folder: its quantized tensors are used as stored (bit-identical)."""
    from accelerate.utils import set_module_tensor_to_device

    folder, marker = files.transformer, files.marker or {}
    if marker.get("quant") != spec.quant.name:
        raise UraeError(
            f"{folder} was prepared as {marker.get('quant')}, not {spec.quant.name}: pass "
            f"--quant {marker.get('quant')} or run `urae-lite prepare --quant {spec.quant.name}` again"
        )
    missing = [s for s in marker.get("shards", []) if not (folder / s).is_file()]
    if missing:
        raise UraeError(f"{folder} lacks {missing[0]}: the prepare run did not finish; run it again")
    adapters = [a if isinstance(a, AdapterFile) else read_adapter(a) for a in spec.adapters]
    if spec.minor is not None or any(f.kind == "urae_minor" for f in adapters):
        raise UraeError(
            "minor-component adapters need the full-precision weights: pass the original model "
            "folder, not a prepared one"
        )
    model = empty_transformer(files.config)
    parked = swapped_block_names(files.config, spec.park_blocks)
    modules = dict(model.named_modules())
    reader = files.reader()
    grouped: dict[str, list[str]] = {}
    for key in reader.keys():  # noqa: SIM118 (the readers are not iterable)
        owner = next((m for m in _prefixes(key) if m in modules and hasattr(modules[m], "slices")), None)
        grouped.setdefault(owner or key, []).append(key)
    for owner, keys in tqdm(grouped.items(), desc=f"loading prepared ({spec.quant.name})", disable=not spec.progress):
        in_parked = _in_blocks(owner, parked)
        if owner in modules:  # an AdaptedLinear: its quantized weight (+ bias)
            layer = modules[owner]
            tensors = {k: reader.get(k).to(spec.device) for k in keys}
            bias = tensors.pop(f"{owner}.bias", None)
            layer.base = QuantizedWeight.from_state_tensors(
                spec.quant, owner, tensors, (layer.out_features, layer.in_features), spec.dtype
            )
            if bias is not None:
                layer.bias = nn.Parameter(bias.to(spec.dtype), requires_grad=False)
            if in_parked:
                park_frozen(layer)
        else:
            home = HOST if in_parked else spec.device
            set_module_tensor_to_device(model, owner, home, value=reader.get(owner), dtype=spec.dtype)
    _check_complete(model)
    for i, f in enumerate(adapters):
        attach_adapter(model, f, f"adapter{i}", dtype=spec.dtype)
    return model


def _prefixes(key: str) -> list[str]:
    """`a.b.weight.absmax` -> ['a.b.weight', 'a.b', 'a']: candidate owning modules, longest first."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


# ---- public entry points -------------------------------------------------------------------------------------------
def read_transformer(files: ModelFiles, spec: LoadSpec) -> nn.Module:
    """FLUX transformer with NF4/FP8/bf16 block linears and `spec.adapters` attached as frozen slices: streamed
    from full-precision weights (diffusers folder or single file), or a prepared folder's tensors as stored."""
    if files.format == "prepared":
        model = _read_prepared(files, spec)
    else:
        reader = files.reader()
        model = fill_transformer(empty_transformer(files.config), reader.iter_tensors(), spec, total=len(reader.keys()))
    return model.eval()


def load_transformer(
    model: str | os.PathLike | ModelFiles,
    quant: str = "nf4",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    adapters: Sequence[str | os.PathLike | AdapterFile] = (),
    minor: MinorSpec | None = None,
    progress: bool = True,
    base_pipeline: str | os.PathLike | None = None,
    park_blocks: int = 0,
) -> nn.Module:
    """`read_transformer(resolve_files(model, base_pipeline), LoadSpec(quant, ...))` in one call.

    `model`: a diffusers folder, hub id, `tiny`, a folder written by `urae-lite prepare`, or a single transformer
    file (BFL or diffusers keys; `base_pipeline` gives its RoPE axes and checks its widths). The other arguments
    are `LoadSpec`'s, `quant` and `park_blocks` checked as MemorySettings (`quant`, `blocks_to_swap`).
    """
    memory = MemorySettings(quant=quant, blocks_to_swap=park_blocks)
    files = as_model_files(model, base_pipeline)
    memory.check(None, files.config["num_layers"] + files.config["num_single_layers"])
    spec = LoadSpec(memory.format, device, dtype, adapters, minor, progress, memory.blocks_to_swap)
    return read_transformer(files, spec)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, AdaptedLinear):
            yield name, m


def add_lora(
    model: nn.Module, name: str, rank: int, alpha: float | None = None, targets: str = "authors", seed: int = 0
) -> int:
    """A fresh trainable LoRA slice on every target; no-op at init (B = 0). Returns the number of modules."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for module_name, layer in adapted_layers(model):
        if is_adapter_target(module_name, targets):
            layer.add_lora(name, rank, alpha, generator=gen)
            count += 1
    return count
