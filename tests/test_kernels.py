"""urae_lite.kernels against the library path and quanto (bit for bit; the library path's decode is itself checked
against the float64 formula of the stored buffers, tests/references.py) and float64 references (error bounds).

Without CUDA the kernels run in Triton's CPU interpreter. Triton chooses interpreter or compiler when a kernel is
decorated, i.e. when urae_lite.kernels is first imported, so TRITON_INTERPRET must be set before that import
(tests/conftest.py sets it for the whole session; the line below covers running this file alone).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes.functional")  # the NF4 library path

from references import assert_decodes  # noqa: E402

from urae_lite.kernels import (  # noqa: E402
    adapted_linear,
    fp8_dequantize,
    interpreting,
    lowrank_forward,
    nf4_dequantize,
)
from urae_lite.kernels.lowrank_gemm import gemm_lowrank  # noqa: E402
from urae_lite.kernels.reference import (  # noqa: E402
    fp8_dequantize_ref,
    lowrank_backward_ref,
    lowrank_forward_ref,
    nf4_dequantize_ref,
)

if not interpreting() and not torch.cuda.is_available():
    pytest.skip(
        "urae_lite.kernels was imported before TRITON_INTERPRET=1 was set and there is no GPU", allow_module_level=True
    )

DEVICE = "cpu" if interpreting() else "cuda"
BF16 = torch.bfloat16
# Shapes deliberately off every tile size (interpreter tiles are 32): M=37, K=70, N=50.
M, K, N = 37, 70, 50


@pytest.fixture
def gen(seed) -> torch.Generator:
    """This test's generator, seeded by the suite's seed switch (tests/conftest.py: URAE_TEST_SEED)."""
    return torch.Generator(DEVICE).manual_seed(seed)


def randn(*shape: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(BF16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (stricter than torch.equal: tells -0.0 from 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def assert_within(
    got: torch.Tensor,
    ref: torch.Tensor,
    full_abs: torch.Tensor,
    k: int,
    rounded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Error bounds against a float64 reference computed from the same bf16 inputs.

    Sources of error: the output's one rounding to bf16 (round-to-nearest-even, unit roundoff u = 2^-8); one
    bf16 intermediate (x·Aᵀ or dy·B, rounded as in the PyTorch path) given as `rounded` = (P, Q) when the
    output is P @ Q with P the exact intermediate (or Q); fp32 accumulation over k terms (<= k 2^-24 Σ|products|,
    full_abs = Σ|products| of the whole expression).

    * element-wise, a hard bound: 2^-7 (|ref| + |P| @ |Q|) + k 2^-22 full_abs (u and k 2^-24 doubled for margin,
      and again for the tensor-core accumulation order);
    * root-mean-square, a statistical bound that is 6x sharper where the output cancels (dB sums M terms of
      random sign): rounding errors are independent, RMS <= u/sqrt(3) relative each, so
      rms(err) <= 2^-8 (rms(ref) + rms(sqrt(P² @ Q²))) + k 2^-22 rms(full_abs) holds with ~2.5x to spare, and a
      systematic error of 1% still fails it.
    """
    assert torch.isfinite(got).all(), "non-finite output (poisoned buffer not fully written?)"
    err = got.double() - ref
    path = torch.zeros(()) if rounded is None else rounded[0].abs() @ rounded[1].abs()
    path_rss = torch.zeros(()) if rounded is None else (rounded[0].square() @ rounded[1].square()).sqrt()
    accumulation = k * 2**-22 * full_abs
    worst = (err.abs() / (2**-7 * (ref.abs() + path) + accumulation)).max().item()
    assert worst <= 1.0, f"element error {worst:.2f}x its bound (max abs error {err.abs().max().item():.3g})"

    def rms(t: torch.Tensor) -> float:
        return t.double().square().mean().sqrt().item()

    rms_bound = 2**-8 * (rms(ref) + rms(path_rss.expand_as(ref))) + rms(accumulation.expand_as(ref))
    assert rms(err) <= rms_bound, f"rms error {rms(err):.3g} above its bound {rms_bound:.3g}"


