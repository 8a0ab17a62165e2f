"""T5-XXL in NF4: the text encoder's linears load as bitsandbytes 4-bit, generation runs, the planner accounts it."""

from __future__ import annotations

import pytest
import torch
from plan_utils import plan_config
from references import NF4Tensors, adapted_linear_float64, assert_bounded, assert_nf4_quantizes, nf4_decode_bound

from urae_lite.errors import UraeError
from urae_lite.pipeline import load_pipeline
from urae_lite.plan import estimate


def test_t5_nf4_pipeline_generates(tiny_flux):
    import bitsandbytes as bnb

    pipe = load_pipeline(
        tiny_flux,
        memory={"quant": "nf4", "t5_quant": "nf4"},
        device="cpu",
        progress=False,
        width=64,
        height=64,
        steps=1,
    )
    t5 = pipe.flux.text_encoder_2
    kinds = {n.rsplit(".", 1)[-1]: type(m) for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}
    # every projection is 4-bit except the FF output `wo`, which transformers keeps unquantized for T5
    assert kinds.pop("wo") is torch.nn.Linear
    assert kinds and all(k is bnb.nn.Linear4bit for k in kinds.values()), kinds
    result = pipe("a red fox", seed=0)
    assert result.image.size == (64, 64)


def test_planner_counts_t5_nf4_at_full_size():
    bf16 = estimate(plan_config(task="generate", width=2048, height=2048))
    nf4 = estimate(plan_config(task="generate", width=2048, height=2048, t5_quant="nf4"))
    assert bf16.peak_phase == "text encoding" and bf16.peak > nf4.peak
    # T5-XXL: 3.6B parameters in q/k/v/o/wi_0/wi_1 go from 2 bytes to ~0.52 (wo stays bf16): saves ~5 GiB
    phase = bf16.phases.index("text encoding")
    assert 4.5 * 2**30 < bf16.allocated()[phase] - nf4.allocated()[phase] < 5.5 * 2**30
    assert nf4.peak < 10 * 2**30  # the README's 2K goal, by the planner's estimate


def test_unknown_t5_quant_is_rejected(tiny_flux):
    with pytest.raises(UraeError, match="unknown t5_quant 'int4': use one of bf16, nf4"):
        load_pipeline(tiny_flux, memory={"t5_quant": "int4"}, device="cpu", progress=False)


def test_t5_nf4_keeps_layers_too_narrow_for_nf4_in_bf16(tmp_path, caplog, seed):
    """A derived T5 whose attention output (in_features 32) is narrower than one 64-element NF4 block: that layer
    stays bf16 with one logged reason, the rest is 4-bit, and the 4-bit encoder is the unquantized one with each
    4-bit linear's weight replaced by its NF4 quantization, checked layer by layer against float64 formulas
    (tests/references.py), so no encoder-level tolerance is needed."""
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
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(tmp_path / "text_encoder_2")
    reference = T5EncoderModel.from_pretrained(tmp_path / "text_encoder_2", dtype=torch.bfloat16).eval()
    with caplog.at_level("WARNING", logger="urae_lite"):
        model = load_t5_nf4(tmp_path, torch.bfloat16).eval()
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # attention output: in_features = num_heads * d_kv = 32; FF output: in_features = d_ff = 96
    narrow = {n for n in kinds if n.endswith((".o", ".wo"))}
    assert all(kinds[n] is torch.nn.Linear for n in narrow)
    four_bit = {n for n in kinds if n.endswith((".q", ".k", ".v", ".wi_0", ".wi_1"))}
    assert four_bit and all(kinds[n] is bnb.nn.Linear4bit for n in four_bit) and four_bit | narrow == set(kinds)
    reasons = [r.getMessage() for r in caplog.records if "NF4 block" in r.getMessage()]
    assert len(reasons) == 1 and f"{len(narrow)} linear layers stay in bfloat16" in reasons[0]

    # Everything but the 4-bit weights is the unquantized encoder's, bit for bit.
    params = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if name.removesuffix(".weight") not in four_bit:
            assert p.dtype == params[name].dtype and torch.equal(p, params[name]), name
    # Each 4-bit weight is the NF4 quantization of the unquantized one (element by element).
    decoded = {}
    for name in four_bit:
        weight = model.get_submodule(name).weight
        tensors = NF4Tensors.of_bnb(weight.data, weight.quant_state)
        assert_nf4_quantizes(tensors, reference.get_submodule(name).weight.data)
        w64, mag = tensors.decode_float64()
        decoded[name] = w64, nf4_decode_bound(mag, w64, torch.bfloat16)
    # Each 4-bit linear computes x Wᵀ with W that float64 decode: bitsandbytes dequantizes (fp32, then bf16: the
    # decode bound) and multiplies in bf16 (fp32 accumulation over K, one rounding of the output; references).
    seen = {}

    def record(module, args, y):
        seen[names[module]] = args[0], y

    names = {model.get_submodule(n): n for n in four_bit}
    hooks = [module.register_forward_hook(record) for module in names]
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got = model(ids).last_hidden_state
    for h in hooks:
        h.remove()
    assert got.shape == (2, 9, 64) and torch.isfinite(got).all() and seen.keys() == four_bit
    for name, (x, y) in seen.items():
        w64, w_err = decoded[name]
        assert y.dtype == torch.bfloat16
        assert_bounded(y, adapted_linear_float64(x.reshape(-1, x.shape[-1]), w64, w_err, dtype=torch.bfloat16), name)
