"""T5-XXL in NF4: the text encoder's linears load as bitsandbytes 4-bit, generation runs, the planner accounts it."""

from __future__ import annotations

import pytest
import torch

from urae_lite.errors import UraeError
from urae_lite.pipeline import load_pipeline
from urae_lite.plan import PlanConfig, estimate


def test_t5_nf4_pipeline_generates(tiny_flux):
    import bitsandbytes as bnb

    pipe = load_pipeline(tiny_flux, quant="nf4", t5_quant="nf4", device="cpu", progress=False,
                         width=64, height=64, steps=1)
    t5 = pipe.flux.text_encoder_2
    kinds = {n.rsplit(".", 1)[-1]: type(m) for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}
    # every projection is 4-bit except the FF output `wo`, which transformers keeps unquantized for T5
    assert kinds.pop("wo") is torch.nn.Linear
    assert kinds and all(k is bnb.nn.Linear4bit for k in kinds.values()), kinds
    result = pipe("a red fox", seed=0)
    assert result.image.size == (64, 64)


def test_planner_counts_t5_nf4_at_full_size():
    bf16 = estimate(PlanConfig(task="generate", width=2048, height=2048))
    nf4 = estimate(PlanConfig(task="generate", width=2048, height=2048, t5_quant="nf4"))
    assert bf16.peak_phase == "text encoding" and bf16.peak > nf4.peak
    # T5-XXL: 3.6B parameters in q/k/v/o/wi_0/wi_1 go from 2 bytes to ~0.52 (wo stays bf16): saves ~5 GiB
    phase = bf16.phases.index("text encoding")
    assert 4.5 * 2**30 < bf16.allocated()[phase] - nf4.allocated()[phase] < 5.5 * 2**30
    assert nf4.peak < 10 * 2**30  # SPEC §7 2K goal, by the planner's estimate


def test_unknown_t5_quant_is_rejected(tiny_flux):
    with pytest.raises(UraeError, match="unknown T5 quantization 'int4'"):
        load_pipeline(tiny_flux, t5_quant="int4", device="cpu", progress=False)