def quantize_nf4(w: torch.Tensor, dtype: torch.dtype = BF16) -> tuple[tuple, torch.Tensor]:
    """Our NF4 buffers for w (urae_lite.quant's, bitsandbytes' layout) and the library path's dequantization to
    `dtype`, which is first checked against the float64 formula of the buffers (tests/references.py)."""
    from urae_lite.quant import QuantizedWeight

    qw = QuantizedWeight.quantize(w, "nf4", dtype)
    buffers = (qw.weight, qw.absmax, qw.nested_absmax, qw.nested_quant_map, qw.offset, qw.quant_map)
    expected = qw.dequantize_reference()
    assert_decodes(expected, qw)
    return buffers, expected


# ---- dequantization: bit for bit ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape",
    [(48, 200), (50, 70), (7, 9), (130, 128), (300, 32), (45, 96)],
    ids=["N*K%64==0", "tail-block", "odd-numel", "two-nested-blocks", "width-32", "width-96"],
)
def test_nf4_dequantize_bit_exact_with_library_path(shape, gen):
    """The kernel, its PyTorch twin and the library path give the same bits, and those are the float64 formula
    of the buffers within the rounding of a correct fp32 decode (checked in quantize_nf4)."""
    w = randn(*shape, gen=gen, scale=0.05)
    w.view(-1)[: min(64, w.numel())] = 0  # an all-zero block (absmax 0)
    buffers, expected = quantize_nf4(w)

    out = torch.full(shape, float("nan"), dtype=BF16, device=DEVICE)  # poisoned: every element must be written
    assert nf4_dequantize(*buffers, shape, out=out) is out
    assert same_bits(out, expected)
    assert same_bits(nf4_dequantize(*buffers, shape), expected)
    assert same_bits(nf4_dequantize_ref(*buffers, shape), expected)


