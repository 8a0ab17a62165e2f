"""The planner against the real code at FULL FLUX.1-dev size, without a GPU: fake tensors + live storage bytes.

One configuration (generate 1024², NF4 base, rank-16 adapter, `model` offload, one denoising step through the
kernels' custom ops) runs end to end under FakeTensorMode in well under a minute; benchmarks/memory.py --fake runs
the whole matrix (benchmarks/results/memory_fake.json). Band: the denoising step within ±5% of the planner's
allocated bytes (measured 0.985 when written). Text encoding and the VAE decode are reported, not held to the band:
the plain decode estimate carries a 25% headroom for convolution workspaces that fake tensors cannot see.
"""

from __future__ import annotations

import pytest
import torch

from urae_lite.plan import PlanConfig, estimate
from urae_lite.plan.fake import (
    GENERATE_PHASES,
    fake_mode,
    fake_pipeline,
    forget_fake_workspaces,
    measure_generate,
)

BAND = 0.05


@pytest.fixture
def kernels_on(monkeypatch):
    """The fused path a GPU runs: AdaptedLinear -> urae_lite.kernels -> torch.ops.urae_lite (fake impls)."""
    import urae_lite.kernels  # noqa: F401  (registers the custom ops)

    if not hasattr(torch.ops.urae_lite, "lowrank_forward"):
        pytest.skip("torch.ops.urae_lite custom ops are not registered")
    monkeypatch.setenv("URAE_LITE_KERNELS", "on")
    yield
    forget_fake_workspaces()


def test_generate_1024_nf4_full_size_matches_planner(kernels_on, capsys):
    with fake_mode():
        pipe = fake_pipeline("nf4", rank=16)
        phases = measure_generate(pipe, 1024, vae_tiling="off")
    est = estimate(PlanConfig(task="generate", width=1024, height=1024, quant="nf4", offload="model", rank=16,
                              vae_tiling="off"))
    planned = dict(zip(est.phases, est.allocated()))
    assert [p.name for p in phases] == list(GENERATE_PHASES)
    ratios = {}
    for p in phases:
        assert p.peak > 0
        assert p.name in planned, f"measured phase {p.name!r} has no planner phase ({', '.join(planned)})"
        ratios[p.name] = p.peak / planned[p.name]
    with capsys.disabled():
        print("\nfake full-size generate 1024² nf4, measured / planner: "
              + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    # the step's weights alone are 5.8 GiB: a real full-size run, not a tiny model
    assert phases[1].peak > 5 * 2**30
    assert abs(ratios["denoising"] - 1) <= BAND, ratios
