"""GPU memory truth without a GPU: the real generation and training code at full FLUX.1-dev size on fake tensors.

`torch._subclasses.fake_tensor.FakeTensorMode` gives every tensor its shape, dtype and autograd but no data, so a
full-size forward and backward run in seconds on a CPU; `LiveBytes` (measure/live_bytes.py) counts the live device
bytes of every phase and keeps its peak. The models are built in measure/fake_models.py.

Device vs host: fake CPU tensors stand for the GPU (fake CUDA tensors fail in backward), and measure/fake_cuda.py makes
them allocate what CUDA would: CUDA autocast's fp32 norms, the fused RMSNorm, the kernels' held dequantization
buffer. What the real code puts in *host* memory is put on the `meta` device instead (`HOST`), which the counter
skips: `save_on_cpu`'s copies of checkpointed block inputs and the exact tiled VAE decode's full-size maps. Modules
that offloading would keep on the host (`model` offload: one component on the GPU at a time) are simply not held
by the phase's counter, nor are block swap's host copies of the swapped blocks (`device_tensors`); the swap's
window fetches them as counted device tensors, as on a GPU.

What fake tensors cannot see: allocator block rounding and fragmentation, kernel-internal workspaces (cuBLAS,
cuDNN, attention) and the CUDA context; the planner's allocator reserve and context terms cover those, and only
a GPU run calibrates them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .fake_cuda import cuda_like, forget_fake_workspaces, kernel_workspaces
from .fake_models import (
    fake_from_config,
    fake_frozen_lora,
    fake_minor,
    fake_mode,
    fake_pipeline,
    fake_quantized_weight,
    fake_sample,
    fake_t5_nf4,
    fake_training_model,
    fake_transformer,
    fake_vae,
    host_storages,
    text_encoder_configs,
    window_copies,
)
from .live_bytes import HOST, LiveBytes, Phase, measure, module_tensors, offload_hooks

__all__ = [  # the harness's public names, wherever they live
    "GENERATE_PHASES",
    "HOST",
    "TRAIN_PHASES",
    "LiveBytes",
    "Phase",
    "device_tensors",
    "fake_from_config",
    "fake_frozen_lora",
    "fake_minor",
    "fake_mode",
    "fake_pipeline",
    "fake_quantized_weight",
    "fake_sample",
    "fake_t5_nf4",
    "fake_training_model",
    "fake_transformer",
    "fake_vae",
    "forget_fake_workspaces",
    "generate_rank",
    "measure",
    "measure_generate",
    "measure_train",
    "module_tensors",
    "release_block_swap",
    "text_encoder_configs",
    "train_recipe",
]


def device_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers that are on the device: all of them, less block swap's host copies
    (the swapped blocks' frozen tensors point at those except while the swap's window holds them), plus the
    window's device copies (a prefetched block's copies are not its tensors until the block runs)."""
    host = host_storages(module)
    return [t for t in module_tensors(module) if id(t.untyped_storage()) not in host] + window_copies(module)


# ---- generation ----------------------------------------------------------------------------------------------------
GENERATE_PHASES = ("text encoding", "denoising", "VAE decode")  # the planner's phase names
PROMPT = "a photo of a red fox in a snowy forest at golden hour, high resolution, detailed"


def generate_rank(size: int) -> int:
    """The presets' adapters: the 2K LoRA (16), or 2K + the converted 4K adapter (48) at 4096²."""
    return 48 if size >= 4096 else 16


def generate_settings(size: int, variant: str = "dev"):
    """The `variant`'s preset of `size` (2k, or 4k from 4096²) at size², one denoising step."""
    from ..presets import load_preset

    return load_preset("4k" if size >= 4096 else "2k", variant).replace(width=size, height=size, steps=1)


MEASURED_OFFLOADS = ("model", "none")


