"""`urae-lite generate "PROMPT" ...`: one 2K/4K image from FLUX + URAE adapters, a PNG with its settings, and a
time/memory report. Options left out come from the preset (`recipes/generate_<dev|schnell>_<2k|4k>.yaml`)."""

from __future__ import annotations

import argparse

from .component_files import add_component_options
from .destinations import check_output_file, write_with_fallback
from .offload import OFFLOAD_MODES
from .presets import PRESETS, VAE_TILING_MODES
from .quant import QUANT_FORMATS
from .text_encoders import T5_QUANTS
from .vram_options import add_vram_options

# memory options (PlanConfig fields, `--vram` fills the ones not given) and their defaults; offload's depends on the
# device and is decided by load_pipeline
MEMORY_OPTIONS = ("quant", "offload", "t5_quant", "blocks_to_swap", "token_chunks")
MEMORY_DEFAULTS = {"quant": "nf4", "t5_quant": "bf16", "blocks_to_swap": 0, "token_chunks": 1}

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
    "vae_tiling",
    "vae_strip_rows",
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
        "--quant", choices=QUANT_FORMATS, help="frozen base format (default: nf4, or the planner's pick with --vram)"
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
        "--offload",
        choices=OFFLOAD_MODES,
        help="none | model (staged, default on CUDA) | group (blocks streamed) | sequential (least memory)",
    )
    p.add_argument(
        "--blocks-to-swap",
        type=int,
        metavar="N",
        help="keep the last N transformer blocks in host memory and stream them through the GPU one at a "
        "time (with --offload model or none): less GPU memory, same image, slower (default: 0, off)",
    )
    p.add_argument(
        "--token-chunks",
        type=int,
        metavar="N",
        help="run the blocks (all but attention) over N token chunks: less GPU memory at 4K, same image (default 1)",
    )
    p.add_argument("--vae-tiling", choices=VAE_TILING_MODES, help="exact strip-tiled VAE decode")
    p.add_argument("--vae-strip-rows", type=int, help="rows per tiled-decode strip (fewer = less memory)")
    p.add_argument(
        "--refine-from",
        type=int,
        metavar="SIDE",
        help="coarse-to-fine: base model at ~SIDE² first, upscale, re-noise, denoise at the target",
    )
    p.add_argument("--strength", type=float, help="refine: re-noising strength in (0, 1] (default 0.6)")
    p.add_argument(
        "--t5-quant",
        choices=T5_QUANTS,
        help="T5-XXL's linears: nf4 cuts text encoding from 8.9 to 3.9 GiB (default: bf16)",
    )
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
    from .plan.choose import apply_vram, model_fields
    from .presets import load_preset
    from .report import RunReport

    check_output_file(args.out)
    settings = {k: getattr(args, k) for k in SETTING_OPTIONS if getattr(args, k) is not None}
    if settings.get("shift") == "model":
        settings["shift"] = None
    files = resolve_files(args.model, args.base_pipeline, component_files(args))  # once: a hub id is fetched here
    if args.vram is not None:
        size = load_preset(args.preset, files.variant, args.overrides)
        picked = apply_vram(
            "generate",
            args.width or size.width,
            args.height or size.height,
            args.vram,
            args.ram,
            vae_tiling=args.vae_tiling,
            **model_fields(files),
            **{k: getattr(args, k) for k in MEMORY_OPTIONS},
        )
        for name, value in picked.items():
            setattr(args, name, value)
    for name, default in MEMORY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    report = RunReport()
    try:
        pipe = load_pipeline(
            files,
            quant=args.quant,
            adapters=args.adapter,
            preset=args.preset,
            preset_overrides=args.overrides,
            device=args.device,
            offload=args.offload,
            blocks_to_swap=args.blocks_to_swap,
            token_chunks=args.token_chunks,
            svd_device=args.svd_device,
            t5_quant=args.t5_quant,
            report=report,
            **settings,
        )
    except torch.cuda.OutOfMemoryError as e:
        raise UraeError(
            f"CUDA out of memory while loading the model (quant {args.quant}, offload "
            f"{args.offload or 'default'}); try --quant nf4 and --offload model"
        ) from e
    result = pipe(args.prompt, seed=args.seed, report=report)
    with report.stage("save png"):
        out = write_with_fallback(args.out, result.save, "image")
    print(f"wrote {out} ({result.settings.width}x{result.settings.height}, seed {args.seed})")
    print(report.format())
