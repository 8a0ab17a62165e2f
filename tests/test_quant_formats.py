"""What every storage format in the registry owes the rest of urae_lite, checked for each one found there: a new
format is picked up here without editing this file (its accuracy against a float64 formula is its own test)."""

from __future__ import annotations

import math

import pytest
import torch

from urae_lite.errors import UraeError
from urae_lite.flux_configs import flux_dev_config
from urae_lite.measure.fake_models import fake_quantized_weight
from urae_lite.plan.arch import flux_arch
from urae_lite.quant import FORMATS, QuantFormat, QuantizedWeight, get_format

SHAPES = [(48, 64), (40, 96), (7, 31)]  # block-aligned rows, rows that split blocks, odd everything


def _weight(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.fixture(params=list(FORMATS), ids=list(FORMATS))
def fmt(request) -> QuantFormat:
    return FORMATS[request.param]


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_makes_exactly_the_declared_layout(fmt, shape, seed):
    """The planner counts `nbytes`, the harness fakes `empty`: both are read from `layout`, which must be what
    quantizing really stores (names, shapes, dtypes) in every compute dtype."""
    for dtype in (torch.bfloat16, torch.float32):
        qw = QuantizedWeight.quantize(_weight(shape, seed), fmt, dtype)
        stored = {name: (tuple(t.shape), t.dtype) for name, t in qw.named_buffers()}
        assert stored == dict(fmt.layout(*shape, dtype)), (fmt, dtype)
        assert fmt.nbytes(*shape, dtype) == sum(t.numel() * t.element_size() for t in qw.buffers())
        fake = {name: (tuple(t.shape), t.dtype) for name, t in fmt.empty(*shape, dtype).items()}
        assert fake == stored
        assert qw.dequantize().dtype == dtype and tuple(qw.dequantize().shape) == shape


def test_the_harness_and_the_planner_read_the_same_layout(fmt):
    """A fake weight (what the fake-tensor measurement runs) has the layout's buffers, and the planner's bytes for
    a FLUX linear are the layout's plus the bias."""
    shape = (3072, 12288)
    qw = fake_quantized_weight(fmt.name, *shape)
    assert {n: (tuple(t.shape), t.dtype) for n, t in qw.named_buffers()} == dict(fmt.layout(*shape, torch.bfloat16))
    linear = next(l for l in flux_arch(flux_dev_config()).linears if (l.out_features, l.in_features) == shape)
    assert linear.weight_bytes(fmt.name) == fmt.nbytes(*shape) + (shape[0] * 2 if linear.bias else 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_serialization_round_trip_is_bit_identical(fmt, shape, seed):
    qw = QuantizedWeight.quantize(_weight(shape, seed), fmt)
    tensors = qw.to_state_tensors("blocks.0.proj")
    assert tensors and all(k.startswith("blocks.0.proj.weight") for k in tensors)
    back = QuantizedWeight.from_state_tensors(fmt.name, "blocks.0.proj", tensors, shape)
    assert back.quant is fmt and torch.equal(_bits(back.dequantize()), _bits(qw.dequantize()))
    for (name, a), (_, b) in zip(qw.named_buffers(), back.named_buffers()):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), name
    missing = dict(tensors)
    del missing[next(iter(missing))]
    with pytest.raises(UraeError, match="re-run `urae-lite prepare`"):
        QuantizedWeight.from_state_tensors(fmt.name, "blocks.0.proj", missing, shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernel_decodes_what_the_library_decodes(fmt, shape, seed, monkeypatch):
    """Each format's fused dequantization (Triton's interpreter here) is bit for bit its library path, into a
    poisoned buffer; a dense format has nothing to decode (the kernels need no workspace for it)."""
    from urae_lite.kernels import interpreting

    qw = QuantizedWeight.quantize(_weight(shape, seed), fmt)
    if fmt.dense:
        assert qw.dense and torch.equal(qw.dequantize(), qw.weight)
        return
    if not interpreting() and not torch.cuda.is_available():
        pytest.skip("urae_lite.kernels was imported before TRITON_INTERPRET=1 and there is no GPU")
    monkeypatch.setenv("URAE_LITE_KERNELS", "off")
    library = qw.dequantize()
    monkeypatch.setenv("URAE_LITE_KERNELS", "on")
    out = torch.full(shape, float("nan"), dtype=qw.dtype)
    assert qw.dequantize(out=out) is out
    assert torch.equal(_bits(out), _bits(library))


def test_names_and_objects_resolve_and_an_unknown_name_is_one_line():
    assert all(get_format(name) is f and get_format(f) is f and f.name == name for name, f in FORMATS.items())
    assert all(math.isfinite(f.speed) and f.speed >= 1.0 for f in FORMATS.values())
    with pytest.raises(UraeError, match=r"^unknown quantization 'int3': use one of " + ", ".join(FORMATS) + "$"):
        get_format("int3")