def measure_generate(pipe, size: int, variant: str = "dev", decode: bool = True) -> list[Phase]:
    """Peak device bytes of the three stages, each phase holding what the previous ones left on the device (the
    prompt embeddings; the kernels' buffer), with the pipeline's memory settings (`pipe.memory`, its VAE tiling
    resolved to on or off). `model` offload: one component on the device at a time (a block-swapped transformer's
    resident part too: the offload hooks move it, block_swap.py); `none`: every component always, and the text
    encoding is the larger of this image's and the next one's, which runs beside what this image left (block swap's
    window, the kernels' buffer). `variant`: the presets of dev or schnell (a schnell pipeline:
    `fake_pipeline(config=flux_dev_config("schnell"))`); `decode=False`: the first two stages only (an exact tiled
    decode at 4096² costs seconds)."""
    offload = pipe.memory.offload
    if pipe.memory.vae_tiling == "auto":
        raise ValueError("measure a resolved VAE tiling (on or off): `auto` depends on the card")
    if offload not in MEASURED_OFFLOADS:
        raise NotImplementedError(f"the fake harness measures offload {' and '.join(MEASURED_OFFLOADS)}, not {offload}")
    s = generate_settings(size, variant)
    flux = pipe.flux
    encoders = [flux.text_encoder, flux.text_encoder_2]

    def resident() -> list[torch.Tensor]:
        """`none`: every component on the device, the transformer's swap window as it is now."""
        if offload != "none":
            return []
        return [t for m in (*encoders, flux.vae) for t in module_tensors(m)] + device_tensors(pipe.transformer)

    with cuda_like():
        tracker = LiveBytes()
        tracker.hold(resident())
        hooks = offload_hooks(tracker, encoders) if offload == "model" else []
        try:
            with tracker:
                text, embeds = measure(tracker, "text encoding", lambda: pipe.encode(PROMPT, s))
        finally:
            for h in hooks:
                h.remove()
        tracker = LiveBytes()
        tracker.hold([*resident(), *device_tensors(pipe.transformer), *embeds, *kernel_workspaces()])
        with real_schedulers(), tracker:
            denoise, packed = measure(tracker, "denoising", lambda: pipe.denoise(embeds, s, seed=0))
        phases = [text, denoise]
        if decode:
            tracker = LiveBytes()
            tracker.hold([*resident(), *module_tensors(flux.vae), *kernel_workspaces(), packed])
            if offload == "model":  # the hooks move the transformer off before the VAE runs, the swap window with it
                release_block_swap(pipe.transformer)
            with tracker:
                phases.append(measure(tracker, "VAE decode", lambda: decode_latents(pipe, packed, s))[0])
        if offload == "none":  # the next image's prompt, beside the window the last step left
            tracker = LiveBytes()
            tracker.hold([*resident(), *kernel_workspaces()])
            with tracker:
                again, _ = measure(tracker, "text encoding", lambda: pipe.encode(PROMPT, s))
            phases[0] = max(text, again, key=lambda p: p.peak)
    return phases


def release_block_swap(transformer: nn.Module) -> None:
    """The swap window emptied, as moving the transformer off the device does (no-op without block swap)."""
    from ..block_swap import block_swap_of

    swap = block_swap_of(transformer)
    if swap is not None:
        swap.release_all()


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


def decode_latents(pipe, packed: torch.Tensor, s) -> torch.Tensor:
    """`UraePipeline.decode` up to the image tensor (PIL conversion needs data); an exact tiled decode keeps its
    full-size maps in host memory, as on a card where they do not fit beside the working set."""
    from ..vae_tiling import decode

    flux, m = pipe.flux, pipe.memory
    vae = flux.vae
    latents = flux._unpack_latents(packed, s.height, s.width, flux.vae_scale_factor)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    home = HOST if m.vae_tiling == "on" else None
    return decode(vae, latents.to(vae.dtype), mode=m.vae_tiling, strip_rows=m.vae_strip_rows, home_device=home)


# ---- training ------------------------------------------------------------------------------------------------------
TRAIN_PHASES = ("forward", "backward", "optimizer step", "validation", "val. decode")  # the planner's names
TRAIN_RECIPES = {2048: "train_2k_lora.yaml", 4096: "train_4k_minor.yaml"}


