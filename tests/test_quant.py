"""NF4 / FP8 / bf16 base weights: bit-equal to the owning libraries, bounded error, exact serialization."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from urae_lite.errors import UraeError
from urae_lite.quant import QuantizedWeight, check_quant_format


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(48, 200), (96, 64), (3, 128)])
def test_nf4_matches_bitsandbytes(shape):
    w = _weight(*shape, seed=torch.seed() % 2**31)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    expected = bnbf.dequantize_4bit(packed, state)
    qw = QuantizedWeight.quantize(w, "nf4")
    assert torch.equal(qw.weight, packed)
    got = qw.dequantize()
    assert got.dtype == torch.bfloat16 and got.shape == w.shape
    assert torch.equal(got, expected)
    # The widest gap between NF4 levels is -1 .. -0.6962 (0.304), so rounding error ≤ 0.152 x block absmax,
    # plus ~1% from the double-quantized (8-bit) absmax and bf16 output rounding: bound 0.16.
    absmax = w.float().reshape(-1, 64).abs().amax(1, keepdim=True)
    err = (got.float() - w.float()).reshape(-1, 64).abs()
    assert (err <= 0.16 * absmax + 1e-6).all()


def test_chunked_nf4_is_bit_identical_to_bitsandbytes():
    from urae_lite.quant import nf4_quantize

    w = _weight(96, 320, seed=torch.seed() % 2**31)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    got = nf4_quantize(w, chunk_elems=64 * 7)  # 7 blocks per chunk: chunks end mid-row and mid-nested-block
    assert torch.equal(got[0], packed) and torch.equal(got[1], state.absmax)
    assert torch.equal(got[3], state.state2.absmax) and torch.equal(got[5], state.offset)


def test_fp8_matches_quanto():
    from optimum.quanto import qfloat8_e4m3fn, quantize_weight
    from optimum.quanto.calibrate import absmax_scale

    w = _weight(40, 72, seed=torch.seed() % 2**31)
    qt = quantize_weight(w, qtype=qfloat8_e4m3fn, axis=0, scale=absmax_scale(w, qfloat8_e4m3fn, axis=0))
    qw = QuantizedWeight.quantize(w, "fp8")
    assert qw.weight.dtype == torch.float8_e4m3fn and qw.scale.shape == (40, 1)
    assert torch.equal(qw.dequantize(), qt.dequantize())
    # e4m3 keeps 3 mantissa bits: relative rounding ≤ 2^-4 for normal values, plus bf16 output rounding.
    rel = (qw.dequantize().float() - w.float()).abs() / w.float().abs().clamp_min(1e-3)
    assert rel[w.float().abs() > 1e-2].max() <= 2**-4 + 2**-8


@pytest.mark.parametrize("fmt", ["nf4", "fp8", "bf16"])
def test_serialization_round_trip_is_bit_identical(fmt):
    w = _weight(64, 128, seed=3)
    qw = QuantizedWeight.quantize(w, fmt)
    tensors = qw.to_state_tensors("blocks.0.proj")
    assert all(k.startswith("blocks.0.proj.weight") for k in tensors)
    back = QuantizedWeight.from_state_tensors(fmt, "blocks.0.proj", tensors, (64, 128))
    assert torch.equal(back.dequantize(), qw.dequantize())
    for (name, a), (_, b) in zip(qw.named_buffers(), back.named_buffers()):
        same_bits = torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        assert a.dtype == b.dtype and same_bits, name


def test_nf4_keys_are_bitsandbytes_serialization():
    qw = QuantizedWeight.quantize(_weight(32, 64, seed=4), "nf4")
    tensors = qw.to_state_tensors("m")
    assert {
        "m.weight",
        "m.weight.absmax",
        "m.weight.quant_map",
        "m.weight.nested_absmax",
        "m.weight.nested_quant_map",
        "m.weight.quant_state.bitsandbytes__nf4",
    } == set(tensors)
    state = bnbf.QuantState.from_dict(
        {k[len("m.weight.") :]: v for k, v in tensors.items() if k != "m.weight"}, device=torch.device("cpu")
    )
    assert torch.equal(bnbf.dequantize_4bit(tensors["m.weight"], state), qw.dequantize())


def test_missing_tensor_and_unknown_format_are_user_errors():
    with pytest.raises(UraeError, match="unknown quantization 'int3'"):
        check_quant_format("int3")
    tensors = QuantizedWeight.quantize(_weight(32, 64, seed=5), "fp8").to_state_tensors("m")
    del tensors["m.weight._scale"]
    with pytest.raises(UraeError, match="re-run `urae-lite prepare`"):
        QuantizedWeight.from_state_tensors("fp8", "m", tensors, (32, 64))


@pytest.mark.parametrize("shape", [(3, 33), (5, 100), (7, 31)])
def test_nf4_odd_widths_match_bitsandbytes(shape):
    """in_features that are not a multiple of the 64-element block (tiny or derived models): blocks span rows and
    the last one is partial, exactly as bitsandbytes quantizes the flattened weight; the Triton dequant agrees."""
    from urae_lite import kernels
    from urae_lite.quant import nf4_quantize

    w = _weight(*shape, seed=torch.seed() % 2**31)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    qw = QuantizedWeight.quantize(w, "nf4")
    assert torch.equal(qw.weight, packed) and torch.equal(qw.absmax, state.absmax)
    chunked = nf4_quantize(w, chunk_elems=64)  # one block per chunk, the last one partial
    assert torch.equal(chunked[0], packed) and torch.equal(chunked[1], state.absmax)
    expected = bnbf.dequantize_4bit(packed, state)
    assert torch.equal(qw.dequantize(), expected)
    out = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    kernels.nf4_dequantize(
        qw.weight,
        qw.absmax,
        qw.nested_absmax,
        qw.nested_quant_map,
        qw.offset,
        qw.quant_map,
        qw.shape,
        out=out,
        dtype=torch.bfloat16,
    )
    assert torch.equal(out, expected)
    absmax = torch.nn.functional.pad(w.float().reshape(-1), (0, -w.numel() % 64)).reshape(-1, 64).abs().amax(1)
    err = (expected.float() - w.float()).reshape(-1)
    assert (err.abs() <= 0.16 * absmax.repeat_interleave(64)[: w.numel()] + 1e-6).all()


def test_fp8_never_takes_quantos_optimized_layout(monkeypatch):
    """quanto's `WeightQBytesTensor.create` picks a Marlin layout on CUDA GPUs of compute capability >= 8 for every
    FLUX shape; we must never go through that selection, on any device, and must get plain e4m3 (N, K) bytes."""
    from optimum.quanto.tensor.weights import qbytes

    def optimized_create(*args, **kwargs):
        raise AssertionError("quanto's device-optimized layout selection was used")

    monkeypatch.setattr(qbytes.WeightQBytesTensor, "create", staticmethod(optimized_create))
    w = _weight(256, 128, seed=torch.seed() % 2**31)  # in/out multiples of 64/128: Marlin-eligible on a GPU
    qw = QuantizedWeight.quantize(w, "fp8")
    assert qw.weight.dtype == torch.float8_e4m3fn and qw.weight.shape == (256, 128) and qw.weight.is_contiguous()
    assert qw.scale.shape == (256, 1) and qw.scale.dtype == torch.bfloat16
    rel = (qw.weight.float() * qw.scale.float() - w.float()).abs() / w.float().abs().clamp_min(1e-3)
    assert rel[w.float().abs() > 1e-2].max() <= 2**-4 + 2**-8


def test_kernels_switch(monkeypatch):
    from urae_lite.quant import kernels_enabled, kernels_mode

    cpu = torch.zeros(2)
    for value, mode in [("auto", "auto"), ("1", "auto"), ("0", "off"), ("off", "off"), ("ON", "on")]:
        monkeypatch.setenv("URAE_LITE_KERNELS", value)
        assert kernels_mode() == mode
    monkeypatch.setenv("URAE_LITE_KERNELS", "auto")
    assert not kernels_enabled(cpu)  # auto: CUDA tensors only
    monkeypatch.setenv("URAE_LITE_KERNELS", "on")
    assert kernels_enabled(cpu)
    monkeypatch.setenv("URAE_LITE_KERNELS", "sometimes")
    with pytest.raises(UraeError, match="URAE_LITE_KERNELS=sometimes is not one of auto, off, on"):
        kernels_mode()


def test_without_triton_the_library_path_runs_and_says_so_once(monkeypatch, caplog):
    import sys

    from urae_lite import quant
    from urae_lite.adapted_linear import AdaptedLinear

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails, as on Windows
    monkeypatch.setenv("URAE_LITE_KERNELS", "on")  # would pick the kernels for any tensor
    quant.triton_available.cache_clear()
    try:
        layer = AdaptedLinear.from_linear(torch.nn.Linear(64, 32), "nf4", torch.float32)
        layer.add_lora("style", 4)
        x = torch.randn(3, 64)
        with caplog.at_level("WARNING", logger="urae_lite"):
            y1, y2 = layer(x), layer(x)
        assert not quant.kernels_enabled(x)
        torch.testing.assert_close(y1, layer.forward_reference(x, layer.bias, layer.branch()))
        assert torch.equal(y1, y2)
        notes = [r for r in caplog.records if "Triton is not installed" in r.getMessage()]
        assert len(notes) == 1
    finally:
        quant.triton_available.cache_clear()


# The 16 NF4 levels as published with QLoRA (Dettmers et al., 2023, appendix E): the normal-distribution quantiles
# normalized to [-1, 1], with an exact zero. Written out here so the reference owes nothing to bitsandbytes.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_decode_float64(qw: QuantizedWeight) -> torch.Tensor:
    """The NF4 layout decoded in float64 from its definition: byte j holds codes 2j (high nibble) and 2j+1, block
    b = i // 64 of the row-major flattened weight has absmax nested_map[absmax_u8[b]] * nested_absmax[b // 256]
    + offset, and w_i = NF4_LEVELS[code_i] * absmax_b."""
    n = qw.out_features * qw.in_features
    byte = qw.weight.reshape(-1).view(torch.uint8).long()
    codes = torch.stack([byte >> 4, byte & 15], dim=1).reshape(-1)[:n]
    block = torch.arange(n) // 64
    nested = (
        qw.nested_quant_map.double()[qw.absmax.long()]
        * qw.nested_absmax.double()[torch.arange(qw.absmax.numel()) // 256]
    )
    absmax = nested + qw.offset.double()
    return (torch.tensor(NF4_LEVELS, dtype=torch.float64)[codes] * absmax[block]).reshape(qw.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 32), (171, 96), (260, 64), (83, 200), (7, 31)])
def test_nf4_library_path_equals_float64_decode(shape, dtype, monkeypatch):
    """The CPU library path (what the tests and a GPU-less user run) decodes every width as the layout defines.

    Widths 32 and 96 put 64-value blocks across rows (bitsandbytes 0.50's native CPU kernel decodes those to garbage
    on AVX-512 CPUs); 64 and 200 are its safe widths. Rows are chosen so that the block count is not a multiple of the
    256-block nested groups. The library works in fp32 (two products and one add, each rounded once: ≤ 3 ulp of
    fp32 from the float64 value) and rounds once to `dtype` (≤ half an ulp of it)."""
    monkeypatch.setenv("URAE_LITE_KERNELS", "off")
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * 0.05
    qw = QuantizedWeight.quantize(w, "nf4", dtype=dtype)
    assert qw.quant_map.tolist() == pytest.approx(NF4_LEVELS, abs=0)
    expected = nf4_decode_float64(qw)
    got = qw.dequantize()
    assert got.dtype == dtype and got.shape == shape
    ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-7
    bound = (3 * 2.0**-23 + ulp / 2) * expected.abs() + 1e-30
    assert ((got.double() - expected).abs() <= bound).all(), (got.double() - expected).abs().max()
    # and the decode is a quantization of w: each value within half the widest level gap of its block's absmax
    err = (expected.float() - w).reshape(-1)
    absmax = torch.nn.functional.pad(w.reshape(-1), (0, -w.numel() % 64)).reshape(-1, 64).abs().amax(1)
    assert (err.abs() <= 0.16 * absmax.repeat_interleave(64)[: w.numel()]).all()
