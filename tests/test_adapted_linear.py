"""Adapted linear: reference math, no-op init, gradients only where trainable, no dense W saved for backward."""

from __future__ import annotations

import pytest
import torch
from references import adapted_linear_float64, adapted_linear_grads_float64, assert_bounded, decode_float64
from torch import nn

from urae_lite.adapted_linear import AdaptedLinear
from urae_lite.minor import MINOR_RESIDUAL_SLICE, MINOR_SLICE, add_minor_slices, minor_components


def _layer(fmt: str, n: int = 40, k: int = 64, bias: bool = True, seed: int = 0) -> tuple[AdaptedLinear, nn.Linear]:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    return AdaptedLinear.from_linear(lin, fmt), lin


@pytest.mark.parametrize("k", [64, 96])
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nf4"])
def test_forward_equals_float64_formula(fmt, k, seed, monkeypatch):
    """The library path (kernels off) computes x Wᵀ + bias + Σ s (x Aᵀ) Bᵀ with W the float64 decode of the stored
    buffers (tests/references.py), at a width that is a multiple of the NF4 block and one that is not."""
    monkeypatch.setenv("URAE_LITE_KERNELS", "off")
    layer, _ = _layer(fmt, k=k, seed=seed)
    g = torch.Generator().manual_seed(seed)
    layer.add_slice("a", torch.randn(3, k, generator=g) * 0.1, torch.randn(40, 3, generator=g) * 0.1, scale=0.5)
    layer.add_slice("b", torch.randn(5, k, generator=g) * 0.1, torch.randn(40, 5, generator=g) * 0.1, trainable=True)
    x = torch.randn(2, 7, k, generator=g).to(torch.bfloat16)
    w64, w_err = decode_float64(layer.base)
    A = torch.cat([s.A for s in layer.slices.values()])
    B = torch.cat([s.scale * s.B.double() for s in layer.slices.values()], dim=1)  # scales 0.5, 1: exact in bf16
    y = layer(x)
    assert y.shape == (2, 7, 40) and y.dtype == torch.bfloat16
    # bf16 compute, fp32 accumulation: the library path's rounding sites (tests/references.py)
    assert_bounded(y, adapted_linear_float64(x.reshape(-1, k), w64, w_err, layer.bias, A, B, dtype=torch.bfloat16))


def test_lora_is_noop_at_init_and_only_trainable_slices_get_grads():
    layer, lin = _layer("nf4")
    frozen = layer.add_slice("style", torch.randn(4, 64) * 0.1, torch.randn(40, 4) * 0.1)
    x = torch.randn(5, 64).to(torch.bfloat16).requires_grad_(True)
    before = layer(x).detach()
    lora = layer.add_lora("new", rank=8, alpha=16)
    assert lora.scale == 2.0 and torch.count_nonzero(lora.B) == 0 and lora.A.abs().max() > 0
    after = layer(x)
    # The zero B adds exact zeros, but the branch GEMMs now have 12 columns instead of 4 and a CPU BLAS may sum the
    # style slice's terms in another order: both outputs are within the rounding bound of the same float64 value.
    w64, w_err = decode_float64(layer.base)
    expected, bound = adapted_linear_float64(
        x.detach(), w64, w_err, layer.bias, frozen.A, frozen.B, dtype=torch.bfloat16
    )
    assert ((after.detach().double() - before.double()).abs() <= 2 * bound).all()
    after.float().pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 0
    assert lora.A.grad is None or torch.count_nonzero(lora.A.grad) == 0  # B = 0 blocks dA at init
    assert lora.B.grad is not None and lora.B.grad.abs().max() > 0
    assert frozen.A.grad is None and frozen.B.grad is None
    assert layer.bias.grad is None and not any(p.requires_grad for p in layer.base.parameters())
    assert list(layer.base.parameters()) == []  # base is buffers only: nothing an optimizer could touch


def test_branch_orders_trainable_slices_first():
    layer, _ = _layer("bf16")
    layer.add_slice("f1", torch.ones(2, 64), torch.ones(40, 2), scale=3.0)
    layer.add_slice("t1", torch.ones(4, 64), torch.ones(40, 4), trainable=True)
    layer.add_slice("f2", torch.ones(1, 64), torch.ones(40, 1))
    A, B, n_trainable = layer.branch()
    assert A.shape == (7, 64) and B.shape == (40, 7) and n_trainable == 4
    assert torch.equal(B[:, 4:6], torch.full((40, 2), 3.0, dtype=torch.bfloat16))


