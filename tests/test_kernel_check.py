"""The kernels check themselves: each op against its reference (urae_lite.kernel_check), and in `auto` mode an op
that fails its self-check, or does not compile, runs through PyTorch while the verdict is cached per card and
software stack (urae_lite.kernel_verdicts).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before they are
imported; the lines below cover running this file alone), and the `auto` branch that CUDA tensors take is reached by
letting `kernel_switch.auto_runs_kernels` say yes for the CPU. Faults are injected by wrapping the kernels' launch
functions, which the custom ops call at run time.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from urae_lite import kernel_check, kernel_switch, kernel_verdicts  # noqa: E402
from urae_lite.adapted_linear import AdaptedLinear  # noqa: E402
from urae_lite.kernels import dequant, interpreting, lowrank_gemm  # noqa: E402

if not interpreting() and not torch.cuda.is_available():
    pytest.skip(
        "urae_lite.kernels was imported before TRITON_INTERPRET=1 was set and there is no GPU", allow_module_level=True
    )

DEVICE = torch.device("cpu" if interpreting() else "cuda:0")
BF16 = torch.bfloat16
LAUNCHERS = {  # op -> (module, launch function its custom op calls)
    "nf4_dequantize": (dequant, "_launch_nf4"),
    "fp8_dequantize": (dequant, "_launch_fp8"),
    "lowrank_forward": (lowrank_gemm, "_launch_gemm"),
    "lowrank_backward": (lowrank_gemm, "_launch_gemm"),
}


def out_of_shared_memory(*args, **kwargs):
    """What Triton raises when a tile does not fit the card (a compile error the autotuner cannot route around)."""
    raise triton.runtime.errors.OutOfResources(262144, 232448, "shared memory")


def faulty(real, fault: str, gemm: bool):
    """`real` launch with `fault` applied to the output it wrote (always its last argument)."""

    def launch(*args):
        real(*args)
        out = args[-1]
        flat = out.view(-1)
        if fault == "wrong" and gemm:  # 1% off everywhere
            out.mul_(1.01)
        elif fault == "wrong":  # dequantization: one element one ulp off
            flat[7] = torch.nextafter(flat[7], torch.tensor(float("inf"), dtype=flat.dtype))
        elif fault == "unwritten":
            flat[-1] = float("nan")
        elif fault == "past the end":  # the row after `out` in memory
            torch.as_strided(out, out.shape[1:], out.stride()[1:], out.storage_offset() + out.numel()).fill_(0)

    return launch


@pytest.fixture
def auto_here(monkeypatch, tmp_path):
    """`auto` mode as a GPU sees it, on this test's device, with an empty cache folder and no verdicts in memory."""
    monkeypatch.setenv("URAE_LITE_CACHE", str(tmp_path))
    monkeypatch.setenv("URAE_LITE_KERNELS", "auto")
    monkeypatch.setattr(kernel_switch, "auto_runs_kernels", lambda device: True)
    kernel_verdicts.reset()
    yield tmp_path
    kernel_verdicts.reset()


@pytest.fixture
def check_calls(monkeypatch) -> list[tuple]:
    """Every self-check run, as (op, dtype)."""
    calls: list[tuple] = []
    real = kernel_check.check_op
    monkeypatch.setattr(
        kernel_check,
        "check_op",
        lambda op, device, dtype, **kw: calls.append((op, dtype)) or real(op, device, dtype, **kw),
    )
    return calls


def ours(caplog) -> list[str]:
    """Our warnings (bitsandbytes logs its own about optional CPU kernels)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("urae_lite") and r.levelno >= logging.WARNING]


def layer_with_lora(fmt: str = "nf4", k: int = 70, n: int = 50) -> AdaptedLinear:
    torch.manual_seed(0)
    layer = AdaptedLinear.from_linear(torch.nn.Linear(k, n), fmt, BF16).to(DEVICE)
    piece = layer.add_lora("style", 8)
    piece.B.data.normal_()  # a non-zero branch
    return layer


# ---- the op checks -------------------------------------------------------------------------------------------
def test_every_op_passes_within_its_bound_and_is_timed():
    """bf16 at the self-check's shapes here; tests/test_doctor.py sees all three dtypes pass at the odd ones."""
    for op in kernel_check.OPS:
        r = kernel_check.check_op(op, DEVICE, BF16)
        assert r.ok and r.message == "" and r.error <= r.bound, r
        assert r.bound == 0.0 if op.endswith("dequantize") else r.bound > 0
        assert [r.shape] == kernel_check.shapes(op, "self-check")
        assert r.fused_ms is None and r.reference_ms is None and r.time_ratio is None  # timed only when asked
    r = kernel_check.check_op("fp8_dequantize", DEVICE, BF16, repeats=2)
    assert r.fused_ms > 0 and r.reference_ms > 0 and r.time_ratio == r.fused_ms / r.reference_ms


