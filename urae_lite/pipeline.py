"""`load_pipeline(...)`: diffusers' FluxPipeline around our quantized, adapted transformer, with URAE's
high-resolution inference and staged memory; calling it makes one image.

Stages of a call: text encoders (prompt embeddings) -> transformer (denoising, on packed latents) -> VAE (exact
tiled decode when needed). With the default `model` offload on CUDA only one stage's weights are on the GPU at a
time, which is what keeps 2K under 10 GiB with an NF4 base (T5-XXL alone is 8.9 GiB in bf16).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from PIL import Image

from . import memory as memory_settings
from .adapter_cache import resolve_adapters
from .block_swap import execution_blocks
from .component_files import ComponentFiles, check_fits, pipeline_components
from .console import library_bars_off
from .errors import UraeError
from .hires import set_ntk, set_proportional_attention
from .loader import LoadSpec, read_transformer
from .memory import MemorySettings, spell
from .minor import MinorSpec
from .model_files import ModelFiles, as_model_files
from .offload import apply_offload
from .output import GenerationResult
from .presets import GenerationSettings, load_preset, preset_memory
from .recovery import MAX_REPLANS, Replanner, announce, out_of_memory, part_of, step_down
from .refine import adapters_disabled, coarse_size, tiled_encode, upscale
from .report import RunReport
from .safetensors_io import file_digest
from .text_encoders import load_t5_nf4
from .timeshift import static_shift_scheduler
from .vae_tiling import decode as vae_decode

Embeds = tuple[torch.Tensor, torch.Tensor]  # T5 (1, L, 4096), pooled CLIP (1, 768) for FLUX.1


SHARED_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")


class UraePipeline:
    """Callable: `pipe(prompt, seed=0, **settings) -> GenerationResult`; settings override the preset's."""

    def __init__(
        self,
        flux,
        *,
        model: str,
        adapters: list[dict[str, str]],
        defaults: GenerationSettings,
        memory: MemorySettings,
        progress: bool = True,
        replan: Replanner = step_down,
    ):
        self.flux = flux
        self.model, self.adapters = model, adapters
        self.defaults, self.memory = defaults, memory  # memory: as loaded (offload resolved), for the advice too
        self.replan = replan  # what an out-of-memory error in a stage re-plans with (urae_lite.recovery)
        self._own_scheduler = flux.scheduler  # the model's own (dynamic shifting for dev); shifted copies per call
        flux.set_progress_bar_config(disable=not progress, desc="denoising")

    @property
    def transformer(self) -> torch.nn.Module:
        return self.flux.transformer

    def shared_components(self) -> dict[str, object]:
        """Everything but the transformer and scheduler, for `load_pipeline(reuse=...)`: a pipeline that differs only
        in base format or adapters needs no second read of the text encoders and VAE."""
        return {name: getattr(self.flux, name) for name in SHARED_COMPONENTS}

    def __call__(self, prompt: str, seed: int = 0, report: RunReport | None = None, **settings) -> GenerationResult:
        """One image. Out of memory in a stage re-plans the memory settings (`self.replan`), puts them on the loaded
        pipeline and runs that stage again from its start, with the same seed, keeping what the stages before it
        made: the image is the one the final settings give from the start (urae_lite.recovery)."""
        s = self.defaults.replace(**settings)
        report = report if report is not None else RunReport()
        done: dict[str, object] = {}  # what finished stages made, kept across re-plans
        try:
            for attempt in range(MAX_REPLANS + 1):
                try:
                    image = self._stages(prompt, seed, s, report, done)
                    break
                except torch.cuda.OutOfMemoryError as e:
                    torch.cuda.empty_cache()
                    self._recover(e, report.stages[-1][0], s, attempt)
        finally:
            self.flux.maybe_free_model_hooks()  # `model` offload: everything back to the CPU between calls
        return GenerationResult(image, prompt, seed, s, self.model, self.memory, self.adapters, report)

    def _stages(self, prompt: str, seed: int, s: GenerationSettings, report: RunReport, done: dict) -> Image.Image:
        if "embeds" not in done:
            with report.stage("text encoders"):
                done["embeds"] = self.encode(prompt, s)
        embeds = done["embeds"]
        if "packed" not in done:
            if s.refine_from is not None:
                if "guide" not in done:
                    with report.stage("coarse image"):
                        done["guide"] = self._coarse(embeds, s, seed)
                with report.stage("refine"):
                    done["packed"] = self._img2img(embeds, s, seed, done["guide"])
            else:
                with report.stage("denoise"):
                    done["packed"] = self.denoise(embeds, s, seed)
        with report.stage("vae decode"):
            return self.decode(done["packed"], s)

    def _recover(self, error: torch.cuda.OutOfMemoryError, stage: str, s: GenerationSettings, attempt: int) -> None:
        """Re-plan after `error` in `stage` and reconfigure, or one UraeError with the advice when no re-plan is
        left (MAX_REPLANS, or nothing lighter)."""
        n_blocks = len(execution_blocks(self.transformer))
        oom = out_of_memory(error, "generate", stage, part_of(stage), n_blocks, self.flux._execution_device)
        new = self.replan(self.memory, oom) if attempt < MAX_REPLANS else None
        if new is None or new == self.memory:
            raise UraeError(oom_advice(s, self.memory, stage, n_blocks)) from error
        announce(oom, self.memory, new, attempt + 1)
        self.reconfigure(new)

    def reconfigure(self, memory: MemorySettings) -> None:
        """Run with `memory` from now on (same base and T5 formats): offload hooks off, the transformer's mechanisms
        changed where they differ, then the offload as `load_pipeline` installs it."""
        if (memory.quant, memory.t5_quant) != (self.memory.quant, self.memory.t5_quant):
            raise UraeError("the base and T5 formats are loaded: reload the pipeline to change them")
        config = self.transformer.config
        memory.check("generate", config.num_layers + config.num_single_layers)  # the rules load_pipeline checks
        device = self.flux._execution_device
        self.flux.remove_all_hooks()
        memory_settings.apply(self.transformer, memory, device, previous=self.memory)
        apply_offload(self.flux, memory.offload, device)
        self.memory = memory

    # ---- stages (public so benchmarks can measure each; `__call__` is the normal entry) ---------------------------
    @torch.no_grad()
    def encode(self, prompt: str, s: GenerationSettings) -> Embeds:
        embeds, pooled, _ = self.flux.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.flux._execution_device, max_sequence_length=s.max_sequence_length
        )
        return embeds, pooled

    def _configure(self, s: GenerationSettings) -> None:
        """URAE's three inference switches for this pass (cheap; they are set on every pass)."""
        self.flux.scheduler = static_shift_scheduler(self._own_scheduler, s.shift)
        set_proportional_attention(self.transformer, s.proportional_attention)
        set_ntk(self.transformer, s.ntk)

    def denoise(self, embeds: Embeds, s: GenerationSettings, seed: int) -> torch.Tensor:
        """Packed latents (1, H/16·W/16, 64) from pure noise."""
        self._configure(s)
        return self.flux(**_sampling_arguments(embeds, s, seed)).images

    def _coarse(self, embeds: Embeds, s: GenerationSettings, seed: int) -> Image.Image:
        """The base model's guide image at ~refine_from², with FLUX's native (not URAE's) settings."""
        w, h = coarse_size(s.width, s.height, s.refine_from)
        native = s.replace(width=w, height=h, refine_from=None, shift=None, ntk=1.0, proportional_attention=False)
        with adapters_disabled(self.transformer):
            packed = self.denoise(embeds, native, seed)
        return self.decode(packed, native)

    def _img2img(self, embeds: Embeds, s: GenerationSettings, seed: int, guide: Image.Image) -> torch.Tensor:
        """Upscale the guide, re-noise it to `strength`, denoise at the target size with adapters and URAE."""
        from diffusers import FluxImg2ImgPipeline

        self._configure(s)
        img2img = FluxImg2ImgPipeline(**self.flux.components)  # shares the modules (and their offload hooks)
        img2img.set_progress_bar_config(**self.flux._progress_bar_config)
        with tiled_encode(self.flux.vae):
            return img2img(
                image=upscale(guide, s.width, s.height), strength=s.strength, **_sampling_arguments(embeds, s, seed)
            ).images

    @torch.no_grad()
    def decode(self, packed: torch.Tensor, s: GenerationSettings) -> Image.Image:
        self.flux.maybe_free_model_hooks()  # `model` offload: the transformer leaves the GPU before the VAE runs
        vae = self.flux.vae
        latents = self.flux._unpack_latents(packed, s.height, s.width, self.flux.vae_scale_factor)  # (1, 16, H/8, W/8)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        m = self.memory
        image = vae_decode(vae, latents.to(vae.dtype), mode=m.vae_tiling, strip_rows=m.vae_strip_rows)  # (1, 3, H, W)
        return self.flux.image_processor.postprocess(image, output_type="pil")[0]