@pytest.mark.parametrize("shape", [(48, 200), (45, 96)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nf4_dequantize_other_dtypes_bit_exact(dtype, shape, gen):
    w = randn(*shape, gen=gen, scale=0.05)
    buffers, expected = quantize_nf4(w, dtype)
    got = nf4_dequantize(*buffers, w.shape, dtype=dtype)
    assert got.dtype == expected.dtype == dtype and torch.equal(got, expected)


def test_fp8_dequantize_every_code_bit_exact(gen):
    """All 256 e4m3fn bit patterns times random per-row scales (the two NaN codes must stay NaN)."""
    data = torch.arange(256, dtype=torch.uint8, device=DEVICE).view(torch.float8_e4m3fn).reshape(8, 32)
    scale = randn(8, 1, gen=gen)
    expected = scale * data.to(BF16)
    out = torch.full((8, 32), float("nan"), dtype=BF16, device=DEVICE)
    fp8_dequantize(data, scale, out=out)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_fp8_dequantize_bit_exact_with_quanto(gen):
    quanto = pytest.importorskip("optimum.quanto")
    from optimum.quanto.calibrate import absmax_scale

    from urae_lite.quant import QuantizedWeight

    w = randn(50, 70, gen=gen, scale=0.05)
    q = quanto.quantize_weight(
        w, qtype=quanto.qfloat8_e4m3fn, axis=0, scale=absmax_scale(w, quanto.qfloat8_e4m3fn, axis=0)
    )
    out = torch.full(w.shape, float("nan"), dtype=BF16, device=DEVICE)
    fp8_dequantize(q._data, q._scale, out=out)
    assert same_bits(out, q.dequantize())
    assert same_bits(fp8_dequantize_ref(q._data, q._scale), q.dequantize())
    qw = QuantizedWeight.quantize(w, "fp8")
    assert same_bits(fp8_dequantize(qw.weight, qw.scale), qw.dequantize_reference())
    assert_decodes(out, qw)  # e4m3 x scale in float64, one bf16 rounding


# ---- fused forward ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("has_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("rank", [1, 16, 48, 64])
def test_lowrank_forward_matches_float64(rank, has_bias, gen):
    x, w = randn(M, K, gen=gen), randn(N, K, gen=gen, scale=K**-0.5)
    A, B = randn(rank, K, gen=gen, scale=K**-0.5), randn(N, rank, gen=gen, scale=0.5)
    bias = randn(N, gen=gen) if has_bias else None
    y, xa = lowrank_forward(x, w, A, B, bias)

    x64, w64, A64, B64 = (t.double() for t in (x, w, A, B))
    bias64 = None if bias is None else bias.double()
    ref = lowrank_forward_ref(x64, w64, A64, B64, bias64)
    xa64 = x64 @ A64.t()
    full = x64.abs() @ w64.abs().t() + (x64.abs() @ A64.abs().t()) @ B64.abs().t()
    full = full if bias is None else full + bias64.abs()
    assert_within(y, ref, full, K + rank, rounded=(xa64, B64.t()))
    assert_within(xa, xa64, x64.abs() @ A64.abs().t(), K)

    out = torch.full((M, N), float("nan"), dtype=BF16, device=DEVICE)  # poisoned output buffer
    assert gemm_lowrank(x, w, xa, B, bias, out=out) is out
    assert torch.equal(out, y)


def test_gemm_lowrank_strided_operands(gen):
    """Backward passes W and A as transposed views; operands of any strides must work, tiny shapes too."""
    a = randn(9, 2 * 20, gen=gen)[:, ::2]  # (9, 20), non-contiguous rows
    w = randn(20, 5, gen=gen).t()  # (5, 20) seen through a transpose
    l, u = randn(9, 3, gen=gen), randn(3, 5, gen=gen).t()
    a64, w64, l64, u64 = (t.double() for t in (a, w, l, u))
    ref = a64 @ w64.t() + l64 @ u64.t()
    full = a64.abs() @ w64.abs().t() + l64.abs() @ u64.abs().t()
    assert_within(gemm_lowrank(a, w, l, u), ref, full, 23)


@pytest.mark.parametrize("rank", [300, 520])
def test_large_stacked_rank_forward_and_dx_match_float64(rank, gen):
    """Stacked adapters past one rank chunk (R > BLOCK_R_MAX, not a chunk multiple): the kernel walks R in
    chunks; forward (L = x·Aᵀ, U = B) and the dx layout (L = dy·B, U = Aᵀ through a transposed view)."""
    from urae_lite.kernels.lowrank_gemm import BLOCK_R_MAX

    assert rank > BLOCK_R_MAX and rank % BLOCK_R_MAX
    x, w = randn(M, K, gen=gen), randn(N, K, gen=gen, scale=K**-0.5)
    A, B = randn(rank, K, gen=gen, scale=K**-0.5), randn(N, rank, gen=gen, scale=rank**-0.5)
    bias = randn(N, gen=gen)
    y, _ = lowrank_forward(x, w, A, B, bias)
    x64, w64, A64, B64, b64 = (t.double() for t in (x, w, A, B, bias))
    full = x64.abs() @ w64.abs().t() + (x64.abs() @ A64.abs().t()) @ B64.abs().t() + b64.abs()
    assert_within(y, lowrank_forward_ref(x64, w64, A64, B64, b64), full, K + rank, rounded=(x64 @ A64.t(), B64.t()))

    dy = randn(M, N, gen=gen)
    dyB = dy @ B  # (M, R), rounded to bf16 as in backward
    dx = torch.full((M, K), float("nan"), dtype=BF16, device=DEVICE)  # poisoned
    gemm_lowrank(dy, w.t(), dyB, A.t(), out=dx)
    dy64, dyB64 = dy.double(), dy.double() @ B64
    assert_within(
        dx,
        dy64 @ w64 + dyB64 @ A64,
        dy64.abs() @ w64.abs() + (dy64.abs() @ B64.abs()) @ A64.abs(),
        N + rank,
        rounded=(dyB64, A64),
    )


@pytest.mark.parametrize("rank", [0, 16, 300])
def test_gemm_fp32_inputs_match_float64(rank, gen):
    """fp32 compute (exact ieee products, one fp32 rounding per accumulation) against float64."""

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE) * scale

    x, w, bias = rand(M, K), rand(N, K, scale=K**-0.5), rand(N)
    A, B = rand(rank, K, scale=K**-0.5), rand(N, rank, scale=0.5)
    y, xa = lowrank_forward(x, w, A, B, bias)
    out = torch.full((M, N), float("nan"), device=DEVICE)  # poisoned
    gemm_lowrank(x, w, xa, B, bias, out=out)
    assert y.dtype == out.dtype == torch.float32 and torch.equal(out, y)

    x64, w64, A64, B64, b64 = (t.double() for t in (x, w, A, B, bias))
    ref = lowrank_forward_ref(x64, w64, A64, B64, b64)
    full = x64.abs() @ w64.abs().t() + (x64.abs() @ A64.abs().t()) @ B64.abs().t() + b64.abs()
    err = (y.double() - ref).abs()
    # fp32: u = 2^-24 per rounding, <= K + R + 1 roundings on any path (x·Aᵀ included); doubled for margin
    assert (err <= (K + rank + 2) * 2**-23 * full + 2**-23 * ref.abs()).all(), err.max().item()


# ---- adapted_linear: forward + gradients through autograd ----------------------------------------------------
class _NF4Base:
    """Minimal frozen base in our NF4 layout, dequantized by our kernel (what QuantizedWeight does on CUDA)."""

    dense, dtype = False, BF16  # the DequantizableWeight protocol: an NF4 base dequantizes into the workspace

    def __init__(self, w: torch.Tensor):
        self.buffers, self.expected = quantize_nf4(w)
        self.weight, self.shape = self.buffers[0], w.shape

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return nf4_dequantize(*self.buffers, self.shape, out=out)


@pytest.mark.parametrize("has_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("trainable", ["none", "prefix", "all"])
@pytest.mark.parametrize("rank", [1, 16, 48, 64])
def test_adapted_linear_grads_match_float64_autograd(rank, trainable, has_bias, gen):
    n_trainable = {"none": 0, "prefix": max(1, rank // 3), "all": rank}[trainable]
    base = _NF4Base(randn(N, K, gen=gen, scale=K**-0.5))
    w64 = base.expected.double()
    x = randn(K, 2 * M, gen=gen).t()[::2].unsqueeze(0).requires_grad_(True)  # (1, M, K), strided both ways
    A = randn(rank, K, gen=gen, scale=K**-0.5).requires_grad_(True)
    B = randn(N, rank, gen=gen, scale=0.5).requires_grad_(True)
    bias = randn(N, gen=gen).requires_grad_(True) if has_bias else None

    y = adapted_linear(x, base, bias, A, B, n_trainable)
    assert y.shape == (1, M, N) and y.dtype == BF16
    dy = randn(1, M, N, gen=gen)
    y.backward(dy)

    x64, A64, B64 = (t.detach().double().reshape(t.shape[-2:]).requires_grad_(True) for t in (x, A, B))
    bias64 = None if bias is None else bias.detach().double().requires_grad_(True)
    ref = lowrank_forward_ref(x64, w64, A64, B64, bias64)
    ref.backward(dy.double().reshape(M, N))

    a_dy, a_x, a_w, a_A, a_B = (t.detach().double().abs().reshape(t.shape[-2:]) for t in (dy, x, base.expected, A, B))
    dy64 = dy.double().reshape(M, N)
    xa64, dyB64 = x64.detach() @ A64.detach().t(), dy64 @ B64.detach()  # the intermediates rounded to bf16
    full_y = a_x @ a_w.t() + (a_x @ a_A.t()) @ a_B.t() + (0 if bias is None else bias64.detach().abs())
    assert_within(y.reshape(M, N), ref.detach(), full_y, K + rank, rounded=(xa64, B64.detach().t()))
    assert_within(
        x.grad.reshape(M, K), x64.grad, a_dy @ a_w + (a_dy @ a_B) @ a_A, N + rank, rounded=(dyB64, A64.detach())
    )
    if bias is not None:
        assert_within(bias.grad, bias64.grad, a_dy.sum(0), M)

    t = n_trainable
    if t == 0:
        assert A.grad is None and B.grad is None
        return
    assert_within(A.grad[:t], A64.grad[:t], ((a_dy @ a_B).t() @ a_x)[:t], M + N, rounded=(dyB64.t()[:t], x64.detach()))
    assert_within(
        B.grad[:, :t], B64.grad[:, :t], (a_dy.t() @ (a_x @ a_A.t()))[:, :t], M + K, rounded=(dy64.t(), xa64[:, :t])
    )
    assert torch.count_nonzero(A.grad[t:]) == 0 and torch.count_nonzero(B.grad[:, t:]) == 0


@pytest.mark.parametrize("fmt", ["nf4", "fp8", "bf16"])
def test_adapted_linear_takes_quantized_weight(fmt, gen):
    """The base protocol matches urae_lite.quant.QuantizedWeight (whose CUDA dequantize calls our kernels)."""
    if fmt == "fp8":
        pytest.importorskip("optimum.quanto")
    from urae_lite.quant import QuantizedWeight

    k = 128  # QuantizedWeight's NF4 wants N*K a multiple of 64
    base = QuantizedWeight.quantize(randn(N, k, gen=gen, scale=k**-0.5), fmt).to(DEVICE)
    x, A, B, bias = randn(M, k, gen=gen), randn(8, k, gen=gen, scale=k**-0.5), randn(N, 8, gen=gen), randn(N, gen=gen)
    y = adapted_linear(x, base, bias, A, B, n_trainable=8)
    x64, w64, A64, B64, b64 = (t.double() for t in (x, base.dequantize_reference(), A, B, bias))
    full = x64.abs() @ w64.abs().t() + (x64.abs() @ A64.abs().t()) @ B64.abs().t() + b64.abs()
    assert_within(y, lowrank_forward_ref(x64, w64, A64, B64, b64), full, k + 8, rounded=(x64 @ A64.t(), B64.t()))


def test_adapted_linear_without_adapter(gen):
    """A = B = None: the plain frozen linear (R = 0), forward and dx."""
    base = _NF4Base(randn(N, K, gen=gen, scale=K**-0.5))
    x, bias = randn(M, K, gen=gen).requires_grad_(True), randn(N, gen=gen)
    y = adapted_linear(x, base, bias, None, None, 0)
    dy = randn(M, N, gen=gen)
    y.backward(dy)
    x64, w64, dy64 = x.detach().double(), base.expected.double(), dy.double()
    assert_within(y, x64 @ w64.t() + bias.double(), x64.abs() @ w64.abs().t() + bias.double().abs(), K)
    assert_within(x.grad, dy64 @ w64, dy64.abs() @ w64.abs(), N)


def test_adapted_linear_never_saves_the_dense_weight(gen):
    """Only x, xa = x·Aᵀ and the small A, B are saved; the (N, K) weight is re-dequantized in backward."""
    base = _NF4Base(randn(N, K, gen=gen, scale=K**-0.5))
    x = randn(M, K, gen=gen).requires_grad_(True)
    A, B = randn(4, K, gen=gen).requires_grad_(True), randn(N, 4, gen=gen).requires_grad_(True)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = adapted_linear(x, base, None, A, B, n_trainable=2)
    assert sorted(saved) == sorted([(M, K), (M, 4), (4, K), (N, 4)])
    y.sum().backward()
    assert x.grad is not None and A.grad is not None and B.grad is not None


def test_adapted_linear_under_autocast_computes_in_bf16(gen):
    base = _NF4Base(randn(N, K, gen=gen, scale=K**-0.5))
    x = randn(M, K, gen=gen).float()
    A, B = randn(16, K, gen=gen).float(), randn(N, 16, gen=gen).float()
    with torch.autocast(DEVICE, dtype=BF16):
        y = adapted_linear(x, base, None, A, B, n_trainable=0)
    assert y.dtype == BF16
    assert torch.equal(y, adapted_linear(x.to(BF16), base, None, A.to(BF16), B.to(BF16), n_trainable=0))


def test_reference_backward_is_autograd(gen):
    """The hand-written backward formulas (what the kernels implement) are autograd's, in float64."""
    x, w, A, B = (randn(*s, gen=gen).double().requires_grad_(True) for s in ((M, K), (N, K), (16, K), (N, 16)))
    dy = randn(M, N, gen=gen).double()
    lowrank_forward_ref(x, w, A, B).backward(dy)
    dx, dA, dB = lowrank_backward_ref(dy, x.detach(), w.detach(), A.detach(), B.detach())
    for got, want in ((dx, x.grad), (dA, A.grad), (dB, B.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
