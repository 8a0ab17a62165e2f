"""How urae_lite.kernels launches, on the CPU: custom ops and fake tensors, the device guard, autotune keys.

Runs the kernels in Triton's interpreter (see tests/test_kernels.py); nothing here needs a GPU.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")

import triton  # noqa: E402
from test_kernels import (  # noqa: E402
    BF16,
    DEVICE,
    K,
    M,
    N,
    _NF4Base,
    assert_within,
    quantize_nf4,
    randn,
)
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402

from urae_lite.kernels import (  # noqa: E402
    adapted_linear,
    autograd,
    dequant,
    fp8_dequantize,
    gemm_tuning,
    interpreting,
    lowrank_gemm,
    nf4_dequantize,
)
from urae_lite.kernels.lowrank_gemm import gemm_lowrank  # noqa: E402
from urae_lite.kernels.reference import lowrank_forward_ref  # noqa: E402

OPS = (
    "nf4_dequantize",
    "nf4_dequantize_into",
    "fp8_dequantize",
    "fp8_dequantize_into",
    "gemm_lowrank",
    "gemm_lowrank_into",
    "lowrank_forward",
    "lowrank_dx",
)
MUTATING = {"nf4_dequantize_into", "fp8_dequantize_into", "gemm_lowrank_into"}


@pytest.fixture
def gen(seed) -> torch.Generator:
    """This test's generator, seeded by the suite's seed switch (tests/conftest.py: URAE_TEST_SEED)."""
    return torch.Generator(DEVICE).manual_seed(seed)


# ---- custom ops ------------------------------------------------------------------------------------------------
def test_custom_ops_registered_with_their_mutations():
    for name in OPS:
        schema = getattr(torch.ops.urae_lite, name).default._schema
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert written == (["out"] if name in MUTATING else []), (name, str(schema))


def test_custom_ops_pass_opcheck(gen):
    """torch.library.opcheck: schema, fake implementation against the real one, AOT-autograd tracing."""
    buffers, _ = quantize_nf4(randn(8, 64, gen=gen, scale=0.05))
    data = randn(8, 16, gen=gen).to(torch.float8_e4m3fn).view(torch.uint8)  # opcheck cannot compare fp8 tensors
    scale = randn(8, 1, gen=gen)
    a, w, l, u = randn(9, 20, gen=gen), randn(12, 20, gen=gen), randn(9, 3, gen=gen), randn(12, 3, gen=gen)
    bias = randn(12, gen=gen)
    cases = {
        "nf4_dequantize": (*buffers, [8, 64], BF16),
        "nf4_dequantize_into": (*buffers, torch.empty(8, 64, dtype=BF16, device=DEVICE)),
        "fp8_dequantize": (data, scale, BF16),
        "fp8_dequantize_into": (data, scale, torch.empty(8, 16, dtype=BF16, device=DEVICE)),
        "gemm_lowrank": (a, w, l, u, bias),
        "gemm_lowrank_into": (a, w, l, u, None, torch.empty(9, 12, dtype=BF16, device=DEVICE)),
        "lowrank_forward": (a, w, randn(3, 20, gen=gen), u, bias),
        "lowrank_dx": (randn(9, 12, gen=gen), w, l, randn(3, 20, gen=gen)),
    }
    assert set(cases) == set(OPS)
    for name, args in cases.items():
        torch.library.opcheck(
            getattr(torch.ops.urae_lite, name),
            args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


class _FakeNF4Base:
    """An NF4 base whose buffers are made under the active (fake) mode: realistic sizes cost no memory."""

    dense, dtype = False, BF16  # the DequantizableWeight protocol: an NF4 base dequantizes into the workspace

    def __init__(self, n_out: int, n_in: int):
        n = n_out * n_in
        self.buffers = (
            torch.empty(n // 2, dtype=torch.uint8),
            torch.empty(n // 64, dtype=torch.uint8),
            torch.empty(-(-n // 16384)),
            torch.empty(256),
            torch.empty(()),
            torch.empty(16),
        )
        self.weight, self.shape = self.buffers[0], torch.Size((n_out, n_in))

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return nf4_dequantize(*self.buffers, self.shape, out=out)


def test_adapted_linear_forward_backward_on_fake_tensors(monkeypatch, gen):
    """A FLUX-sized layer (M=4096, K=N=3072, R=16) under FakeTensorMode: right shapes and dtypes everywhere,
    one dequantization workspace of the layer's size per pass, and none of it left in the global cache."""
    workspaces: list[torch.Tensor] = []
    real_workspace = autograd._workspace
    monkeypatch.setattr(autograd, "_workspace", lambda base: workspaces.append(real_workspace(base)) or workspaces[-1])
    cached_before = dict(autograd._workspaces)
    Mf, Kf, Nf, R = 4096, 3072, 3072, 16
    with FakeTensorMode():
        base = _FakeNF4Base(Nf, Kf)
        x = torch.empty(2, Mf // 2, Kf, dtype=BF16, requires_grad=True)
        A = torch.empty(R, Kf, dtype=BF16, requires_grad=True)
        B = torch.empty(Nf, R, dtype=BF16, requires_grad=True)
        bias = torch.empty(Nf, dtype=BF16, requires_grad=True)
        y = adapted_linear(x, base, bias, A, B, n_trainable=8)
        y.backward(torch.empty_like(y))
    assert isinstance(y, FakeTensor) and y.shape == (2, Mf // 2, Nf) and y.dtype == BF16
    for t, shape in ((x, x.shape), (A, A.shape), (B, B.shape), (bias, bias.shape)):
        assert isinstance(t.grad, FakeTensor) and t.grad.shape == shape and t.grad.dtype == BF16
    assert [(type(w), w.numel()) for w in workspaces] == [(FakeTensor, Nf * Kf)] * 2  # forward, backward
    assert autograd._workspaces.keys() == cached_before.keys()
    assert not any(isinstance(t, FakeTensor) for t in autograd._workspaces.values())

    # a real call afterwards uses (and fills) the real cache
    base = _NF4Base(randn(N, K, gen=gen, scale=K**-0.5))
    x, A, B = randn(M, K, gen=gen), randn(4, K, gen=gen, scale=K**-0.5), randn(N, 4, gen=gen)
    y = adapted_linear(x, base, None, A, B, n_trainable=0)
    x64, w64, A64, B64 = x.double(), base.expected.double(), A.double(), B.double()
    full = x64.abs() @ w64.abs().t() + (x64.abs() @ A64.abs().t()) @ B64.abs().t()
    assert_within(y, lowrank_forward_ref(x64, w64, A64, B64), full, K + 4, rounded=(x64 @ A64.t(), B64.t()))
    assert not any(isinstance(t, FakeTensor) for t in autograd._workspaces.values())


def test_torch_compile_traces_through_the_ops(gen):
    """fullgraph torch.compile of forward + backward: the ops appear in the AOT graphs and results match eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    base = _NF4Base(randn(N, K, gen=gen, scale=K**-0.5))
    x = randn(M, K, gen=gen).requires_grad_(True)
    A, B = randn(16, K, gen=gen).requires_grad_(True), randn(N, 16, gen=gen).requires_grad_(True)

    def layer(x, A, B):
        return adapted_linear(x, base, None, A, B, n_trainable=16)

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    y = compiled(x, A, B)
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, A, B)]
    forward_code, backward_code = (gm.code for gm in graphs)  # the `out` op runs functionalized, as it must
    assert "torch.ops.urae_lite.nf4_dequantize_into.default" in forward_code
    assert "torch.ops.urae_lite.lowrank_forward.default" in forward_code
    assert "torch.ops.urae_lite.nf4_dequantize_into.default" in backward_code
    assert "torch.ops.urae_lite.lowrank_dx.default" in backward_code

    for t in (x, A, B):
        t.grad = None
    layer(x, A, B).sum().backward()
    assert torch.equal(y, layer(x, A, B))
    assert all(torch.equal(g, t.grad) for g, t in zip(grads, (x, A, B)))


# ---- device guard ----------------------------------------------------------------------------------------------
def test_device_guard_selects_the_tensors_cuda_device():
    """Entering it makes the tensors' GPU current (Triton launches on the current one); off CUDA it does nothing."""
    from urae_lite.kernels.triton_utils import device_guard

    guard = device_guard(torch.device("cuda", 1))  # constructing does not touch CUDA
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_runs_inside_its_tensors_device_guard(monkeypatch, gen):
    """Every launch path (both dequantizations with and without `out`, the GEMM forward, dx and plain) launches
    its kernel inside the guard, entered with the output's device."""
    active: list[torch.device] = []
    launches: list[tuple[str, list[torch.device]]] = []

    @contextlib.contextmanager
    def guard(device: torch.device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    for module in (dequant, lowrank_gemm):
        monkeypatch.setattr(module, "device_guard", guard)
    kernels = {
        "nf4": dequant._nf4_dequant_kernel,
        "fp8": dequant._fp8_dequant_kernel,
        "gemm": lowrank_gemm._gemm_lowrank_kernel,
    }
    for name, kernel in kernels.items():

        def run(*args, _run=kernel.run, _name=name, **kwargs):
            launches.append((_name, list(active)))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)

    base = _NF4Base(randn(N, K, gen=gen, scale=K**-0.5))
    nf4_dequantize(*base.buffers, base.shape, out=torch.empty(N, K, dtype=BF16, device=DEVICE))
    data, scale = randn(8, 32, gen=gen).to(torch.float8_e4m3fn), randn(8, 1, gen=gen)
    fp8_dequantize(data, scale)
    fp8_dequantize(data, scale, out=torch.empty(8, 32, dtype=BF16, device=DEVICE))
    a, w, l, u = randn(M, K, gen=gen), randn(N, K, gen=gen), randn(M, 3, gen=gen), randn(N, 3, gen=gen)
    gemm_lowrank(a, w, l, u, out=torch.empty(M, N, dtype=BF16, device=DEVICE))
    gemm_lowrank(a, w, l, u)
    x = randn(M, K, gen=gen).requires_grad_(True)
    adapted_linear(x, base, None, None, None, 0).sum().backward()  # nf4 (no out), forward, nf4, dx

    assert [name for name, _ in launches] == ["nf4", "fp8", "fp8", "gemm", "gemm", "nf4", "gemm", "nf4", "gemm"]
    assert all(stack == [a.device] for _, stack in launches), launches  # cpu here, cuda:i on a GPU


# ---- autotuning ------------------------------------------------------------------------------------------------
def _interpreter_config(bm: int, bk: int = 32, stages: int = 1) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": bk, "GROUP_M": 4}, num_warps=4, num_stages=stages)


@pytest.fixture
def tuner(monkeypatch) -> SimpleNamespace:
    """The GEMM autotuner (`kernel`) with two configs and an empty cache; `calls` counts the configs it times."""
    kernel = lowrank_gemm._gemm_lowrank_kernel
    calls: list[int] = []

    def bench(kernel_call, quantiles=None):
        calls.append(1)
        kernel_call()
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    monkeypatch.setattr(kernel, "configs", [_interpreter_config(32), _interpreter_config(16)])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "do_bench", bench)
    return SimpleNamespace(kernel=kernel, calls=calls)


def _gemm_checked(m: int, gen: torch.Generator) -> None:
    a, w, l, u = randn(m, K, gen=gen), randn(N, K, gen=gen, scale=K**-0.5), randn(m, 4, gen=gen), randn(N, 4, gen=gen)
    a64, w64, l64, u64 = (t.double() for t in (a, w, l, u))
    out = torch.full((m, N), float("nan"), dtype=BF16, device=DEVICE)
    gemm_lowrank(a, w, l, u, out=out)
    assert_within(out, a64 @ w64.t() + l64 @ u64.t(), a64.abs() @ w64.abs().t() + l64.abs() @ u64.abs().t(), K + 4)


def test_autotune_tunes_once_per_power_of_two_bucket_of_m(tuner, gen):
    """M = 37 and 50 share the bucket 64: one tuning (both configs benchmarked once); M = 100 tunes again."""
    assert lowrank_gemm.m_bucket(37) == lowrank_gemm.m_bucket(50) == 64 != lowrank_gemm.m_bucket(100)
    _gemm_checked(37, gen)
    _gemm_checked(50, gen)
    assert len(tuner.kernel.cache) == 1 and len(tuner.calls) == 2
    _gemm_checked(100, gen)
    assert len(tuner.kernel.cache) == 2 and len(tuner.calls) == 4


def test_autotune_never_benchmarks_configs_that_do_not_fit(tuner, monkeypatch, gen):
    """With a device limit only the small config fits: it is taken without any benchmark."""
    small, big = _interpreter_config(32), _interpreter_config(64, bk=64, stages=4)
    monkeypatch.setattr(tuner.kernel, "configs", [big, small])
    limit = lowrank_gemm.smem_estimate(small, 2, lowrank_gemm.block_r(4))
    assert lowrank_gemm.smem_estimate(big, 2, lowrank_gemm.block_r(4)) > limit
    monkeypatch.setattr(gemm_tuning, "device_smem_limit", lambda device: limit)  # where the pruning looks it up
    _gemm_checked(37, gen)
    assert tuner.calls == [] and list(tuner.kernel.cache.values()) == [small]


def test_autotune_uses_our_benchmarker():
    """Where Triton takes a benchmarker (3.2+), the tuner times with ours, not the default with its flush buffer."""
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        assert lowrank_gemm._gemm_lowrank_kernel.do_bench is lowrank_gemm._bench


@pytest.mark.skipif(interpreting() or not torch.cuda.is_available(), reason="times CUDA events on a GPU")
def test_benchmarker_allocates_no_flush_buffer():
    """Triton's default allocates 256 MiB to flush L2 before every timed launch; ours allocates nothing."""
    x = torch.randn(256, 256, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.max_memory_allocated()
    times = lowrank_gemm._bench(lambda: x @ x, quantiles=(0.5, 0.2, 0.8))
    assert len(times) == 3 and all(t > 0 for t in times)
    assert torch.cuda.max_memory_allocated() - before < 16 * 2**20
