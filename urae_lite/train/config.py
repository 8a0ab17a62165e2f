"""Training recipes: a YAML file of plain settings plus `_component_` sections, overridden by `key=value`.

Like torchtune: a recipe is readable config over reusable parts. Plain settings are checked against the
dataclasses below (an unknown or misspelled key is an error, not silently ignored); sections with a
`_component_` key name a callable by dotted path and pass the rest as keyword arguments, so the optimizer and
LR schedule can be swapped (Prodigy, bitsandbytes 8-bit AdamW, torch AdamW, ...) without code changes.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UraeError

REQUIRED = "???"


@dataclass
class DataConfig:
    dir: str = REQUIRED  # dataset folder: name.jpg|png|webp + name.json
    resolution: int = 2048  # buckets have an area of about resolution²
    cache: str | None = None  # default: <dir>/.urae_cache/<resolution>
    caption_mix: dict[str, float] = field(default_factory=lambda: {"prompt": 0.2, "generated_prompt": 0.8})


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
    checkpointing: str = "on"  # on: recompute blocks in backward | cpu: and keep their inputs in host memory | off


@dataclass
class CheckpointConfig:
    every: int = 250
    keep: int = 3


@dataclass
class ValidationConfig:
    every: int = 0  # 0 = off
    prompts: list[str] = field(default_factory=list)
    steps: int = 28
    guidance: float = 3.5
    shift: float = 3.0  # static time shift (docs/high-resolution.md)
    size: int | None = None  # default: data.resolution
    seed: int = 0


@dataclass
class TrainConfig:
    model: str = REQUIRED  # diffusers FLUX folder, hub id or `tiny`: VAE + text encoders (+ transformer)
    output_dir: str = REQUIRED
    transformer: str | None = None  # optional `urae-lite prepare` folder or single FLUX file to load the base from
    base_pipeline: str | None = None  # VAE + text encoders when `model` is a single transformer file
    vae: str | None = None  # single-file VAE / CLIP-L / T5 (ComfyUI's ae, clip_l, t5xxl) instead of the folder's;
    clip: str | None = None  # as given to `urae-lite cache` (the cache is made with them)
    t5: str | None = None
    quant: str = "nf4"
    output_format: str = "diffusers"  # diffusers | kohya: also write adapter_kohya.safetensors (ComfyUI / Forge)
    device: str | None = None  # cpu forces the CPU; default: accelerate's pick (this process's GPU when present)
    seed: int = 0
    log_every: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    hires: HiresConfig = field(default_factory=HiresConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: dict[str, Any] = field(default_factory=lambda: {
        "_component_": "prodigyopt.Prodigy", "lr": 1.0, "weight_decay": 1e-4, "decouple": True,
        "use_bias_correction": True, "safeguard_warmup": True})
    lr_scheduler: dict[str, Any] = field(default_factory=lambda: {
        "_component_": "urae_lite.train.optim.constant_with_warmup", "warmup_steps": 0})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def component_files(self):
        """The single-file VAE / CLIP / T5 of the recipe (urae_lite.component_files.ComponentFiles)."""
        from ..component_files import ComponentFiles

        return ComponentFiles(self.vae, self.clip, self.t5)


# ---- loading -------------------------------------------------------------------------------------------------
def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UraeError(f"override '{text}' is not key=value (e.g. training.steps=100)")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise UraeError(f"cannot set {'.'.join(path)}: {part} is a value, not a section")
        tree = node
    tree[path[-1]] = value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """YAML reads `1e-4` as a string and `16` as an int; fit values to the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, options[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UraeError(f"{key} must be true or false, got {value!r}")
    if annotation in (int, float):
        try:
            number = float(value) if isinstance(value, str) else value
            if annotation is int and (isinstance(number, bool) or float(number) != int(number)):
                raise ValueError
            return annotation(number)
        except (TypeError, ValueError):
            raise UraeError(f"{key} must be a number ({annotation.__name__}), got {value!r}") from None
    if annotation is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes as booleans
            return "on" if value else "off"
        if isinstance(value, (dict, list)) or value is None:
            raise UraeError(f"{key} must be a string, got {value!r}")
        return str(value)
    if origin is list:
        if value is None:
            return []
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, typing.get_args(annotation)[0], key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UraeError(f"{key} must be a mapping, got {value!r}")
        return {k: (_number(v) if typing.get_args(annotation)[1] is Any else
                    _coerce(v, typing.get_args(annotation)[1], f"{key}.{k}")) for k, v in value.items()}
    return value


def _number(value: Any) -> Any:
    """Component kwargs are untyped: turn numeric strings such as '1e-4' into floats, leave the rest."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise UraeError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UraeError(f"unknown setting '{prefix}{unknown[0]}' (known in this section: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if isinstance(value, str) and value == REQUIRED:
            kwargs[name] = REQUIRED
        elif dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _missing(obj: Any, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _missing(value, f"{prefix}{f.name}.")
        elif value == REQUIRED:
            out.append(f"{prefix}{f.name}")
    return out


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), require_paths: bool = True) -> TrainConfig:
    """Recipe file + `key=value` overrides (dotted keys, YAML values) -> a checked TrainConfig.

    `require_paths=False` (planning memory) accepts a recipe whose data, output and base adapter paths are unset."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UraeError(f"cannot read recipe {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise UraeError(f"recipe {path} is not valid YAML: {e}") from e
    for text in overrides:
        _set_path(tree, *_parse_override(text))
    cfg = _build(TrainConfig, tree)
    missing = _missing(cfg) if require_paths else []
    if missing:
        raise UraeError(f"the recipe needs {missing[0]}: pass {missing[0]}=... on the command line")
    check_config(cfg, require_paths)
    return cfg


def check_config(cfg: TrainConfig, require_paths: bool = True) -> None:
    """Reject values that would fail later, with the accepted choices."""
    from ..export import FORMATS as EXPORT_FORMATS
    from ..quant import QUANT_FORMATS
    from ..targets import TARGET_CHOICES

    choices = {
        "quant": (cfg.quant, QUANT_FORMATS),
        "output_format": (cfg.output_format, EXPORT_FORMATS),
        "adapter.kind": (cfg.adapter.kind, ("lora", "minor")),
        "adapter.targets": (cfg.adapter.targets, TARGET_CHOICES),
        "training.timesteps": (cfg.training.timesteps, ("uniform", "logit_normal")),
        "training.precision": (cfg.training.precision, ("bf16", "fp32")),
        "training.checkpointing": (cfg.training.checkpointing, ("on", "off", "cpu")),
        "device": (cfg.device, (None, "cpu", "cuda")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UraeError(f"{key}={value} is not one of {', '.join(str(a) for a in allowed if a)}")
    positive = {"training.steps": cfg.training.steps, "training.gradient_accumulation":
                cfg.training.gradient_accumulation, "adapter.rank": cfg.adapter.rank,
                "data.resolution": cfg.data.resolution, "checkpoint.keep": cfg.checkpoint.keep}
    for key, value in positive.items():
        if value < 1:
            raise UraeError(f"{key} must be at least 1, got {value}")
    if cfg.data.resolution % 16:
        raise UraeError(f"data.resolution must be a multiple of 16, got {cfg.data.resolution}")
    from .data import CAPTION_COLUMNS

    unknown = sorted(set(cfg.data.caption_mix) - set(CAPTION_COLUMNS))
    if unknown:
        raise UraeError(f"data.caption_mix has an unknown caption column '{unknown[0]}' (columns: "
                        f"{', '.join(CAPTION_COLUMNS)})")
    if any(w < 0 for w in cfg.data.caption_mix.values()) or sum(cfg.data.caption_mix.values()) <= 0:
        raise UraeError("data.caption_mix needs at least one caption column with a positive weight")
    if require_paths and cfg.adapter.kind == "minor" and not cfg.adapter.base_adapters:
        raise UraeError("adapter.kind=minor trains on base + a 2K adapter: set adapter.base_adapters=[PATH]")
    for section in ("optimizer", "lr_scheduler"):
        if "_component_" not in getattr(cfg, section):
            raise UraeError(f"{section} needs a _component_ (a dotted path such as prodigyopt.Prodigy)")


def instantiate(section: dict[str, Any], *args: Any) -> Any:
    """Call the `_component_` of a recipe section with `args` and the section's other keys."""
    path = section["_component_"]
    module_name, _, attr = str(path).rpartition(".")
    try:
        component = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        hint = " (pip install prodigyopt, or pip install urae-lite[train])" if "prodigy" in str(path) else ""
        raise UraeError(f"cannot import component {path}{hint}: {e}") from e
    kwargs = {k: v for k, v in section.items() if k != "_component_"}
    try:
        return component(*args, **kwargs)
    except TypeError as e:
        raise UraeError(f"{path} does not accept these settings {sorted(kwargs)}: {e}") from e
