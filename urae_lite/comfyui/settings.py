"""The URAE high-resolution node's numbers, read from the CLI's own owners (presets, hires, timeshift).

ComfyUI speaks in other units than diffusers, so this module only translates: the RoPE base θ, the attention
multiplier on q (ComfyUI's attention applies the plain 1/√d itself), and the static shift as ModelSamplingFlux's
`shift` parameter, which is μ = ln(s) because ComfyUI computes σ' = e^μ / (e^μ + 1/t − 1) = s·t / (1 + (s−1)·t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UraeError
from ..flux_configs import VARIANTS
from ..hires import BASE_THETA, attention_scale
from ..presets import PRESETS, GenerationSettings, load_preset

#: The node's preset choices: "<variant> <preset>" for every recipe, plus "custom" (explicit values only)
PRESET_CHOICES: tuple[str, ...] = (*(f"{v} {p}" for v in VARIANTS for p in PRESETS), "custom")
CUSTOM = "custom"
# Entries of the node's σ table. ComfyUI's 'simple' scheduler picks entry int(i·T/N) of a table of σ(k/T), which is
# exactly t = 1 − i/N (diffusers' FlowMatchEuler linspace) only when N divides T; with ComfyUI's 10000 a 28-step
# schedule is off by up to 1e-4 in t. 277200 = 2^4·3^2·5^2·7·11 is divisible by every step count 1–12 and 14, 15,
# 16, 18, 20, 21, 22, 24, 25, 28, 30, 33, 35, 36, 40, 42, 44, 45, 48, 50, ...; other counts stay within 1/T in t.
SIGMA_TABLE = 277200


@dataclass(frozen=True)
class HiresSettings:
    """What the URAE high-resolution node patches: None / False switches a setting off (ComfyUI's own behaviour)."""

    ntk: float | None = 10.0
    proportional_attention: bool = True
    shift: float | None = 3.0

    @property
    def theta(self) -> float | None:
        return None if self.ntk is None else rope_theta(self.ntk)


def parse_choice(choice: str) -> tuple[str, str]:
    """'dev 4k' -> ('dev', '4k'); anything else is one clear error listing the choices."""
    parts = choice.split()
    if choice not in PRESET_CHOICES or len(parts) != 2:
        raise UraeError(f"unknown URAE preset '{choice}': use one of {', '.join(PRESET_CHOICES)}")
    return parts[0], parts[1]


def preset_generation(choice: str) -> GenerationSettings:
    """The full settings `urae-lite generate --preset` uses for this choice (recipes/generate_*.yaml)."""
    variant, preset = parse_choice(choice)
    return load_preset(preset, variant)


def hires_settings(
    choice: str,
    ntk: float = 0.0,
    shift: float = 0.0,
    rope: bool = True,
    proportional_attention: bool = True,
    static_shift: bool = True,
) -> HiresSettings:
    """The node's inputs -> what it patches. `ntk` / `shift` of 0 mean "the preset's value"; with "custom" they
    must be given. The switches turn a setting off whatever the preset says."""
    if choice == CUSTOM:
        if (rope and ntk <= 0) or (static_shift and shift <= 0):
            raise UraeError("preset 'custom' needs explicit ntk and shift values (> 0), or switch those settings off")
        base = HiresSettings(ntk=ntk, proportional_attention=True, shift=shift)
    else:
        g = preset_generation(choice)
        base = HiresSettings(ntk=ntk or g.ntk, proportional_attention=g.proportional_attention, shift=shift or g.shift)
    for name, value in (("ntk", base.ntk), ("shift", base.shift)):
        if value is not None and value <= 0:
            raise UraeError(f"{name} must be positive, got {value}")
    return HiresSettings(
        ntk=base.ntk if rope else None,
        proportional_attention=base.proportional_attention and proportional_attention,
        shift=base.shift if static_shift else None,
    )


def rope_theta(ntk: float) -> float:
    """RoPE base θ = 10000 · ntk, as urae_lite.hires.set_ntk sets on diffusers' FluxPosEmbed."""
    if ntk <= 0:
        raise UraeError(f"ntk must be positive, got {ntk}")
    return BASE_THETA * ntk


def attention_multiplier(n_tokens: int) -> float:
    """sqrt(log N / log 4608): URAE's softmax scale over the plain 1/√d, applied to q (hires.attention_scale
    with head_dim 1)."""
    return attention_scale(n_tokens, 1)


def flux_sampling_mu(shift: float) -> float:
    """ModelSamplingFlux's `shift` parameter (μ) for URAE's static shift s: μ = ln(s)."""
    if shift <= 0:
        raise UraeError(f"shift must be positive, got {shift}")
    return math.log(shift)