@pytest.mark.parametrize("fault", ["wrong", "unwritten", "past the end", "raises"])
@pytest.mark.parametrize("op", kernel_check.OPS)
def test_each_fault_fails_the_check(op, fault, monkeypatch):
    module, name = LAUNCHERS[op]
    real = getattr(module, name)
    gemm = module is lowrank_gemm
    monkeypatch.setattr(module, name, out_of_shared_memory if fault == "raises" else faulty(real, fault, gemm))
    r = kernel_check.check_op(op, DEVICE, BF16)
    assert not r.ok, r
    expected = {
        "wrong": "differ from the reference" if op.endswith("dequantize") else "above their bound",
        "unwritten": "never written",
        "past the end": "wrote past the end",
        "raises": "OutOfResources: out of resource: shared memory",
    }[fault]
    assert expected in r.message


def test_the_float64_comparison_in_row_blocks_finds_the_worst_element(monkeypatch):
    """FLUX shapes are compared a few rows at a time; the verdict and the element it names do not change."""
    real = lowrank_gemm._launch_gemm

    def one_wrong(*args):
        real(*args)
        args[-1][31, 3] += 1.0

    shape = kernel_check.SMALL_GEMM
    monkeypatch.setattr(kernel_check, "_COMPARE_ELEMENTS", 7 * shape[2])  # blocks of 7 rows
    assert kernel_check.check_op("lowrank_forward", DEVICE, BF16, shape, seed=5).ok
    monkeypatch.setattr(lowrank_gemm, "_launch_gemm", one_wrong)
    r = kernel_check.check_op("lowrank_forward", DEVICE, BF16, shape, seed=5)
    assert not r.ok and r.message.startswith(f"1 of {shape[0] * shape[2]} elements above their bound, worst [31, 3]")
    assert r.error >= 0.99


# ---- the self-check in `auto` mode -------------------------------------------------------------------------------
def test_a_wrong_kernel_is_caught_and_bypassed(auto_here, monkeypatch, caplog, check_calls):
    """The fused GEMM returns values 1% off: its check fails, the layer runs the library path (bit for bit), one
    warning names the op and says to run doctor, and the verdict is cached."""
    from urae_lite import kernels

    monkeypatch.setattr(lowrank_gemm, "_launch_gemm", faulty(lowrank_gemm._launch_gemm, "wrong", gemm=True))
    fused_calls = []
    fused = kernels.adapted_linear
    monkeypatch.setattr(kernels, "adapted_linear", lambda *a: fused_calls.append(1) or fused(*a))
    layer = layer_with_lora()
    x = torch.randn(3, 5, 70, device=DEVICE, dtype=BF16)
    with caplog.at_level(logging.WARNING, logger="urae_lite"):
        y, y_again = layer(x), layer(x)
    assert torch.equal(y, layer.forward_reference(x, layer.bias, layer.branch(BF16)))
    assert torch.equal(y, y_again) and fused_calls == []
    assert sorted(check_calls) == [("lowrank_forward", BF16), ("nf4_dequantize", BF16)]  # once each, not per call
    warnings = ours(caplog)
    assert len(warnings) == 1
    assert "kernel lowrank_forward (bfloat16) failed its self-check" in warnings[0]
    assert "run `urae-lite doctor`" in warnings[0]
    stored = kernel_verdicts.cached(DEVICE)
    assert stored["lowrank_forward"]["bfloat16"]["ok"] is False and stored["nf4_dequantize"]["bfloat16"]["ok"] is True


def test_a_compile_error_is_bypassed_and_the_other_ops_keep_their_kernels(auto_here, monkeypatch, caplog):
    """NF4's dequantization raises Triton's out-of-shared-memory error: the base dequantizes through bitsandbytes,
    while the fused GEMM (whose check passes) still runs the layer, forward and backward."""
    from urae_lite import kernels

    raised = []

    def launch(*args):
        raised.append(1)
        out_of_shared_memory()

    monkeypatch.setattr(dequant, "_launch_nf4", launch)
    fused_calls = []
    fused = kernels.adapted_linear
    monkeypatch.setattr(kernels, "adapted_linear", lambda *a: fused_calls.append(1) or fused(*a))
    layer = layer_with_lora()
    x = torch.randn(3, 5, 70, device=DEVICE, dtype=BF16, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="urae_lite"):
        y = layer(x)
        y.float().square().sum().backward()
    assert raised == [1]  # only inside the check
    assert len(fused_calls) == 1 and x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(layer.base.dequantize(), layer.base.dequantize_reference())
    reference = layer.forward_reference(x.detach(), layer.bias, layer.branch(BF16))
    assert (y.detach().float() - reference.float()).norm() <= 2e-2 * reference.float().norm()
    warnings = ours(caplog)
    assert len(warnings) == 1 and "kernel nf4_dequantize (bfloat16) failed" in warnings[0]
    assert "OutOfResources" in warnings[0]
    stored = kernel_verdicts.cached(DEVICE)
    assert {op: v["bfloat16"]["ok"] for op, v in stored.items()} == {
        "nf4_dequantize": False,
        "lowrank_forward": True,
        "lowrank_backward": True,
    }


