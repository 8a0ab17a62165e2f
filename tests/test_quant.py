"""NF4 / FP8 / bf16 base weights: the owning libraries' layouts, decoded as the formats define them (float64
references in tests/references.py), quantizations of the given weight, exact serialization."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
from references import (
    E4M3_VALUES,
    NF4_LEVELS,
    NF4Tensors,
    adapted_linear_float64,
    assert_bounded,
    assert_decodes,
    assert_fp8_quantizes,
    assert_nf4_quantizes,
    decode_float64,
)

from urae_lite.errors import UraeError
from urae_lite.quant import FORMATS, QuantizedWeight, get_format


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)


@pytest.fixture
def library_path(monkeypatch):
    """QuantizedWeight.dequantize through the libraries' PyTorch code, whatever URAE_LITE_KERNELS says outside."""
    monkeypatch.setenv("URAE_LITE_KERNELS", "off")


# Widths that are multiples of the 64-value block and widths that are not: 32 and 96 put blocks across rows (what
# bitsandbytes 0.50's native CPU decode gets wrong on AVX-512 CPUs), 33, 100 and 31 also end on a partial block.
NF4_SHAPES = [(48, 200), (96, 64), (3, 128), (40, 32), (21, 96), (3, 33), (5, 100), (7, 31)]


@pytest.mark.parametrize("shape", NF4_SHAPES)
def test_nf4_has_bitsandbytes_layout_and_decodes_by_the_formula(shape, seed, library_path):
    """The stored tensors are bitsandbytes' `quantize_4bit` output (the layout contract), they are the NF4
    quantization of w (checked element by element against the definition), and the library path and the Triton
    kernel decode them to the float64 formula within the rounding of a correct fp32 decode."""
    from urae_lite import kernels

    w = _weight(*shape, seed=seed)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    qw = QuantizedWeight.quantize(w, "nf4")
    assert torch.equal(qw.weight, packed) and torch.equal(qw.absmax, state.absmax)
    assert torch.equal(qw.nested_absmax, state.state2.absmax) and torch.equal(qw.offset, state.offset)
    assert_nf4_quantizes(NF4Tensors.of(qw), w)
    got = qw.dequantize()
    assert got.dtype == torch.bfloat16 and got.shape == w.shape
    assert_decodes(got, qw)
    out = torch.full(shape, float("nan"), dtype=torch.bfloat16)  # poisoned: every element must be written
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
    assert_decodes(out, qw)


def test_chunked_nf4_is_bit_identical_to_bitsandbytes(seed):
    from urae_lite.quant import nf4_quantize

    w = _weight(96, 320, seed=seed)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    got = nf4_quantize(w, chunk_elems=64 * 7)  # 7 blocks per chunk: chunks end mid-row and mid-nested-block
    assert torch.equal(got["weight"], packed) and torch.equal(got["absmax"], state.absmax)
    assert torch.equal(got["nested_absmax"], state.state2.absmax) and torch.equal(got["offset"], state.offset)
    for shape in [(3, 33), (7, 31)]:  # one block per chunk, the last one partial
        w = _weight(*shape, seed=seed)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        got = nf4_quantize(w, chunk_elems=64)
        assert torch.equal(got["weight"], packed) and torch.equal(got["absmax"], state.absmax)


def test_e4m3_reference_decodes_every_code_as_torch_does():
    """The bit-field reference and PyTorch's float8_e4m3fn conversion agree on all 256 codes (NaN codes included)."""
    torch_values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    assert torch.equal(E4M3_VALUES.isnan(), torch_values.isnan())
    finite = ~torch_values.isnan()
    assert torch.equal(E4M3_VALUES[finite], torch_values[finite]) and E4M3_VALUES[finite].abs().max() == 448


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(40, 72), (33, 128), (5, 31)])
def test_fp8_has_quanto_layout_and_decodes_by_the_formula(shape, dtype, seed, library_path):
    """quanto's per-row e4m3 layout, the quantization of w element by element, and the library path's decode within
    one rounding of e4m3 x scale (float64)."""
    from optimum.quanto import qfloat8_e4m3fn, quantize_weight
    from optimum.quanto.calibrate import absmax_scale

    w = _weight(*shape, seed=seed).to(dtype)
    qt = quantize_weight(w, qtype=qfloat8_e4m3fn, axis=0, scale=absmax_scale(w, qfloat8_e4m3fn, axis=0))
    qw = QuantizedWeight.quantize(w, "fp8", dtype=dtype)
    assert qw.weight.dtype == torch.float8_e4m3fn and qw.scale.shape == (shape[0], 1) and qw.scale.dtype == dtype
    assert torch.equal(qw.weight.view(torch.uint8), qt._data.view(torch.uint8)) and torch.equal(qw.scale, qt._scale)
    assert_fp8_quantizes(qw.weight, qw.scale, w)
    got = qw.dequantize()
    assert got.dtype == dtype
    assert_decodes(got, qw)


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
        get_format("int3")
    assert all(get_format(name) is fmt and get_format(fmt) is fmt for name, fmt in FORMATS.items())
    tensors = QuantizedWeight.quantize(_weight(32, 64, seed=5), "fp8").to_state_tensors("m")
    del tensors["m.weight._scale"]
    with pytest.raises(UraeError, match="re-run `urae-lite prepare`"):
        QuantizedWeight.from_state_tensors("fp8", "m", tensors, (32, 64))


