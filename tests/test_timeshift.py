"""The static time shift: one formula for training's validation sampler and generation's scheduler (no models)."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from urae_lite.flux_configs import flux_scheduler_config
from urae_lite.timeshift import shifted_sigmas, static_shift, static_shift_scheduler


def test_shifted_sigmas_are_the_static_shift():
    sig = shifted_sigmas(4, 3.0)
    base = [1.0, 0.75, 0.5, 0.25]
    assert sig[-1] == 0.0 and len(sig) == 5
    assert sig[:-1] == pytest.approx([3 * s / (1 + 2 * s) for s in base])


def test_shift_keeps_the_ends_and_moves_steps_towards_high_noise():
    assert static_shift(1.0, 3.0) == 1.0 and static_shift(0.0, 3.0) == 0.0
    assert shifted_sigmas(5, 1.0) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])  # s = 1: plain linspace
    base, strong = shifted_sigmas(6, 1.0), shifted_sigmas(6, 10.0)
    assert all(s > b for s, b in zip(strong[1:-1], base[1:-1]))
    assert shifted_sigmas(1, 3.0) == [1.0, 0.0]  # one step: straight from pure noise to the image


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("steps,shift", [(28, 3.0), (4, 3.0), (3, 1.7), (50, 10.0)])
def test_generation_scheduler_gives_the_validation_schedule(variant, steps, shift):
    """What FluxPipeline does with the scheduler (linspace in, shifted σ out) matches `shifted_sigmas` up to the
    scheduler's float32 rounding, for either model's own scheduler config (dev's dynamic shifting is turned off)."""
    scheduler = static_shift_scheduler(FlowMatchEulerDiscreteScheduler(**flux_scheduler_config(variant)), shift)
    assert scheduler.config.use_dynamic_shifting is False and scheduler.config.shift == shift
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    np.testing.assert_allclose(scheduler.sigmas.double().numpy(), shifted_sigmas(steps, shift), rtol=0, atol=2e-7)


def test_scheduler_shift_none_keeps_the_model_scheduler_and_bad_shift_raises():
    own = FlowMatchEulerDiscreteScheduler(**flux_scheduler_config("dev"))
    assert static_shift_scheduler(own, None) is own
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="shift must be positive"):
            static_shift_scheduler(own, bad)
