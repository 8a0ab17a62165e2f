"""GPU memory truth without a GPU: the real generation and training code at full FLUX.1-dev size on fake tensors.

`torch._subclasses.fake_tensor.FakeTensorMode` gives every tensor its shape, dtype and autograd but no data, so a
full-size forward and backward run in seconds on a CPU. `LiveBytes`, a TorchDispatchMode, adds the untyped storage
bytes of every op output once and subtracts them when the storage dies (weakref.finalize), and keeps the peak.

Device vs host: fake CPU tensors stand for the GPU (fake CUDA tensors fail in backward). What the real code puts
in *host* memory is put on the `meta` device instead (`HOST`), which the counter skips: `save_on_cpu`'s copies of
checkpointed block inputs (`host_saved_tensors` replaces it while measuring) and the exact tiled VAE decode's
full-size maps. Modules that offloading would keep on the host (`model` offload: one component on the GPU at a
time) are simply not held by the phase's counter.

What fake tensors cannot see: allocator block rounding and fragmentation, cuBLAS / attention workspaces and the
CUDA context; the planner's allocator reserve and context terms cover those, and only a GPU run calibrates them.
Training runs under CPU autocast here (CUDA autocast additionally runs the norms in fp32).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HOST = torch.device("meta")  # fake host memory: not counted
BF16 = torch.bfloat16


# ---- counting ----------------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Live device storage bytes (op outputs + explicitly held tensors) and their peak since `start_phase`."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = self.peak = 0

    def add(self, t: object) -> None:
        """Count `t`'s storage once (a view or an in-place result of a counted storage adds nothing)."""
        if not isinstance(t, torch.Tensor) or t.device.type == HOST.type:
            return
        storage = t.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if size == 0 or key in self.live:
            return
        ref = weakref.ref(storage)
        self.live[key] = (ref, size)
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key, ref)

    def _free(self, key: int, ref: weakref.ref) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[0] is ref:
            del self.live[key]
            self.current -= entry[1]

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors on the device from now on (a module's weights moved there, a phase's inputs)."""
        for t in tensors:
            self.add(t)

    def release(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors leaving the device (model offload moving a module back to the host)."""
        for t in tensors:
            entry = self.live.pop(id(t.untyped_storage()), None)
            if entry is not None:
                self.current -= entry[1]

    def start_phase(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@contextlib.contextmanager
def fake_mode() -> Iterator[FakeTensorMode]:
    """Fake tensors for everything made inside; real constants (the scheduler's numpy sigmas) are converted."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


@contextlib.contextmanager
def host_saved_tensors() -> Iterator[None]:
    """`torch.autograd.graph.save_on_cpu` as on a GPU: saved tensors live in (uncounted) host memory and come back
    as new device tensors in backward. On a CPU the real one would keep the device tensors themselves."""

    @contextlib.contextmanager
    def save_on_host(pin_memory: bool = False, device_type: str = "cuda"):
        def pack(t: torch.Tensor):
            return t.device, t.to(HOST)

        def unpack(packed):
            device, t = packed
            return t.to(device)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    real = torch.autograd.graph.save_on_cpu
    torch.autograd.graph.save_on_cpu = save_on_host
    try:
        yield
    finally:
        torch.autograd.graph.save_on_cpu = real


def forget_fake_workspaces() -> None:
    """Drop fake buffers the kernels may have cached globally, so later real calls never see them."""
    try:
        from urae_lite.kernels import autograd
    except ImportError:
        return
    for key, buf in list(getattr(autograd, "_workspaces", {}).items()):
        if isinstance(buf, FakeTensor):
            autograd._workspaces.pop(key, None)


def kernel_workspaces() -> list[torch.Tensor]:
    """The kernels' held dequantization buffers (empty when the reference path runs)."""
    try:
        from urae_lite.kernels import autograd
    except ImportError:
        return []
    return list(getattr(autograd, "_workspaces", {}).values())


# ---- full-size models on fake tensors (call inside `fake_mode()`) ------------------------------------------------
def fake_quantized_weight(fmt: str, out_features: int, in_features: int, dtype: torch.dtype = BF16):
    """A QuantizedWeight with urae_lite.quant's buffer layout, no quantizer run (they need real data)."""
    from ..quant import NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE, QuantizedWeight

    qw = QuantizedWeight(fmt, out_features, in_features, dtype)
    n = out_features * in_features
    if fmt == "nf4":
        blocks = -(-n // NF4_BLOCKSIZE)
        qw._set_nf4(torch.empty(n // 2, 1, dtype=torch.uint8), torch.empty(blocks, dtype=torch.uint8),
                    torch.empty(16), torch.empty(-(-blocks // NF4_NESTED_BLOCKSIZE)), torch.empty(256),
                    torch.empty(()))
    elif fmt == "fp8":
        qw.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
        qw.register_buffer("scale", torch.empty(out_features, 1, dtype=dtype))
    else:
        qw.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype))
    return qw


def _materialize_meta(module: nn.Module, dtype: torch.dtype) -> None:
    """Every real (meta) parameter / buffer as a fake `dtype` tensor (the loader's bf16; integer buffers keep
    their dtype)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and not isinstance(p, FakeTensor):
                sub._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and not isinstance(b, FakeTensor):
                sub._buffers[name] = (torch.empty(b.shape, dtype=dtype) if b.is_floating_point()
                                      else torch.zeros(b.shape, dtype=b.dtype))


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


# ---- phases --------------------------------------------------------------------------------------------------------
@dataclass
class Phase:
    """One measured phase: its planner name and the peak live device bytes during it."""

    name: str
    peak: int


def measure(tracker: LiveBytes, name: str, fn: Callable[[], object]) -> tuple[Phase, object]:
    """Run `fn` as one phase: the peak includes everything already held."""
    tracker.start_phase()
    result = fn()
    return Phase(name, tracker.peak), result


def offload_hooks(tracker: LiveBytes, modules: list[nn.Module]) -> list:
    """accelerate's `model` offload as the counter sees it: a module enters the device when it runs and the
    previously running one leaves."""
    state: dict[str, nn.Module | None] = {"on": None}

    def pre(module, args, kwargs=None):
        if state["on"] is not module:
            if state["on"] is not None:
                tracker.release(module_tensors(state["on"]))
            tracker.hold(module_tensors(module))
            state["on"] = module

    return [m.register_forward_pre_hook(pre) for m in modules]



# ---- generation ----------------------------------------------------------------------------------------------------
GENERATE_PHASES = ("text encoding", "denoising", "VAE decode")  # the planner's phase names
PROMPT = "a photo of a red fox in a snowy forest at golden hour, high resolution, detailed"
VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}  # FLUX.1 vae/config.json


def text_encoder_configs():
    """(CLIP-L, T5-XXL) configs of FLUX.1's text encoders (the published architectures in plan.constants)."""
    from transformers import CLIPTextConfig, T5Config

    from . import constants as C

    clip = CLIPTextConfig(vocab_size=C.CLIP_VOCAB, hidden_size=C.CLIP_WIDTH, intermediate_size=C.CLIP_MLP,
                          projection_dim=C.CLIP_WIDTH, num_hidden_layers=C.CLIP_LAYERS, num_attention_heads=12,
                          max_position_embeddings=C.CLIP_POSITIONS, hidden_act="quick_gelu")
    t5 = T5Config(vocab_size=C.T5_VOCAB, d_model=C.T5_D_MODEL, d_kv=64, d_ff=C.T5_D_FF, num_layers=C.T5_LAYERS,
                  num_heads=C.T5_HEADS, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                  layer_norm_epsilon=1e-6, tie_word_embeddings=False)
    return clip, t5


def generate_rank(size: int) -> int:
    """The presets' adapters: the 2K LoRA (16), or 2K + the converted 4K adapter (48) at 4096²."""
    return 48 if size >= 4096 else 16


def fake_pipeline(quant: str, rank: int):
    """`UraePipeline` around a fake full-size FLUX.1-dev (transformer, T5-XXL, CLIP-L, VAE); tokenizers and
    scheduler from the tiny offline model. Call inside `fake_mode()`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import (
        CLIPTextModel,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    from ..pipeline import UraePipeline
    from ..presets import GenerationSettings
    from ..tiny import flux_dev_config, tiny_flux_path
    from . import constants as C

    tiny = tiny_flux_path()
    transformer = fake_transformer(flux_dev_config(), quant)
    fake_frozen_lora(transformer, "urae", rank)
    clip_cfg, t5_cfg = text_encoder_configs()
    with unset_fake_temporarily():
        parts = {"scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(tiny, subfolder="scheduler"),
                 "tokenizer": CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer"),
                 "tokenizer_2": T5TokenizerFast.from_pretrained(tiny, subfolder="tokenizer_2")}
    flux = FluxPipeline(transformer=transformer, text_encoder=fake_from_config(CLIPTextModel, clip_cfg),
                        text_encoder_2=fake_from_config(T5EncoderModel, t5_cfg),
                        vae=fake_from_config(AutoencoderKL, {**C.FLUX_VAE_CONFIG, **VAE_FACTORS}), **parts)
    return UraePipeline(flux, model="fake FLUX.1-dev", quant=quant, adapters=[], defaults=GenerationSettings(),
                        offload="model", progress=False)


def generate_settings(size: int, vae_tiling: str):
    """The preset of `size` (2k, or 4k from 4096²) at size², one denoising step, the resolved VAE tiling."""
    from ..presets import load_preset

    return load_preset("4k" if size >= 4096 else "2k", "dev").replace(width=size, height=size, steps=1,
                                                                      vae_tiling=vae_tiling)


def measure_generate(pipe, size: int, vae_tiling: str) -> list[Phase]:
    """Peak device bytes of the three stages with `model` offload (one component on the device at a time)."""
    s = generate_settings(size, vae_tiling)
    flux = pipe.flux
    tracker = LiveBytes()
    hooks = offload_hooks(tracker, [flux.text_encoder, flux.text_encoder_2])
    try:
        with tracker:
            text, embeds = measure(tracker, "text encoding", lambda: pipe.encode(PROMPT, s))
    finally:
        for h in hooks:
            h.remove()
    tracker = LiveBytes()
    tracker.hold([*module_tensors(pipe.transformer), *embeds])
    with real_schedulers(), tracker:
        denoise, packed = measure(tracker, "denoising", lambda: pipe.denoise(embeds, s, seed=0))
    tracker = LiveBytes()
    tracker.hold([*module_tensors(flux.vae), *kernel_workspaces(), packed])
    with tracker:
        decode, _ = measure(tracker, "VAE decode", lambda: decode_latents(flux, packed, s))
    return [text, denoise, decode]


def _unfaked(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)

    return run


@contextlib.contextmanager
def real_schedulers() -> Iterator[None]:
    """The pipeline's schedulers keep real (host) sigmas: they read them back with `.item()`, which fake tensors
    cannot answer. The step index starts at 0 (diffusers would find it by comparing timesteps)."""
    from .. import pipeline

    original = pipeline.static_shift_scheduler

    def make(scheduler, shift):
        made = _unfaked(original)(scheduler, shift)
        set_timesteps = _unfaked(made.set_timesteps)

        @functools.wraps(made.set_timesteps)
        def set_timesteps_from_start(*args, **kwargs):
            set_timesteps(*args, **kwargs)
            made.set_begin_index(0)

        made.set_timesteps = set_timesteps_from_start
        return made

    pipeline.static_shift_scheduler = make
    try:
        yield
    finally:
        pipeline.static_shift_scheduler = original


def decode_latents(flux, packed: torch.Tensor, s) -> torch.Tensor:
    """`UraePipeline.decode` up to the image tensor (PIL conversion needs data); an exact tiled decode keeps its
    full-size maps in host memory, as on a card where they do not fit beside the working set."""
    from ..vae_tiling import decode

    vae = flux.vae
    latents = flux._unpack_latents(packed, s.height, s.width, flux.vae_scale_factor)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    home = HOST if s.vae_tiling == "on" else None
    return decode(vae, latents.to(vae.dtype), mode=s.vae_tiling, strip_rows=s.vae_strip_rows, home_device=home)


# ---- training ------------------------------------------------------------------------------------------------------
TRAIN_PHASES = ("forward", "backward", "optimizer step", "validation", "val. decode")  # the planner's names
TRAIN_RECIPES = {2048: "train_2k_lora.yaml", 4096: "train_4k_minor.yaml"}


def train_recipe(size: int, quant: str):
    """The recipe of `size` (2K LoRA below 4096², else 4K minor) with its checkpointing, at `quant`."""
    from pathlib import Path

    from ..train.config import load_recipe

    recipe = Path(__file__).resolve().parents[2] / "recipes" / TRAIN_RECIPES[4096 if size >= 4096 else 2048]
    return load_recipe(recipe, [f"quant={quant}", f"data.resolution={size}"], require_paths=False)


def fake_training_model(cfg) -> nn.Module:
    """The model `build_model` makes for `cfg` (the minor recipe's SVD replaced by slices of the same shapes)."""
    from ..tiny import flux_dev_config
    from ..train.model import prepare_for_training

    model = fake_transformer(flux_dev_config(), cfg.quant)
    if cfg.adapter.kind == "minor":
        fake_minor(model, cfg.adapter.rank)
    return prepare_for_training(model, cfg)


def fake_sample(size: int, text_tokens: int = 512):
    """A TrainSample with the cache's shapes and dtypes (urae_lite/train/samples.py)."""
    from ..train.samples import TrainSample

    n = (size // 16) ** 2
    return TrainSample(0, "fake", "generated_prompt", 0.5, torch.empty(1, n, 64), torch.empty(1, n, 64),
                       torch.empty(1, text_tokens, 4096, dtype=BF16), torch.empty(1, 768, dtype=BF16),
                       torch.empty(n, 3), torch.empty(text_tokens, 3))


def prodigy_state_bytes(model: nn.Module, cfg) -> int:
    """prodigyopt's per-parameter state, counted from the shapes (its step reads `.item()`, which fake tensors
    cannot answer): exp_avg, exp_avg_sq, s like the parameter, p0 too unless the parameter is all zeros at the
    first step (a fresh LoRA's B), when it is a scalar."""
    from ..train.model import trainable_parameters

    total = 0
    for name, p in trainable_parameters(model):
        zero_at_start = cfg.adapter.kind == "lora" and name.endswith(".B")
        total += p.element_size() * (3 * p.numel() + (1 if zero_at_start else p.numel()))
    return total


def measure_train(cfg, size: int) -> tuple[list[Phase], dict]:
    """Peak device bytes of one training step's phases, then one validation denoising step and its tiled decode.
    Checkpointing `cpu` keeps its saved block inputs in (uncounted) host memory. Returns (phases, options)."""
    from diffusers import AutoencoderKL

    from ..train.loop import Trainer
    from ..train.model import trainable_parameters
    from ..train.validation import sample_latents
    from . import constants as C

    if not cfg.optimizer.get("_component_", "").startswith("prodigyopt"):
        raise NotImplementedError("fake training measures the recipes' Prodigy only")
    model = fake_training_model(cfg)
    params = [p for _, p in trainable_parameters(model)]
    trainer = Trainer(model, None, None, cfg, torch.device("cpu"))
    sample = fake_sample(size)
    tracker = LiveBytes()
    states = prodigy_state_bytes(model, cfg)
    tracker.hold([*module_tensors(model), sample.noisy, sample.target, sample.t5, sample.pooled, sample.img_ids,
                  sample.txt_ids])
    tracker.current += states  # held across steps, as from the second step on
    phases = []
    with host_saved_tensors(), tracker:
        forward, loss = measure(tracker, "forward", lambda: trainer.forward_loss(sample))
        backward, _ = measure(tracker, "backward", (loss / cfg.training.gradient_accumulation).backward)
        del loss
        step, _ = measure(tracker, "optimizer step",
                          lambda: torch.nn.utils.clip_grad_norm_(params, cfg.training.max_grad_norm))
        phases += [forward, backward, step]
        for p in params:
            p.grad = None
        v = cfg.validation
        val_size = v.size or size
        validation, z = measure(tracker, "validation", lambda: sample_latents(
            model, sample.t5[0], sample.pooled[0], val_size, val_size, 1, v.guidance, v.shift, v.seed,
            torch.device("cpu"), cfg.training.precision == "bf16"))
        vae = fake_from_config(AutoencoderKL, {**C.FLUX_VAE_CONFIG, **VAE_FACTORS})
        tracker.hold(module_tensors(vae))
        decode, _ = measure(tracker, "val. decode", lambda: _validation_decode(vae, z))
        phases += [validation, decode]
    options = {"optimizer": "prodigy", "optimizer_states": f"analytic: {states} B from the parameter shapes "
               "(prodigyopt's step reads .item(); its states are held in every phase, as from the second step)",
               "optimizer_step": "clip_grad_norm_ measured, the Prodigy update's temporaries not",
               "validation_steps": 1}
    return phases, options


def _validation_decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """run_validation's decode with the exact tiled decode (full-size maps in host memory)."""
    from ..vae_tiling import decode

    c = vae.config
    return decode(vae, (z / c.scaling_factor + c.shift_factor).to(vae.dtype), mode="on", home_device=HOST)