def test_fp8_never_takes_quantos_optimized_layout(monkeypatch, seed):
    """quanto's `WeightQBytesTensor.create` picks a Marlin layout on CUDA GPUs of compute capability >= 8 for every
    FLUX shape; we must never go through that selection, on any device, and must get plain e4m3 (N, K) bytes."""
    from optimum.quanto.tensor.weights import qbytes

    def optimized_create(*args, **kwargs):
        raise AssertionError("quanto's device-optimized layout selection was used")

    monkeypatch.setattr(qbytes.WeightQBytesTensor, "create", staticmethod(optimized_create))
    w = _weight(256, 128, seed=seed)  # in/out multiples of 64/128: Marlin-eligible on a GPU
    qw = QuantizedWeight.quantize(w, "fp8")
    assert qw.weight.dtype == torch.float8_e4m3fn and qw.weight.shape == (256, 128) and qw.weight.is_contiguous()
    assert qw.scale.shape == (256, 1) and qw.scale.dtype == torch.bfloat16
    assert_fp8_quantizes(qw.weight, qw.scale, w)


def test_kernels_switch(monkeypatch):
    from urae_lite.kernel_switch import kernels_enabled, kernels_mode

    cpu = torch.zeros(2)
    for value, mode in [("auto", "auto"), ("1", "auto"), ("0", "off"), ("off", "off"), ("ON", "on")]:
        monkeypatch.setenv("URAE_LITE_KERNELS", value)
        assert kernels_mode() == mode
    monkeypatch.setenv("URAE_LITE_KERNELS", "auto")
    assert not kernels_enabled(cpu, "nf4_dequantize")  # auto: CUDA tensors only
    monkeypatch.setenv("URAE_LITE_KERNELS", "on")
    assert kernels_enabled(cpu, "nf4_dequantize")
    monkeypatch.setenv("URAE_LITE_KERNELS", "sometimes")
    with pytest.raises(UraeError, match="URAE_LITE_KERNELS=sometimes is not one of auto, off, on"):
        kernels_mode()


@pytest.mark.parametrize("in_features", [64, 96])
def test_without_triton_the_library_path_runs_and_says_so_once(monkeypatch, caplog, seed, in_features):
    """No Triton (as on Windows) with the kernels forced on: the layer runs the libraries' path, says so once, and
    computes x Wᵀ + bias + s (x Aᵀ) Bᵀ with W the float64 decode of its NF4 buffers."""
    import sys

    from urae_lite import kernel_switch
    from urae_lite.adapted_linear import AdaptedLinear

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails, as on Windows
    monkeypatch.setenv("URAE_LITE_KERNELS", "on")  # would pick the kernels for any tensor
    kernel_switch.triton_available.cache_clear()
    try:
        g = torch.Generator().manual_seed(seed)
        layer = AdaptedLinear.from_linear(torch.nn.Linear(in_features, 32), "nf4", torch.float32)
        lora = layer.add_lora("style", 4, alpha=6.0, generator=g)
        lora.B.data = torch.randn(lora.B.shape, generator=g).to(lora.B.dtype)  # B = 0 would hide the branch
        x = torch.randn(3, in_features, generator=g)
        with caplog.at_level("WARNING", logger="urae_lite"):
            y1, y2 = layer(x), layer(x)
        assert not kernel_switch.kernels_enabled(x, "lowrank_forward")
        w64, w_err = decode_float64(layer.base)
        sB = lora.scale * lora.B.double()  # formed in the slice's dtype (bf16): one rounding
        expected = adapted_linear_float64(
            x, w64, w_err, layer.bias, lora.A, sB, B_err=2.0**-8 * sB.abs(), dtype=torch.float32
        )
        assert y1.dtype == torch.float32
        assert_bounded(y1, expected, "y")
        assert torch.equal(y1, y2)
        notes = [r for r in caplog.records if "Triton is not installed" in r.getMessage()]
        assert len(notes) == 1
    finally:
        kernel_switch.triton_available.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 32), (171, 96), (260, 64), (83, 200), (7, 31)])
def test_nf4_library_path_equals_float64_decode(shape, dtype, seed, library_path):
    """The CPU library path (what the tests and a GPU-less user run) decodes every width as the layout defines.

    Widths 32 and 96 put 64-value blocks across rows (bitsandbytes 0.50's native CPU kernel decodes those to garbage
    on AVX-512 CPUs); 64 and 200 are its safe widths. Rows are chosen so that the block count is not a multiple of the
    256-block nested groups. The bound is that of a correct fp32 decode rounded once to `dtype`
    (references.nf4_decode_bound)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    qw = QuantizedWeight.quantize(w, "nf4", dtype=dtype)
    assert qw.quant_map.tolist() == pytest.approx(NF4_LEVELS, abs=0)
    got = qw.dequantize()
    assert got.dtype == dtype and got.shape == shape
    assert_decodes(got, qw)
    assert_nf4_quantizes(NF4Tensors.of(qw), w.to(dtype))  # and the decode is a quantization of w
