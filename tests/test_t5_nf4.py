"""T5-XXL in NF4: the text encoder's linears load as bitsandbytes 4-bit, generation runs, the planner accounts it."""

from __future__ import annotations

import pytest
import torch

from urae_lite.errors import UraeError
from urae_lite.pipeline import load_pipeline
from urae_lite.plan import PlanConfig, estimate


def test_t5_nf4_pipeline_generates(tiny_flux):
    import bitsandbytes as bnb

    pipe = load_pipeline(
        tiny_flux, quant="nf4", t5_quant="nf4", device="cpu", progress=False, width=64, height=64, steps=1
    )
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
    assert nf4.peak < 10 * 2**30  # the README's 2K goal, by the planner's estimate


def test_unknown_t5_quant_is_rejected(tiny_flux):
    with pytest.raises(UraeError, match="unknown T5 quantization 'int4'"):
        load_pipeline(tiny_flux, t5_quant="int4", device="cpu", progress=False)


def test_t5_nf4_keeps_layers_too_narrow_for_nf4_in_bf16(tmp_path, caplog):
    """A derived T5 whose attention output (in_features 32) is narrower than one 64-element NF4 block: that layer
    stays bf16 with one logged reason, the rest is 4-bit, and the encoder still matches the unquantized one."""
    import bitsandbytes as bnb
    from transformers import T5Config, T5EncoderModel

    from urae_lite.text_encoders import load_t5_nf4

    config = T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=8,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(torch.seed() % 2**31)
    T5EncoderModel(config).save_pretrained(tmp_path / "text_encoder_2")
    reference = T5EncoderModel.from_pretrained(tmp_path / "text_encoder_2", dtype=torch.bfloat16).eval()
    with caplog.at_level("WARNING", logger="urae_lite"):
        model = load_t5_nf4(tmp_path, torch.bfloat16).eval()
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # attention output: in_features = num_heads * d_kv = 32; FF output: in_features = d_ff = 96
    narrow = {n for n in kinds if n.endswith((".o", ".wo"))}
    assert all(kinds[n] is torch.nn.Linear for n in narrow)
    assert all(kinds[n] is bnb.nn.Linear4bit for n in kinds if n.endswith((".q", ".k", ".v", ".wi_0", ".wi_1")))
    reasons = [r.getMessage() for r in caplog.records if "NF4 block" in r.getMessage()]
    assert len(reasons) == 1 and f"{len(narrow)} linear layers stay in bfloat16" in reasons[0]
    # the same encoder with each NF4 layer's weight dequantized: what the 4-bit model must compute
    dequantized = T5EncoderModel.from_pretrained(tmp_path / "text_encoder_2", dtype=torch.bfloat16).eval()
    for name, layer in dequantized.named_modules():
        if kinds.get(name) is bnb.nn.Linear4bit:
            quantized = model.get_submodule(name).weight
            weight = bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state)
            layer.weight.data = weight.to(torch.bfloat16).reshape(layer.weight.shape)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        got, want, exact = (m(ids).last_hidden_state.float() for m in (model, reference, dequantized))
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert (got - exact).norm() / exact.norm() < 1e-2  # measured 0 over 25 seeds (bnb's CPU path dequantizes too)
    # against the unquantized encoder: 4-bit weights in 6 of 8 kinds of layer (measured 0.12-0.15 over 25 seeds)
    assert (got - want).norm() / want.norm() < 0.3
