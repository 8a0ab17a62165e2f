"""`urae-lite generate "PROMPT" ...`: one 2K/4K image from FLUX + URAE adapters, a PNG with its settings, and a
time/memory report. Options left out come from the preset (`recipes/generate_<dev|schnell>_<2k|4k>.yaml`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .component_files import add_component_options
from .destinations import check_output_file, write_with_fallback
from .memory import MemorySettings, overridden
from .presets import PRESETS, GenerationSettings
from .recovery import Replanner, step_down
from .report import RunReport
from .vram_options import add_vram_options, auto_vram

if TYPE_CHECKING:
    from .model_files import ModelFiles
    from .output import GenerationResult
    from .pipeline import UraePipeline
    from .plan.job import PlanConfig

# CLI option -> GenerationSettings field, for the options that override the preset
SETTING_OPTIONS = (
    "width",
    "height",
    "steps",
    "guidance",
    "shift",
    "ntk",
    "proportional_attention",
    "max_sequence_length",
    "refine_from",
    "strength",
)


def _shift(text: str) -> float | str:
    """A positive number, or `model` for the model's own scheduler (dynamic shifting for dev)."""
    if text == "model":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'model', got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="2K/4K image from FLUX + URAE adapters on a quantized base", description=__doc__
    )
    p.add_argument("prompt")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="preset settings, as recipes take them (e.g. steps=20 ntk=5); options below win",
    )
    p.add_argument(
        "--model",
        default="black-forest-labs/FLUX.1-dev",
        help="diffusers FLUX folder, hub id, `prepare`d folder, single FLUX transformer .safetensors "
        "(ComfyUI/Forge), or 'tiny' (default: %(default)s)",
    )
    p.add_argument(
        "--base-pipeline",
        metavar="FOLDER_OR_HUB_ID",
        help="with a single transformer file as --model: the diffusers FLUX pipeline for the VAE, text "
        "encoders and scheduler (default: the matching FLUX.1 hub id from the Hugging Face cache)",
    )
    add_component_options(p)
    p.add_argument(
        "--preset", default="2k", help=f"{' | '.join(PRESETS)} (authors' settings for the model family) or a YAML file"
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="FILE",
        help="LoRA file (ours, diffusers, kohya, the authors' 2K); the authors' 4K file goes right "
        "after its 2K one; repeat for several",
    )
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, help="distilled guidance (dev)")
    p.add_argument(
        "--shift", type=_shift, help="static time shift (dynamic shifting off); 'model' = the model's own scheduler"
    )
    p.add_argument("--ntk", type=float, help="RoPE base multiplier (URAE: 10; FLUX: 1)")
    p.add_argument(
        "--proportional-attention",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scale attention logits by sqrt(log N / log 4608) (URAE: on)",
    )
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens (dev 512, schnell 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--refine-from",
        type=int,
        metavar="SIDE",
        help="coarse-to-fine: base model at ~SIDE² first, upscale, re-noise, denoise at the target",
    )
    p.add_argument("--strength", type=float, help="refine: re-noising strength in (0, 1] (default 0.6)")
    MemorySettings.add_arguments(p, ["generate"])  # --quant, --offload, --blocks-to-swap, ... (the preset's memory:)
    add_vram_options(p, "generate")
    p.add_argument("--device", help="cuda (default when present) or cpu")
    p.add_argument("--svd-device", help="device for the one-time 4K adapter conversion (default: --device)")
    p.add_argument("--out", default="urae_lite.png", help="PNG to write (default: %(default)s)")
    p.set_defaults(func=run)


@dataclass
class GenerateJob:
    """What `generate` resolved from its command line before any weights are read; the web page (urae_lite.ui)
    runs the same steps from the same parsed arguments, so the two cannot drift apart."""

    args: argparse.Namespace
    files: ModelFiles
    memory: MemorySettings  # the preset's, with the memory options given (before `--vram` picks the rest)
    user_set: set[str]  # the memory settings the user chose (`--vram` keeps them)
    image: GenerationSettings  # the preset with the options given: everything that decides the image
    device: torch.device

    def plan_config(self) -> PlanConfig:
        """The planner's job for this generation (`--vram` and the out-of-memory re-plan plan it)."""
        from .plan.choose import model_fields
        from .plan.job import PlanConfig

        i = self.image
        return PlanConfig(
            task="generate", width=i.width, height=i.height, memory=self.memory, **model_fields(self.files)
        )