def test_backward_saves_no_dense_weight(seed):
    layer, _ = _layer("nf4", n=96, k=160)
    lora = layer.add_lora("l", rank=4)
    lora.B.data = torch.randn(lora.B.shape, generator=torch.Generator().manual_seed(seed)).to(lora.B.dtype) * 0.1
    shapes = []
    x = torch.randn(3, 160).to(torch.bfloat16).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert (96, 160) not in shapes and (160, 96) not in shapes, shapes
    # dx still equals the dense formula dy (W + B A) with W the float64 decode of the buffers, within the library
    # path's bf16 rounding (tests/references.py)
    w64, w_err = decode_float64(layer.base)
    grads = adapted_linear_grads_float64(x.detach(), torch.ones(3, 96), w64, w_err, lora.A, lora.B, 4, torch.bfloat16)
    assert_bounded(x.grad, grads["dx"], "dx")


def test_mismatched_slice_is_rejected():
    layer, _ = _layer("bf16")
    with pytest.raises(ValueError, match="but the layer is 40x64"):
        layer.add_slice("bad", torch.zeros(2, 63), torch.zeros(40, 2))


def test_minor_components_reconstruct_weight_and_are_the_smallest(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 80, generator=g)
    B0, A0 = minor_components(W, rank=6)
    assert B0.shape == (48, 6) and A0.shape == (6, 80)
    residual = W - B0 @ A0
    torch.testing.assert_close(residual + B0 @ A0, W, rtol=0, atol=1e-6)  # fp32 precision
    S = torch.linalg.svdvals(W.double())
    # B0·A0 is exactly the best rank-6 approximation from the 6 smallest triplets: its singular values are them
    torch.testing.assert_close(torch.linalg.svdvals((B0 @ A0).double())[:6], S[-6:], rtol=1e-4, atol=1e-5)
    # and the residual keeps the rest: its smallest 6 singular values vanish
    assert torch.linalg.svdvals(residual.double())[-6:].max() < 1e-4 * S[0]


def test_minor_slices_are_noop_at_init_and_train():
    layer, _ = _layer("nf4")
    x = torch.randn(4, 64).to(torch.bfloat16)
    before = layer(x)
    B0, A0 = minor_components(layer.base.dequantize().float(), rank=4)
    add_minor_slices(layer, A0, B0)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-2 * before.abs().max().item())
    assert layer.slices[MINOR_SLICE].trainable and not layer.slices[MINOR_RESIDUAL_SLICE].trainable
    layer(x).sum().backward()
    assert layer.slices[MINOR_SLICE].A.grad is not None and layer.slices[MINOR_RESIDUAL_SLICE].A.grad is None


@pytest.mark.parametrize("autocast", [False, True])
def test_trainable_factor_gradients_own_their_storage(autocast, seed):
    """fp32 trainable masters beside bf16 frozen slices: each slice is cast before the concatenation, so the
    trainable A's gradient is its own (r, K) fp32 tensor, not a view keeping the (R, K) gradient of the whole
    concatenation; the values are those of concatenating first (the previous order)."""
    layer, _ = _layer("nf4", n=48, k=64)
    g = torch.Generator().manual_seed(seed)
    layer.add_slice("frozen", torch.randn(16, 64, generator=g) * 0.1, torch.randn(48, 16, generator=g) * 0.1)
    trained = layer.add_slice(
        "trained", torch.randn(4, 64, generator=g) * 0.1, torch.randn(48, 4, generator=g) * 0.1, trainable=True
    )
    trained.A, trained.B = (nn.Parameter(t.detach().float()) for t in (trained.A, trained.B))
    x = torch.randn(9, 64, generator=g)
    grads = {}
    for name, branch in (("cast first", None), ("cat first", lambda dtype: AdaptedLinear.branch(layer))):
        if branch is not None:
            layer.branch = branch  # the previous order: concatenate in fp32, cast in forward
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x if autocast else x.bfloat16())
        y.float().square().sum().backward()
        grads[name] = (trained.A.grad, trained.B.grad)
        trained.A.grad = trained.B.grad = None
        vars(layer).pop("branch", None)
    dA, dB = grads["cast first"]
    assert dA.dtype == torch.float32 and dA.untyped_storage().nbytes() == dA.numel() * 4
    assert torch.equal(dA, grads["cat first"][0]) and torch.equal(dB, grads["cat first"][1])
    assert grads["cat first"][0].untyped_storage().nbytes() > dA.untyped_storage().nbytes()  # what it fixes