def train_recipe(size: int, quant: str, overrides: tuple[str, ...] = ()):
    """The recipe of `size` (2K LoRA below 4096², else 4K minor) with its checkpointing, at `quant`; `overrides`:
    more `key=value` recipe overrides (memory.token_chunks=4, memory.blocks_to_swap=40, ...)."""
    from ..presets import RECIPES
    from ..train.config import load_recipe

    recipe = RECIPES / TRAIN_RECIPES[4096 if size >= 4096 else 2048]
    return load_recipe(recipe, [f"memory.quant={quant}", f"data.resolution={size}", *overrides], require_paths=False)


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


def measure_train(
    cfg, size: int, config: dict | None = None, validation: bool = True, decode: bool = True
) -> tuple[list[Phase], dict]:
    """Peak device bytes of one training step's phases, then one validation denoising step and its tiled decode.
    Checkpointing `cpu` keeps its saved block inputs in (uncounted) host memory, as block swap its swapped blocks'
    frozen tensors. `config`: another transformer config (fewer blocks); `validation=False` / `decode=False`: stop
    after the optimizer step / the validation step (the exact tiled decode costs seconds at 4096²). Returns
    (phases, options)."""
    from ..train.loop import Trainer
    from ..train.model import trainable_parameters
    from ..train.validation import sample_latents

    if not cfg.optimizer.get("_component_", "").startswith("prodigyopt"):
        raise NotImplementedError("fake training measures the recipes' Prodigy only")
    model = fake_training_model(cfg, config)
    params = [p for _, p in trainable_parameters(model)]
    trainer = Trainer(model, None, None, cfg, torch.device("cpu"))
    sample = fake_sample(size)
    tracker = LiveBytes()
    states = prodigy_state_bytes(model, cfg)
    tracker.hold(
        [*device_tensors(model), sample.noisy, sample.target, sample.t5, sample.pooled, sample.img_ids, sample.txt_ids]
    )
    tracker.current += states  # held across steps, as from the second step on
    phases = []
    with cuda_like(), tracker:
        forward, loss = measure(tracker, "forward", lambda: trainer.forward_loss(sample))
        backward, _ = measure(tracker, "backward", (loss / cfg.training.gradient_accumulation).backward)
        del loss
        step, _ = measure(
            tracker, "optimizer step", lambda: torch.nn.utils.clip_grad_norm_(params, cfg.training.max_grad_norm)
        )
        phases += [forward, backward, step]
        for p in params:
            p.grad = None
        if not validation:
            return phases, _train_options(states)
        v = cfg.validation
        val_size = v.size or size
        sampled, z = measure(
            tracker,
            "validation",
            lambda: sample_latents(
                model,
                sample.t5[0],
                sample.pooled[0],
                val_size,
                val_size,
                1,
                v.guidance,
                v.shift,
                v.seed,
                torch.device("cpu"),
                cfg.training.precision == "bf16",
            ),
        )
        phases.append(sampled)
        if decode:
            vae = fake_vae()
            tracker.hold(module_tensors(vae))
            phases.append(measure(tracker, "val. decode", lambda: _validation_decode(vae, z))[0])
    return phases, _train_options(states)


def _train_options(states: int) -> dict:
    return {
        "optimizer": "prodigy",
        "optimizer_states": f"analytic: {states} B from the parameter shapes "
        "(prodigyopt's step reads .item(); its states are held in every phase, as from the second step)",
        "optimizer_step": "clip_grad_norm_ measured, the Prodigy update's temporaries not",
        "validation_steps": 1,
    }


def _validation_decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """run_validation's decode with the exact tiled decode (full-size maps in host memory)."""
    from ..vae_tiling import decode

    c = vae.config
    return decode(vae, (z / c.scaling_factor + c.shift_factor).to(vae.dtype), mode="on", home_device=HOST)
