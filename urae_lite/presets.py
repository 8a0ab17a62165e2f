"""Generation settings and the YAML presets in `recipes/` that hold the authors' defaults (docs/high-resolution.md).

A preset is `2k` or `4k` (resolved per model family: `recipes/generate_{dev|schnell}_{2k|4k}.yaml`) or a path
to a YAML file with the same keys. Explicit settings override the preset; every value is checked here, so a bad
size or mode fails before any weights are read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .config import PROFILES_KEY, apply_overrides, build, profiles, read_yaml
from .errors import UraeError
from .memory import SECTION as MEMORY_SECTION
from .memory import MemorySettings

RECIPES = Path(str(resources.files("urae_lite.recipes")))  # recipes/ in a checkout, installed in a wheel
PRESETS = ("2k", "4k")
SIZE_MULTIPLE = 16  # 8x VAE downsampling, then 2x2 latent patches


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides an image besides prompt, seed, model and adapters (stored in the PNG)."""

    width: int = 2048
    height: int = 2048
    steps: int = 28
    guidance: float = 3.5  # FLUX.1-dev's distilled guidance input; ignored by schnell (no guidance embedder)
    shift: float | None = 3.0  # static time shift; None = the model's own scheduler (dynamic shifting for dev)
    ntk: float = 10.0  # RoPE base = 10000 * ntk
    proportional_attention: bool = True
    max_sequence_length: int = 512  # T5 tokens
    refine_from: int | None = None  # coarse-to-fine: first generate at about this many pixels a side
    strength: float = 0.6  # refine: how far the upscaled coarse image is re-noised (1 = pure noise)

    def __post_init__(self) -> None:
        check_size(self.width, self.height)
        if self.steps < 1:
            raise UraeError(f"steps must be at least 1, got {self.steps}")
        if self.shift is not None and self.shift <= 0:
            raise UraeError(f"shift must be positive, got {self.shift}")
        if self.ntk <= 0:
            raise UraeError(f"ntk must be positive, got {self.ntk}")
        if not 1 <= self.max_sequence_length <= 512:
            raise UraeError(f"max_sequence_length must be in 1..512, got {self.max_sequence_length}")
        if not 0 < self.strength <= 1:
            raise UraeError(f"strength must be in (0, 1], got {self.strength}")
        if self.refine_from is not None:
            if self.refine_from % SIZE_MULTIPLE or self.refine_from < SIZE_MULTIPLE:
                raise UraeError(
                    f"--refine-from {self.refine_from} is not a positive multiple of {SIZE_MULTIPLE}: "
                    f"use {_nearest(self.refine_from)}"
                )
            if self.refine_from**2 >= self.width * self.height:
                raise UraeError(
                    f"--refine-from {self.refine_from} is not smaller than the target "
                    f"{self.width}x{self.height}: refine from a lower resolution (e.g. 1024)"
                )

    def replace(self, **changes) -> GenerationSettings:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UraeError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _nearest(n: int) -> str:
    lo = max(n // SIZE_MULTIPLE * SIZE_MULTIPLE, SIZE_MULTIPLE)
    hi = lo + SIZE_MULTIPLE if lo < n else lo
    return str(lo) if lo == hi else f"{lo} or {hi}"


def check_size(width: int, height: int) -> None:
    """Both sides positive multiples of 16, or one UraeError naming the nearest valid sizes."""
    for name, value in (("width", width), ("height", height)):
        check_side(name, value)


def check_side(name: str, value: int) -> None:
    """One image side (a size, a training resolution) is a positive multiple of 16, or one UraeError naming the
    nearest valid values: the rule of every image size the package takes."""
    if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
        raise UraeError(f"{name} {value} is not a positive multiple of {SIZE_MULTIPLE}: use {_nearest(value)}")


def preset_path(preset: str | os.PathLike, variant: str) -> Path:
    """`2k`/`4k` -> the recipe for this model family; anything else must be a YAML file."""
    if str(preset).lower() in PRESETS:
        return RECIPES / f"generate_{variant}_{str(preset).lower()}.yaml"
    path = Path(preset).expanduser()
    if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
        return path
    raise UraeError(f"unknown preset '{preset}': use {' or '.join(PRESETS)}, or a YAML file of generation settings")


def load_preset(preset: str | os.PathLike, variant: str, overrides: Sequence[str] = ()) -> GenerationSettings:
    """Settings from a preset YAML (keys = GenerationSettings fields; `description`, `memory` and `profiles` are
    not image settings) with `key=value` overrides, read by the config system the training recipes use
    (urae_lite/config.py)."""
    tree = _preset_tree(preset, variant, overrides)
    for key in ("description", MEMORY_SECTION, PROFILES_KEY):
        tree.pop(key, None)
    return build(GenerationSettings, tree)


def preset_memory(preset: str | os.PathLike, variant: str, overrides: Sequence[str] = ()) -> MemorySettings:
    """The preset's `memory:` section (e.g. the 4K presets' `vae_tiling: on`) with `memory.*` overrides."""
    return build(
        MemorySettings, _preset_tree(preset, variant, overrides).get(MEMORY_SECTION) or {}, f"{MEMORY_SECTION}."
    )


def _preset_tree(preset: str | os.PathLike, variant: str, overrides: Sequence[str]) -> dict:
    return apply_overrides(read_yaml(preset_path(preset, variant), "preset"), overrides)


def preset_profiles(preset: str | os.PathLike, variant: str) -> dict[int, dict]:
    """The preset's memory profiles: card GiB -> memory settings (quant, offload, ...)."""
    path = preset_path(preset, variant)
    return profiles(read_yaml(path, "preset"), f"preset {path}")