def test_the_verdict_is_cached_per_card_and_software(auto_here, monkeypatch, check_calls):
    t = torch.zeros(4, dtype=torch.uint8, device=DEVICE)
    assert kernel_switch.kernels_enabled(t, "fp8_dequantize", BF16)
    assert kernel_switch.kernels_enabled(t, "fp8_dequantize", BF16)
    assert check_calls == [("fp8_dequantize", BF16)]
    path = kernel_verdicts.verdict_path(kernel_verdicts.device_key(DEVICE))
    assert path.parent == auto_here / "kernel-checks" and path.is_file()

    kernel_verdicts.reset()  # as a new process: reads the file, does not check again
    assert kernel_switch.kernels_enabled(t, "fp8_dequantize", BF16)
    assert check_calls == [("fp8_dequantize", BF16)]
    assert kernel_switch.kernels_enabled(t, "fp8_dequantize", torch.float16)  # another dtype is another check
    assert check_calls[-1] == ("fp8_dequantize", torch.float16)

    monkeypatch.setattr(kernel_verdicts, "__version__", "99.0")  # another key: checked again, in its own file
    kernel_verdicts.reset()
    assert kernel_switch.kernels_enabled(t, "fp8_dequantize", BF16)
    assert len(check_calls) == 3
    assert len(list((auto_here / "kernel-checks").iterdir())) == 2


def test_a_cached_failure_is_honoured_without_checking_again(auto_here, monkeypatch, caplog):
    calls = []
    real = kernel_check.check_op

    def failing(op, device, dtype, **kw):
        calls.append(op)
        return dataclasses.replace(real(op, device, dtype, **kw), ok=False, message="injected")

    monkeypatch.setattr(kernel_check, "check_op", failing)
    t = torch.zeros(4, dtype=torch.uint8, device=DEVICE)
    assert not kernel_switch.kernels_enabled(t, "nf4_dequantize", BF16)
    kernel_verdicts.reset()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="urae_lite"):
        assert not kernel_switch.kernels_enabled(t, "nf4_dequantize", BF16)
    assert calls == ["nf4_dequantize"]
    assert ["injected" in m for m in ours(caplog)] == [True]  # warned again in the "new process"


def test_on_forces_the_kernels_and_off_never_runs_them(monkeypatch, tmp_path, check_calls):
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("URAE_LITE_CACHE", str(tmp_path))
    kernel_verdicts.reset()
    t = torch.zeros(4, device=DEVICE, dtype=BF16)
    monkeypatch.setenv("URAE_LITE_KERNELS", "on")
    assert all(kernel_switch.kernels_enabled(t, op) for op in kernel_check.OPS)
    monkeypatch.setenv("URAE_LITE_KERNELS", "off")
    assert not any(kernel_switch.kernels_enabled(t, op) for op in kernel_check.OPS)
    monkeypatch.setenv("URAE_LITE_KERNELS", "auto")
    assert not kernel_switch.kernels_enabled(torch.zeros(4, dtype=BF16), "lowrank_forward")  # auto: CUDA only
    monkeypatch.setattr(kernel_switch, "auto_runs_kernels", lambda device: True)
    assert not kernel_switch.kernels_enabled(t.double(), "lowrank_forward")  # no kernel computes in float64
    with FakeTensorMode():  # tracing: nothing real can run, so nothing is checked or remembered
        assert kernel_switch.kernels_enabled(t, "lowrank_forward")
    assert check_calls == [] and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unknown kernel op 'gemm'"):
        kernel_switch.kernels_enabled(t, "gemm")
    kernel_verdicts.reset()


def test_every_quantized_format_names_a_kernel_op():
    from urae_lite.quant import FORMATS

    assert {f.kernel_op for f in FORMATS.values() if f.kernel_op} <= set(kernel_check.OPS)
    assert all((f.kernel_op is None) == f.dense for f in FORMATS.values())