def resolve_job(args: argparse.Namespace) -> GenerateJob:
    """The destination checked, the model's files resolved (a hub id is fetched here), the settings checked."""
    from .component_files import component_files
    from .model_files import resolve_files
    from .presets import load_preset, preset_memory

    check_output_file(args.out)
    settings = {k: getattr(args, k) for k in SETTING_OPTIONS if getattr(args, k) is not None}
    if settings.get("shift") == "model":
        settings["shift"] = None
    files = resolve_files(args.model, args.base_pipeline, component_files(args))  # once: a hub id is fetched here
    given = MemorySettings.given(args)
    memory = preset_memory(args.preset, files.variant, args.overrides).replace(**given)
    image = load_preset(args.preset, files.variant, args.overrides).replace(**settings)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return GenerateJob(args, files, memory, set(given) | overridden(args.overrides), image, device)


def fit_memory(job: GenerateJob) -> tuple[MemorySettings, Replanner]:
    """The memory settings to load with (`--vram`, or `auto` on CUDA: the planner's pick) and the re-plan after an
    out-of-memory error (the planner's on CUDA or with `--vram`, else the library's step-down)."""
    args = job.args
    vram = auto_vram(args.vram, job.user_set, job.device.type)
    if vram is None and job.device.type != "cuda":
        return job.memory, step_down
    from .plan.choose import apply_vram, replanner

    plan = job.plan_config()
    memory = job.memory if vram is None else apply_vram(plan, job.user_set, vram, args.ram, args.device)
    return memory, replanner(plan, job.user_set, args.ram)


def plan_on_card(job: GenerateJob, vram_gib: float | None, ram_gib: float | None = None) -> tuple[bool, str]:
    """Whether `job` fits a card of `vram_gib` GiB (None: this CUDA device's free memory, as `--vram auto`) and
    `ram_gib` GiB of host memory (None: `--ram`'s default), with one line: the planner's pick, its peak against the
    card and its host memory; or why nothing fits. What `--vram` would do, shown before anything loads."""
    from .plan import constants as C
    from .plan.choose import free_gib, this_machine_ram_gib
    from .plan.search import best_config, options

    vram = free_gib(str(job.device)) if vram_gib is None else vram_gib
    ram = this_machine_ram_gib() if ram_gib is None else ram_gib
    result = best_config(job.plan_config(), vram, ram, job.user_set)
    if result.best is None:
        return False, result.impossible()
    best = result.best
    return True, (
        f"fits a {vram:.1f} GiB card: the planner picks {options(best.config)}, peak {best.peak / C.GiB:.1f} GiB "
        f"(in {best.estimate.peak_phase}), host memory {best.estimate.host / C.GiB:.1f} of {ram:.0f} GiB"
    )


def load(
    job: GenerateJob, memory: MemorySettings, replan: Replanner, report: RunReport, reuse: dict | None = None
) -> UraePipeline:
    """The pipeline for `job` (`reuse`: an earlier pipeline's text encoders and VAE, see `load_pipeline`): out of
    memory while loading is one line with the settings that load less."""
    from .errors import UraeError
    from .pipeline import load_pipeline

    args = job.args
    try:
        return load_pipeline(
            job.files,
            memory=memory,
            adapters=args.adapter,
            preset=args.preset,
            preset_overrides=args.overrides,
            device=job.device,
            svd_device=args.svd_device,
            report=report,
            replan=replan,
            reuse=reuse,
            **job.image.as_dict(),
        )
    except torch.cuda.OutOfMemoryError as e:
        raise UraeError(
            f"CUDA out of memory while loading the model ({memory.describe('generate', ['quant', 'offload'])}); "
            f"try --quant nf4 and --offload model"
        ) from e


def make_image(pipe: UraePipeline, job: GenerateJob, report: RunReport) -> tuple[GenerationResult, Path]:
    """One image with `job`'s prompt, seed and settings, saved as `--out` (with its metadata)."""
    result = pipe(job.args.prompt, seed=job.args.seed, report=report, **job.image.as_dict())
    with report.stage("save png"):
        out = write_with_fallback(job.args.out, result.save, "image")
    return result, out


def run(args: argparse.Namespace) -> None:
    job = resolve_job(args)
    memory, replan = fit_memory(job)
    report = RunReport()
    pipe = load(job, memory, replan, report)
    result, out = make_image(pipe, job, report)
    print(f"wrote {out} ({result.settings.width}x{result.settings.height}, seed {args.seed})")
    print(report.format())
