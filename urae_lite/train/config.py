"""Training recipes: a YAML file of plain settings plus `_component_` sections, overridden by `key=value`.

Like torchtune: a recipe is readable config over reusable parts. Plain settings are checked against the
dataclasses below (an unknown or misspelled key is an error, not silently ignored); sections with a
`_component_` key name a callable by dotted path and pass the rest as keyword arguments, so the optimizer and
LR schedule can be swapped (Prodigy, bitsandbytes 8-bit AdamW, torch AdamW, ...) without code changes. The YAML,
override and `_component_` machinery is urae_lite/config.py's, shared with the generation presets.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import PROFILES_KEY, REQUIRED, apply_overrides, build, instantiate, missing, read_yaml
from ..errors import UraeError
from ..memory import MemorySettings
from ..presets import check_side

__all__ = ["REQUIRED", "TrainConfig", "check_config", "instantiate", "load_recipe"]


@dataclass
class DataConfig:
    dir: str = REQUIRED  # images + name.json|txt|caption captions, nested folders (docs/datasets.md)
    resolution: int = 2048  # buckets have an area of about resolution²
    cache: str | None = None  # default: <dir>/.urae_cache/<resolution>
    caption_mix: dict[str, float] = field(default_factory=lambda: {"prompt": 0.2, "generated_prompt": 0.8})
    # The keys below are applied by `urae-lite cache` (pass them to it too); the cache records them.
    folder_repeats: bool = True  # kohya's `N_name` folder: its images N times per epoch
    caption_prefix: str | None = None  # trigger word(s), the first comma-separated part of every caption
    default_caption: str | None = None  # caption of images without a caption file (unset: they are skipped)
    shuffle_caption_parts: bool = False  # comma-separated parts shuffled, the first keep_parts kept in place
    keep_parts: int = 0
    shuffle_variants: int = 4  # shuffled copies embedded per caption (each costs one T5 embedding on disk)
    min_side: int = 0  # skip images whose shorter side is below this (pixels); 0 = keep all


@dataclass
class AdapterConfig:
    kind: str = "lora"  # lora: fresh LoRA (B = 0) | minor: URAE minor components of base + base_adapters
    rank: int = 16
    alpha: float | None = 16.0  # lora only; scale = alpha / rank
    targets: str = "authors"  # authors (190 attention projections) | all (every block linear)
    base_adapters: list[str] = field(default_factory=list)  # frozen adapters under it (the 2K LoRA for 4K)


@dataclass
class HiresConfig:
    ntk: float = 1.0  # RoPE base theta = 10000 * ntk
    proportional_attention: bool = False  # SDPA scale sqrt(log N / log 4608) / sqrt(head_dim)


@dataclass
class TrainingConfig:
    steps: int = 2000
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    guidance: float = 1.0  # the guidance *input*: 1.0 = CFG disabled, as URAE requires
    timesteps: str = "uniform"  # uniform over {1/1000, ..., 1} (the authors') | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    precision: str = "bf16"  # bf16: bf16 weights + autocast | fp32: full precision (CPU tests; big and slow on GPUs)
    log_with: str | None = None  # tensorboard: also log to output_dir/tensorboard (extra urae-lite[tensorboard])


@dataclass
class CheckpointConfig:
    every: int = 250
    keep: int = 3


@dataclass
class ValidationConfig:
    every: int = 0  # steps; 0 = off
    every_minutes: float = 0  # also every this many minutes (0 = off); output_dir/SAMPLE_NOW: after the next step
    prompts: list[str] = field(default_factory=list)
    steps: int = 28
    guidance: float = 3.5
    shift: float = 3.0  # static time shift (docs/high-resolution.md)
    size: int | None = None  # default: data.resolution
    seed: int = 0

    @property
    def enabled(self) -> bool:
        """Validation runs at all (a schedule in steps or minutes, and prompts): the loop's and the planner's test."""
        return bool((self.every or self.every_minutes) and self.prompts)


@dataclass
class TrainConfig:
    model: str = REQUIRED  # diffusers FLUX folder, hub id or `tiny`: VAE + text encoders (+ transformer)
    output_dir: str = REQUIRED
    transformer: str | None = None  # optional `urae-lite prepare` folder or single FLUX file to load the base from
    base_pipeline: str | None = None  # VAE + text encoders when `model` is a single transformer file
    vae: str | None = None  # single-file VAE / CLIP-L / T5 (ComfyUI's ae, clip_l, t5xxl) instead of the folder's;
    clip: str | None = None  # as given to `urae-lite cache` (the cache is made with them)
    t5: str | None = None
    output_format: str = "diffusers"  # diffusers | kohya: also write adapter_kohya.safetensors (ComfyUI / Forge)
    device: str | None = None  # cpu forces the CPU; default: accelerate's pick (this process's GPU when present)
    seed: int = 0
    log_every: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    hires: HiresConfig = field(default_factory=HiresConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    memory: MemorySettings = field(default_factory=MemorySettings)  # quant, checkpointing, token chunks, block swap
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {
            "_component_": "prodigyopt.Prodigy",
            "lr": 1.0,
            "weight_decay": 1e-4,
            "decouple": True,
            "use_bias_correction": True,
            "safeguard_warmup": True,
        }
    )
    lr_scheduler: dict[str, Any] = field(
        default_factory=lambda: {"_component_": "urae_lite.train.optim.constant_with_warmup", "warmup_steps": 0}
    )
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def component_files(self):
        """The single-file VAE / CLIP / T5 of the recipe (urae_lite.component_files.ComponentFiles)."""
        from ..component_files import ComponentFiles

        return ComponentFiles(self.vae, self.clip, self.t5)

    def model_files(self):
        """Where this recipe's transformer, VAE and text encoders are (urae_lite.model_files.ModelFiles): resolved
        once per run (a hub id is fetched here) and passed to the cache, the model and validation."""
        from ..model_files import resolve_files

        return resolve_files(self.model, self.base_pipeline, self.component_files(), transformer=self.transformer)


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), require_paths: bool = True) -> TrainConfig:
    """Recipe file + `key=value` overrides (dotted keys, YAML values) -> a checked TrainConfig.

    `require_paths=False` (planning memory) accepts a recipe whose data, output and base adapter paths are unset."""
    tree = apply_overrides(read_yaml(path, "recipe"), overrides)
    tree.pop(PROFILES_KEY, None)
    cfg = build(TrainConfig, tree)
    unset = missing(cfg) if require_paths else []
    if unset:
        raise UraeError(f"the recipe needs {unset[0]}: pass {unset[0]}=... on the command line")
    check_config(cfg, require_paths)
    return cfg


def check_data(data: DataConfig) -> None:
    """The data.* keys that `urae-lite cache` reads too."""
    if data.keep_parts < 0 or data.min_side < 0:
        raise UraeError("data.keep_parts and data.min_side must be 0 or more")
    if data.shuffle_variants < 1:
        raise UraeError(f"data.shuffle_variants must be at least 1, got {data.shuffle_variants}")


def check_config(cfg: TrainConfig, require_paths: bool = True) -> None:
    """Reject values that would fail later, with the accepted choices. The memory settings check themselves
    (urae_lite.memory); their rules that need the model's block count run when `train` has resolved the model."""
    from ..export import FORMATS as EXPORT_FORMATS
    from ..targets import TARGET_CHOICES

    choices = {
        "output_format": (cfg.output_format, EXPORT_FORMATS),
        "adapter.kind": (cfg.adapter.kind, ("lora", "minor")),
        "adapter.targets": (cfg.adapter.targets, TARGET_CHOICES),
        "training.timesteps": (cfg.training.timesteps, ("uniform", "logit_normal")),
        "training.precision": (cfg.training.precision, ("bf16", "fp32")),
        "training.log_with": (cfg.training.log_with, (None, "tensorboard")),
        "device": (cfg.device, (None, "cpu", "cuda")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UraeError(f"{key}={value} is not one of {', '.join(str(a) for a in allowed if a)}")
    positive = {
        "training.steps": cfg.training.steps,
        "training.gradient_accumulation": cfg.training.gradient_accumulation,
        "adapter.rank": cfg.adapter.rank,
        "data.resolution": cfg.data.resolution,
        "checkpoint.keep": cfg.checkpoint.keep,
    }
    for key, value in positive.items():
        if value < 1:
            raise UraeError(f"{key} must be at least 1, got {value}")
    if cfg.validation.every < 0 or cfg.validation.every_minutes < 0:
        raise UraeError("validation.every and validation.every_minutes must be 0 (off) or positive")
    check_side("data.resolution", cfg.data.resolution)
    if cfg.validation.size is not None:  # here, not at the first validation after training ran
        check_side("validation.size", cfg.validation.size)
    from .captions import CAPTION_COLUMNS

    unknown = sorted(set(cfg.data.caption_mix) - set(CAPTION_COLUMNS))
    if unknown:
        raise UraeError(
            f"data.caption_mix has an unknown caption column '{unknown[0]}' (columns: {', '.join(CAPTION_COLUMNS)})"
        )
    if any(w < 0 for w in cfg.data.caption_mix.values()) or sum(cfg.data.caption_mix.values()) <= 0:
        raise UraeError("data.caption_mix needs at least one caption column with a positive weight")
    check_data(cfg.data)
    if require_paths and cfg.adapter.kind == "minor" and not cfg.adapter.base_adapters:
        raise UraeError("adapter.kind=minor trains on base + a 2K adapter: set adapter.base_adapters=[PATH]")
    for section in ("optimizer", "lr_scheduler"):
        if "_component_" not in getattr(cfg, section):
            raise UraeError(f"{section} needs a _component_ (a dotted path such as prodigyopt.Prodigy)")
