"""`urae-lite generate "PROMPT" ...`: one 2K/4K image from FLUX + URAE adapters, a PNG with its settings, and a
time/memory report. Options left out come from the preset (`recipes/generate_<dev|schnell>_<2k|4k>.yaml`)."""

from __future__ import annotations

import argparse

from .component_files import add_component_options
from .destinations import check_output_file, write_with_fallback
from .memory import MemorySettings, overridden
from .presets import PRESETS
from .recovery import step_down
from .vram_options import add_vram_options, auto_vram

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


def run(args: argparse.Namespace) -> None:
    import torch

    from .component_files import component_files
    from .errors import UraeError
    from .model_files import resolve_files
    from .pipeline import load_pipeline
    from .presets import load_preset, preset_memory
    from .report import RunReport

    check_output_file(args.out)
    settings = {k: getattr(args, k) for k in SETTING_OPTIONS if getattr(args, k) is not None}
    if settings.get("shift") == "model":
        settings["shift"] = None
    files = resolve_files(args.model, args.base_pipeline, component_files(args))  # once: a hub id is fetched here
    given = MemorySettings.given(args)
    user_set = set(given) | overridden(args.overrides)
    memory = preset_memory(args.preset, files.variant, args.overrides).replace(**given)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vram = auto_vram(args.vram, user_set, device.type)
    replan = step_down
    if vram is not None or device.type == "cuda":  # the planner picks, and re-plans after an out-of-memory error
        from .plan.choose import apply_vram, model_fields, replanner
        from .plan.job import PlanConfig

        size = load_preset(args.preset, files.variant, args.overrides).replace(**settings)
        job = PlanConfig(task="generate", width=size.width, height=size.height, memory=memory, **model_fields(files))
        if vram is not None:
            memory = apply_vram(job, user_set, vram, args.ram, args.device)
        replan = replanner(job, user_set, args.ram)
    report = RunReport()
    try:
        pipe = load_pipeline(
            files,
            memory=memory,
            adapters=args.adapter,
            preset=args.preset,
            preset_overrides=args.overrides,
            device=device,
            svd_device=args.svd_device,
            report=report,
            replan=replan,
            **settings,
        )
    except torch.cuda.OutOfMemoryError as e:
        raise UraeError(
            f"CUDA out of memory while loading the model ({memory.describe('generate', ['quant', 'offload'])}); "
            f"try --quant nf4 and --offload model"
        ) from e
    result = pipe(args.prompt, seed=args.seed, report=report)
    with report.stage("save png"):
        out = write_with_fallback(args.out, result.save, "image")
    print(f"wrote {out} ({result.settings.width}x{result.settings.height}, seed {args.seed})")
    print(report.format())
