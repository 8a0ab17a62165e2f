"""`urae-lite cache` and `urae-lite train`, registered into the main CLI through FEATURE_MODULES.

A command module beside the `train` package, not in it: `--vram` asks the planner, and the planner reads recipes
(urae_lite.train.config), so the training library itself never imports the planner."""

from __future__ import annotations

import argparse

from .component_files import add_component_options
from .vae_memory import VAE_TILING_MODES
from .vram_options import add_vram_options


def _cache_data(args: argparse.Namespace):
    """The data.* settings of `cache`: the recipe's (--recipe), the key=value overrides on top, DATA as data.dir."""
    from .config import apply_overrides, build, read_yaml
    from .errors import UraeError
    from .train.config import DataConfig, check_data

    other = [o for o in args.overrides if not o.split("=", 1)[0].strip().startswith("data.")]
    if other:
        raise UraeError(f"`urae-lite cache` takes data.* keys only, not {other[0]}")
    tree = dict((read_yaml(args.recipe, "recipe").get("data") or {}) if args.recipe else {})
    tree = apply_overrides({"data": tree}, args.overrides)["data"]
    data = build(DataConfig, {**tree, "dir": args.data}, "data.")
    check_data(data)
    if args.resolution is None:
        if not (args.recipe or any(o.startswith("data.resolution=") for o in args.overrides)):
            raise UraeError("cache needs --resolution (or a --recipe whose data.resolution to use)")
        args.resolution = data.resolution
    return data


def _check_dims(args: argparse.Namespace):
    """The cache's shapes for `--check`, from the model's configs when they are on this machine (nothing is
    fetched or loaded), else FLUX.1's."""
    from pathlib import Path

    from .model_files import TINY, resolve_model
    from .train.cache_layout import CacheDims

    if args.model and (args.model in TINY or (Path(args.model) / "vae" / "config.json").is_file()):
        return CacheDims.of_model(resolve_model(args.model), args.max_sequence_length)
    return CacheDims(max_sequence_length=args.max_sequence_length)


def _cmd_cache(args: argparse.Namespace) -> None:
    from .component_files import component_files
    from .errors import UraeError
    from .presets import check_side
    from .report import RunReport
    from .train.cache import build_cache

    data = _cache_data(args)
    check_side("--resolution", args.resolution)  # once, for --check and the cache alike
    if args.check:
        from .train.data import SkipLog
        from .train.dataset_report import survey

        dataset = survey(args.data, args.resolution, data, _check_dims(args), args.skip_small, SkipLog(quiet=True))
        if not dataset.samples:
            raise UraeError(f"empty dataset: every image in {args.data} is skipped ({dataset.skips.summary()})")
        print("\n".join(dataset.lines()))
        return
    if not args.model:
        raise UraeError("cache needs --model (only --check works without one)")
    report = RunReport()
    with report.stage("cache"):
        folder, skips = build_cache(
            args.data,
            args.model,
            args.resolution,
            data=data,
            out=args.out if args.out is not None else data.cache,
            device=args.device,
            max_sequence_length=args.max_sequence_length,
            skip_small=args.skip_small,
            vae_tiling=args.vae_tiling,
            overwrite=args.overwrite,
            base_pipeline=args.base_pipeline,
            files=component_files(args),
        )
    print(f"cache ready: {folder}; {skips.summary()}")
    print(report.format())


def _cmd_train(args: argparse.Namespace) -> None:
    import torch

    from .memory import overridden
    from .recovery import step_down
    from .train.config import load_recipe
    from .train.loop import train
    from .vram_options import auto_vram

    overrides = [*args.overrides, f"output_format={args.format}"] if args.format else args.overrides
    cfg = load_recipe(args.recipe, overrides)
    user_set = overridden(args.overrides)
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    vram = auto_vram(args.vram, user_set, "cuda" if cuda else "cpu")
    files, replan = None, step_down  # files: resolved by `train` after its output check, or here for the planner
    plan_peak = None
    if vram is not None or cuda:
        from .destinations import check_output_dir
        from .plan.choose import apply_vram, model_fields, replanner
        from .plan.recipe import recipe_job

        check_output_dir(cfg.output_dir, "output_dir")  # before the planner resolves (maybe fetches) the model
        files = cfg.model_files()
        job = recipe_job(cfg, **model_fields(files))
        if vram is not None:  # the planner's memory settings, then the user's overrides (which it kept) on top
            picked = vram_overrides(apply_vram(job, user_set, vram, args.ram))
            cfg = load_recipe(args.recipe, [*picked, *overrides])
            job = recipe_job(cfg, **model_fields(files))
        replan = replanner(job, user_set, args.ram)
        plan_peak = _plan_peak_gib(job)
    train(cfg, resume=args.resume, files=files, replan=replan, plan_peak_gib=plan_peak, command=_command(args))