def _sampling_arguments(embeds: Embeds, s: GenerationSettings, seed: int) -> dict:
    """What FluxPipeline and FluxImg2ImgPipeline take alike for one image: embeddings, size, schedule, noise."""
    return dict(
        prompt_embeds=embeds[0],
        pooled_prompt_embeds=embeds[1],
        width=s.width,
        height=s.height,
        num_inference_steps=s.steps,
        guidance_scale=s.guidance,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=s.max_sequence_length,
    )


def oom_advice(s: GenerationSettings, memory: MemorySettings, stage: str, n_blocks: int = 57) -> str:
    """One line: where memory ran out and the settings that lower it, cheapest first."""
    part = stage if stage in ("text encoders", "vae decode") else "transformer"
    tips = [f"{spell(name, 'generate')} {value}" for name, value in memory.lighter("generate", n_blocks, part).items()]
    tips.append(f"a smaller --width/--height than {s.width}x{s.height}")
    return (
        f"CUDA out of memory in stage '{stage}' at {s.width}x{s.height} "
        f"({memory.describe('generate', ['offload', 'quant'])}); to use less memory try: {', '.join(tips)}"
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(
    model: str | os.PathLike | ModelFiles = "tiny",
    *,
    memory: MemorySettings | Mapping | None = None,
    adapters: Sequence[str | os.PathLike] = (),
    preset: str | os.PathLike = "2k",
    preset_overrides: Sequence[str] = (),
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    minor: MinorSpec | None = None,
    svd_device: str | None = None,
    progress: bool = True,
    report: RunReport | None = None,
    base_pipeline: str | os.PathLike | None = None,
    component_files: ComponentFiles | None = None,
    replan: Replanner = step_down,
    reuse: Mapping[str, object] | None = None,
    **settings,
) -> UraePipeline:
    """FLUX with an NF4/FP8/bf16 base carrying `adapters`, ready to generate at 2K/4K.

    `memory`: how it fits the card (urae_lite.memory.MemorySettings: base format, offload, block swap, token chunks,
    T5 format, VAE tiling), or a mapping of those settings over the preset's `memory:` section (default: the
    preset's). Only the base and T5 formats change the image (rounding); the others are exact. `adapters`: our or
    diffusers-format LoRA files, kohya-style FLUX LoRAs, the authors' 2K file, and the authors' 4K file right after
    its 2K one (converted once to an exact LoRA, cached beside it). `preset`: `2k`, `4k` or a YAML file;
    `preset_overrides` (`key=value`, as recipes take them) and then `**settings` (GenerationSettings fields)
    override it. `device` defaults to CUDA when present; `dtype` to bf16 on CUDA and fp32 on CPU (CPU bf16
    convolutions are ~30x slower); offload to `model` (staged) on CUDA and `none` on CPU. `minor` attaches a
    minor-component adapter initialised from the base. `model` may be a single FLUX transformer file (ComfyUI /
    Forge); the rest of the pipeline then comes from `base_pipeline`. `component_files`: single-file VAE / CLIP / T5
    weights (ComfyUI's ae, clip_l, t5xxl) instead of the folder's. `model` may also be a `ModelFiles` from
    `urae_lite.model_files.resolve_files`, which already holds those two. `replan`: how a stage that runs out of
    memory re-plans (urae_lite.recovery; the command passes the planner's).
    """
    GenerationSettings().replace(**{k: v for k, v in settings.items() if k != "refine_from"})  # fail before loading
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    files = as_model_files(model, base_pipeline, component_files)  # a hub id is fetched once, here
    if not isinstance(memory, MemorySettings):
        memory = preset_memory(preset, files.variant, preset_overrides).replace(**(memory or {}))
    config = files.config
    memory = memory.replace(offload=memory.resolved_offload(device.type))
    memory.check("generate", config["num_layers"] + config["num_single_layers"])  # before any weight is read
    root = files.pipeline_root()
    check_fits(files.component_files, root)  # headers only: a wrong file fails before the transformer loads
    defaults = load_preset(preset, files.variant, preset_overrides).replace(**settings)
    # bf16 needs no quantization work, so an offloaded (or block-swapped) bf16 base is built on the CPU instead of
    # passing the GPU
    streamed = memory.offload != "none" or memory.blocks_to_swap
    load_device = torch.device("cpu") if memory.format.dense and streamed else device
    spec = LoadSpec(
        memory.format, load_device, dtype, minor=minor, progress=progress, park_blocks=memory.blocks_to_swap
    )
    report = report if report is not None else RunReport()
    with report.stage("adapters"):
        resolved = resolve_adapters(
            files, adapters, svd_device or (str(device) if device.type == "cuda" else None), progress
        )
    with report.stage(f"load transformer ({memory.quant})"):
        transformer = read_transformer(files, replace(spec, adapters=resolved))
        # before the pipeline's `.to()` / offload hooks, which then move only the blocks that are not swapped
        memory_settings.apply(transformer, memory, device)
    with report.stage("load text encoders + vae"), library_bars_off():
        from diffusers import FluxPipeline

        t5_nf4 = memory.t5_quant == "nf4"
        # passed components: diffusers skips their weights
        extra = dict(reuse) if reuse else pipeline_components(files.component_files, root, dtype, t5_nf4=t5_nf4)
        if t5_nf4 and "text_encoder_2" not in extra:
            extra["text_encoder_2"] = load_t5_nf4(root, dtype)
        flux = FluxPipeline.from_pretrained(root, transformer=transformer, dtype=dtype, **extra)
        apply_offload(flux, memory.offload, device)
    used = [{"path": str(a), "sha256": file_digest(a)} for a in adapters]
    return UraePipeline(
        flux, model=files.model, adapters=used, defaults=defaults, memory=memory, progress=progress, replan=replan
    )
