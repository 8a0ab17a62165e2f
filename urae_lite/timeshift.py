"""URAE's static time shift, in one place for both samplers (docs/high-resolution.md).

Dynamic (resolution-dependent) shifting off; the noise levels σ = linspace(1, 1/N, N) of an N-step schedule become
``σ' = s·σ / (1 + (s−1)·σ)``, then 0. Generation runs diffusers' FlowMatchEuler scheduler configured by
`static_shift_scheduler` (FluxPipeline hands it the linspace, the scheduler applies the shift); training's
validation images step a bare transformer through `shifted_sigmas`. tests/test_timeshift.py checks the two agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler


def static_shift(sigma: float, shift: float) -> float:
    """σ' = s·σ / (1 + (s−1)·σ): s > 1 spends more steps at high noise, s = 1 is the identity, 0 and 1 stay put."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def shifted_sigmas(steps: int, shift: float) -> list[float]:
    """The inference schedule: σ = linspace(1, 1/N, N) statically shifted, then a final 0."""
    base = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]
    return [static_shift(s, shift) for s in base] + [0.0]


def static_shift_scheduler(
    scheduler: FlowMatchEulerDiscreteScheduler, shift: float | None
) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler with dynamic shifting off and a static `shift`; None keeps the model's own scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if shift is None:
        return scheduler
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, use_dynamic_shifting=False, shift=shift)