def _plan_peak_gib(job) -> float | None:
    """The planner's peak allocated by torch for the run (the progress bar shows it beside the measured
    `torch.cuda.max_memory_allocated`), or None."""
    from .errors import UraeError
    from .plan.estimate import estimate

    try:
        return estimate(job).peak_allocated / 2**30
    except UraeError:
        return None


def _command(args: argparse.Namespace) -> str:
    """This `urae-lite train` command line as typed (without --resume): what a stopped run prints to continue."""
    import shlex

    words = ["urae-lite", "train", args.recipe, *args.overrides]
    for option, value in (("--vram", args.vram), ("--ram", args.ram), ("--format", args.format)):
        if value is not None:
            words += [option, str(value)]
    return shlex.join(words)


def vram_overrides(picked) -> list[str]:
    """`memory.*` recipe overrides for the settings `--vram` searches, as the planner picked them."""
    from .memory import recipe_overrides, searched

    return recipe_overrides({name: getattr(picked, name) for name in searched("train")})


def register(subparsers) -> None:
    p = subparsers.add_parser("cache", help="cache T5/CLIP embeddings and VAE posteriors of a training dataset")
    p.add_argument(
        "data",
        help="dataset folder: images + name.txt|caption|json captions, nested, N_name folders (docs/datasets.md)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="data.key=value",
        help="data.* recipe keys: caption_prefix, default_caption, shuffle_caption_parts, keep_parts, "
        "shuffle_variants, folder_repeats, min_side (give train the same)",
    )
    p.add_argument("--recipe", help="read the data.* keys (and data.resolution) from this training recipe")
    p.add_argument(
        "--check",
        action="store_true",
        help="print what would be cached (captions, skips, buckets, upscaling, size on disk) without loading a model",
    )
    p.add_argument(
        "--model",
        help="diffusers FLUX folder, hub id, single FLUX transformer .safetensors (with --base-pipeline), or 'tiny'",
    )
    p.add_argument(
        "--base-pipeline",
        help="with a single file as --model: the diffusers FLUX folder or hub id "
        "whose VAE and text encoders to use (default: the matching FLUX.1 from the Hugging Face cache)",
    )
    add_component_options(p)
    p.add_argument("--resolution", type=int, help="target side: buckets have about this area² (or the --recipe's)")
    p.add_argument("--out", default=None, help="cache folder (default DATA/.urae_cache/RESOLUTION)")
    p.add_argument("--device", default=None, help="where the encoders run (default cuda when available)")
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens (dev 512, schnell 256)")
    p.add_argument(
        "--skip-small",
        action="store_true",
        help="skip images smaller than their bucket instead of upscaling them with a warning",
    )
    p.add_argument(
        "--vae-tiling",
        choices=VAE_TILING_MODES,
        default="auto",
        help="diffusers' blended VAE tiling for the encode (auto: above 2048)",
    )
    p.add_argument("--overwrite", action="store_true", help="rebuild a cache made for another model/resolution")
    p.set_defaults(func=_cmd_cache)

    p = subparsers.add_parser("train", help="train a URAE adapter from a recipe (recipes/train_2k_lora.yaml, ...)")
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. training.steps=500")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in output_dir (or the given checkpoint folder)",
    )
    add_vram_options(p, "train")
    p.add_argument(
        "--format",
        choices=("diffusers", "kohya"),
        help="kohya: also write adapter_kohya.safetensors "
        "(ComfyUI / Forge keys) beside the diffusers-format adapter (recipe key output_format)",
    )
    p.set_defaults(func=_cmd_train)
