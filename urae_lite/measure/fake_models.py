"""Full-size FLUX.1-dev, its text encoders and VAE, and the training model, on fake tensors (measure/fake.py).

Modules are built on the `meta` device from their configs (the transformer through the loader's own skeleton,
its quantized bases in urae_lite.quant's buffer layout) and given fake storage of the loader's dtypes, so the
real forward code runs on them with shapes, dtypes and autograd but no data. Call the builders inside
`fake_mode()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

BF16 = torch.bfloat16


@contextlib.contextmanager
def fake_mode() -> Iterator[FakeTensorMode]:
    """Fake tensors for everything made inside; real constants (the scheduler's numpy sigmas) are converted."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def fake_quantized_weight(quant: str, out_features: int, in_features: int, dtype: torch.dtype = BF16):
    """A QuantizedWeight with its format's buffer layout (QuantFormat.empty), no quantizer run (they need data)."""
    from ..quant import QuantizedWeight, get_format

    fmt = get_format(quant)
    return QuantizedWeight(fmt, out_features, in_features, dtype, fmt.empty(out_features, in_features, dtype))


def _materialize_meta(module: nn.Module, dtype: torch.dtype) -> None:
    """Every real (meta) parameter / buffer as a fake `dtype` tensor (the loader's bf16; integer buffers keep
    their dtype). Tied parameters stay tied (T5's `shared` and `encoder.embed_tokens` are one tensor)."""
    made: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            if isinstance(t, nn.Parameter):
                made[id(t)] = nn.Parameter(torch.empty(t.shape, dtype=dtype), requires_grad=False)
            else:
                made[id(t)] = (
                    torch.empty(t.shape, dtype=dtype) if t.is_floating_point() else torch.zeros(t.shape, dtype=t.dtype)
                )
        return made[id(t)]

    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in list(table.items()):
                if t is not None and not isinstance(t, FakeTensor):
                    table[name] = fake(t)


def fake_transformer(config: dict, quant: str, dtype: torch.dtype = BF16) -> nn.Module:
    """The loader's skeleton (`empty_transformer`) with fake quantized bases, as `fill_transformer` leaves it."""
    from ..adapted_linear import AdaptedLinear
    from ..loader import empty_transformer

    with unset_fake_temporarily():  # a real meta skeleton (under fake mode its tensors would be fake fp32)
        model = empty_transformer(config)
    for layer in model.modules():
        if isinstance(layer, AdaptedLinear):
            layer.base = fake_quantized_weight(quant, layer.out_features, layer.in_features, dtype)
    _materialize_meta(model, dtype)
    return model.eval()


def fake_frozen_lora(model: nn.Module, name: str, rank: int) -> None:
    """A frozen rank-`rank` slice on the authors' targets (a loaded 2K / converted 4K adapter)."""
    from ..loader import adapted_layers
    from ..targets import is_adapter_target

    for module_name, layer in adapted_layers(model):
        if is_adapter_target(module_name):
            layer.add_slice(name, torch.empty(rank, layer.in_features), torch.empty(layer.out_features, rank))


def fake_minor(model: nn.Module, rank: int) -> None:
    """The 4K recipe's slices without the SVD: the frozen 2K LoRA, trainable minor factors and their residual."""
    from ..loader import adapted_layers
    from ..minor import add_minor_slices
    from ..targets import is_adapter_target

    fake_frozen_lora(model, "adapter0", 16)
    for module_name, layer in adapted_layers(model):
        if is_adapter_target(module_name):
            add_minor_slices(layer, torch.empty(rank, layer.in_features), torch.empty(layer.out_features, rank))


def fake_from_config(cls: type, config) -> nn.Module:
    """A transformers / diffusers model built on the meta device, then given fake bf16 storage."""
    with unset_fake_temporarily(), torch.device("meta"):
        model = cls(config) if not isinstance(config, dict) else cls(**config)
    _materialize_meta(model, BF16)
    return model.eval()


def fake_vae() -> nn.Module:
    """FLUX.1's AutoencoderKL (flux_configs' config with its latent scaling and shift)."""
    from diffusers import AutoencoderKL

    from ..flux_configs import FLUX_VAE_CONFIG, FLUX_VAE_FACTORS

    return fake_from_config(AutoencoderKL, {**FLUX_VAE_CONFIG, **FLUX_VAE_FACTORS})


def text_encoder_configs():
    """(CLIP-L, T5-XXL) configs of FLUX.1's text encoders (the published architectures in flux_configs)."""
    from ..flux_configs import clip_config, t5_config

    return clip_config(), t5_config()


def fake_t5_nf4(config) -> nn.Module:
    """T5-XXL as `load_t5_nf4` loads it: transformers' bitsandbytes integration makes every linear but the FF
    outputs `wo` (T5's keep-in-fp32 modules) a Linear4bit; their packed NF4 weights and double-quantized absmax get
    fake storage. bitsandbytes' Params4bit cannot wrap a fake tensor, so a plain Parameter carries the quant_state
    (what Linear4bit reads); the CPU-only AVX512 repacking is off, as on a GPU."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState
    from transformers import T5EncoderModel
    from transformers.quantizers.auto import AutoHfQuantizer

    from ..quant import NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE
    from ..text_encoders import nf4_config

    with unset_fake_temporarily(), torch.device("meta"):
        model = T5EncoderModel(config)
        quantizer = AutoHfQuantizer.from_config(nf4_config(model, BF16), pre_quantized=True)
        quantizer._process_model_before_weight_loading(model, device_map=None)
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            n = layer.out_features * layer.in_features
            blocks = -(-n // NF4_BLOCKSIZE)
            nested = QuantState(
                absmax=torch.empty(-(-blocks // NF4_NESTED_BLOCKSIZE)),
                code=torch.empty(256),
                blocksize=NF4_NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
            weight = nn.Parameter(torch.empty(n // 2, 1, dtype=torch.uint8), requires_grad=False)
            weight.quant_state = QuantState(
                absmax=torch.empty(blocks, dtype=torch.uint8),
                shape=torch.Size((layer.out_features, layer.in_features)),
                code=torch.empty(16),
                blocksize=NF4_BLOCKSIZE,
                quant_type="nf4",
                dtype=BF16,
                offset=torch.empty(()),
                state2=nested,
            )
            layer.weight = weight
            layer.support_avx512bf16_for_cpu = False
    _materialize_meta(model, BF16)
    return model.eval()


def fake_pipeline(memory, rank: int, config: dict | None = None):
    """`UraePipeline` around a fake full-size FLUX.1-dev (transformer, T5-XXL, CLIP-L, VAE) built as `memory`
    (a MemorySettings) says; tokenizers and scheduler from the tiny offline model. `config`: another transformer
    config (fewer blocks, for fast checks). Token chunks and block swap are applied with the real mechanisms, as
    `load_pipeline` applies them (the swapped blocks' host copies: `host_storages`); `t5_quant="nf4"`: T5's linears
    as `load_t5_nf4` makes them. Call inside `fake_mode()`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from ..flux_configs import flux_dev_config
    from ..pipeline import UraePipeline
    from ..presets import GenerationSettings
    from ..tiny import tiny_flux_path

    tiny = tiny_flux_path()
    transformer = fake_transformer(config or flux_dev_config(), memory.quant)
    fake_frozen_lora(transformer, "urae", rank)
    apply_memory_options(transformer, memory)
    clip_cfg, t5_cfg = text_encoder_configs()
    with unset_fake_temporarily():
        parts = {
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(tiny, subfolder="scheduler"),
            "tokenizer": CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer"),
            "tokenizer_2": T5TokenizerFast.from_pretrained(tiny, subfolder="tokenizer_2"),
        }
    t5 = fake_t5_nf4(t5_cfg) if memory.t5_quant == "nf4" else fake_from_config(T5EncoderModel, t5_cfg)
    flux = FluxPipeline(
        transformer=transformer,
        text_encoder=fake_from_config(CLIPTextModel, clip_cfg),
        text_encoder_2=t5,
        vae=fake_vae(),
        **parts,
    )
    return UraePipeline(
        flux,
        model="fake FLUX.1-dev",
        adapters=[],
        defaults=GenerationSettings(),
        memory=memory.replace(offload=memory.resolved_offload("cuda")),
        progress=False,
    )


def fake_training_model(cfg, config: dict | None = None) -> nn.Module:
    """The model `build_model` makes for `cfg` (the minor recipe's SVD replaced by slices of the same shapes), its
    token chunking, checkpoint segments and block swap included. `config`: another transformer config."""
    from ..flux_configs import flux_dev_config
    from ..train.model import prepare_for_training

    model = fake_transformer(config or flux_dev_config(), cfg.memory.quant)
    if cfg.adapter.kind == "minor":
        fake_minor(model, cfg.adapter.rank)
    with _already_placed(model):  # as build_model; block swap comes after the fp32 masters exist
        return prepare_for_training(model, cfg, "cpu")


def apply_memory_options(transformer: nn.Module, memory) -> None:
    """`memory`'s transformer mechanisms as `load_pipeline` applies them (fake CPU tensors stand for the device, so
    the swap's "device" is the CPU; its host copies are told apart by `host_storages`)."""
    from .. import memory as memory_settings

    with _already_placed(transformer):
        memory_settings.apply(transformer, memory, "cpu")


@contextlib.contextmanager
def _already_placed(module: nn.Module) -> Iterator[None]:
    """`module.to(...)` as a no-op: everything is on the fake device already, and torch's `Module.to` swaps fake
    parameters for new ones, which it refuses while fake mode holds weak references to them."""
    module.__dict__["to"] = lambda *args, **kwargs: module
    try:
        yield
    finally:
        del module.__dict__["to"]


def host_storages(module: nn.Module) -> set[int]:
    """ids of the untyped storages block swap keeps in host memory for `module` (empty without block swap): on a
    GPU they are pinned host copies; here they are fake CPU tensors like the device's, so the counter skips them."""
    from ..block_swap import block_swap_of

    swap = block_swap_of(module)
    return set() if swap is None else {id(h.untyped_storage()) for b in swap.blocks for h in b.host}


def window_copies(module: nn.Module) -> list[torch.Tensor]:
    """The device copies block swap's window holds for `module` (none without block swap): the running block's and
    the prefetched one's."""
    from ..block_swap import block_swap_of

    swap = block_swap_of(module)
    return [] if swap is None else [c for b in swap.blocks for c in b.copies or ()]


def fake_sample(size: int, text_tokens: int = 512):
    """A TrainSample with the cache's shapes and dtypes (urae_lite/train/samples.py)."""
    from ..train.samples import TrainSample

    n = (size // 16) ** 2
    return TrainSample(
        0,
        "fake",
        "generated_prompt",
        0.5,
        torch.empty(1, n, 64),
        torch.empty(1, n, 64),
        torch.empty(1, text_tokens, 4096, dtype=BF16),
        torch.empty(1, 768, dtype=BF16),
        torch.empty(n, 3),
        torch.empty(text_tokens, 3),
    )
