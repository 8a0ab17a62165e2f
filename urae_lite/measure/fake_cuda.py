"""What a GPU run allocates that the same code on fake CPU tensors would not, reproduced in the measuring harness.

The memory planner models the CUDA path; fake CUDA tensors fail in backward, so the fake runs (measure/fake.py) use
fake CPU tensors and this module makes them allocate what CUDA would. Nothing here changes library code: the
harness wraps calls from the outside, only while it measures.

* Autocast. Training and validation run under `torch.autocast(device.type)`, i.e. CPU autocast here. CUDA
  autocast's op lists (aten/src/ATen/autocast_mode.h, AT_FORALL_FP32) run `layer_norm`, `group_norm` and
  `rms_norm` in fp32 (inputs cast up, fp32 outputs); CPU autocast has no policy for them and keeps bf16. CPU
  autocast's `promote` policy for `cat` and `stack` copies narrower inputs to the widest dtype first; CUDA
  autocast has no policy for them (torch promotes while writing the output). The
  other differences of the two lists (CUDA-only fp32 policies for elementwise math, softmax and reductions;
  CPU-only ones for FFTs and linear algebra) are not reached with bf16 inputs by the measured code; the harness
  refuses the common ones rather than measure something the GPU would not run.
* RMSNorm. On CUDA `torch.rms_norm` with matching input and weight dtypes is one fused kernel
  (`aten::_fused_rms_norm`: the output and a per-row rstd; backward keeps the input and rstd). On CPU the same
  call decomposes into pow / mean / rsqrt / mul with fp32 temporaries and other saved tensors.
* Flash attention's backward. CUDA's flash-attention 2 backward accumulates dq in an fp32 buffer the size of q
  (`dq_accum`), allocated when the output's gradient arrives and freed with the kernel; the CPU flash kernel has
  none. While measuring, SDPA calls that will run a backward get that buffer from the moment the output's gradient
  arrives until q's gradient is out (`_flash_dq_accumulator`).
* Dequantization workspace. The kernels (urae_lite.kernels.autograd) keep one buffer per device, grown to the
  largest quantized layer and held from the first call on; traced calls (fake tensors) get a fresh buffer per
  call instead, so that a fake buffer never reaches a real call. While measuring, fake calls use the held buffer
  like real ones; `forget_fake_workspaces` drops it afterwards.
* `save_on_cpu`: the saved tensors of offloaded checkpoints go to host memory on a GPU; on a CPU the real
  context manager keeps the device tensors themselves (`host_saved_tensors`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .live_bytes import HOST

# CUDA autocast's fp32 ops that CPU autocast leaves alone, besides the norms: if measured code calls one of them
# on a low-precision tensor under autocast, the GPU would compute it in fp32 and this harness does not.
_UNEMULATED = {
    torch.exp,
    torch.log,
    torch.pow,
    torch.rsqrt,
    torch.softmax,
    torch.log_softmax,
    torch.sum,
    torch.cumsum,
    F.softmax,
    F.log_softmax,
    F.softplus,
    F.normalize,
    F.cosine_similarity,
    torch.Tensor.exp,
    torch.Tensor.log,
    torch.Tensor.pow,
    torch.Tensor.__pow__,
    torch.Tensor.rsqrt,
    torch.Tensor.softmax,
    torch.Tensor.log_softmax,
    torch.Tensor.sum,
    torch.Tensor.cumsum,
}


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu")


def _low_precision(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16)


def _to_fp32(tree):
    """CUDA autocast's fp32 policy: every bf16 / fp16 tensor argument cast to fp32 (autograd sees the cast)."""
    return tree_map(lambda x: x.float() if _low_precision(x) else x, tree)


def _fp32_under_autocast(norm):
    """`norm` as CUDA autocast runs it: in fp32 when autocast is on."""

    @functools.wraps(norm)
    def run(*args, **kwargs):
        if not _autocast_on():
            return norm(*args, **kwargs)
        args, kwargs = _to_fp32((args, kwargs))
        with torch.autocast("cpu", enabled=False):
            return norm(*args, **kwargs)

    return run


def _native_promotion(op):
    """`op` (cat, stack) without CPU autocast's `promote` policy, which casts every input to the widest dtype first
    (a full copy of each narrower input); CUDA autocast has no policy for them and torch promotes while copying
    into the output."""

    @functools.wraps(op)
    def run(*args, **kwargs):
        if not _autocast_on():
            return op(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return op(*args, **kwargs)

    return run


def _flash_dq_accumulator(sdpa):
    """`F.scaled_dot_product_attention` plus CUDA flash attention's fp32 dq accumulator during its backward. The
    hooks capture q's shape only: a reference to q would keep it alive where checkpointing frees it."""

    @functools.wraps(sdpa)
    def run(query, key, value, *args, **kwargs):
        out = sdpa(query, key, value, *args, **kwargs)
        if torch.is_grad_enabled() and out.requires_grad and query.requires_grad:
            shape, device, held = query.shape, query.device, []
            out.register_hook(lambda grad: held.append(torch.empty(shape, dtype=torch.float32, device=device)))
            query.register_hook(lambda grad: held.clear())
        return out

    return run


class _FusedRMSNorm(torch.autograd.Function):
    """`aten::_fused_rms_norm` as its CUDA kernel allocates: the output and rstd (fp32, one per row); backward
    keeps the input, the weight and rstd, and returns the input and weight gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, dims: int) -> torch.Tensor:
        rstd = x.new_empty(x.shape[: x.dim() - dims] + (1,) * dims, dtype=torch.float32)
        ctx.save_for_backward(x, weight, rstd)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, _ = ctx.saved_tensors
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dw = torch.empty_like(weight) if weight is not None and ctx.needs_input_grad[1] else None
        return dx, dw, None


def _fused_rms_norm(composite):
    """`F.rms_norm` as on CUDA: fp32 under autocast, then the fused kernel's allocations (fake tensors only: the
    emulation computes no values) unless the dtypes differ (torch's own fallback to the composite)."""

    @functools.wraps(composite)
    def run(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None, eps=None):
        if _autocast_on():
            x, weight = _to_fp32((x, weight))
        if not isinstance(x, FakeTensor) or (weight is not None and weight.dtype != x.dtype):
            return composite(x, normalized_shape, weight, eps)  # real data; or torch's own mixed-dtype fallback
        dims = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
        with torch.autocast("cpu", enabled=False):
            return _FusedRMSNorm.apply(x, weight, dims)

    return run


class _RefuseUnemulated(TorchFunctionMode):
    """Stops a measurement that reaches a CUDA-only fp32 autocast op this harness does not reproduce."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _UNEMULATED and _autocast_on() and any(_low_precision(a) for a in args):
            raise NotImplementedError(
                f"{getattr(func, '__name__', func)} on a low-precision tensor under "
                "autocast: CUDA runs it in fp32, the fake harness does not emulate that"
            )
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """The norms, cat, stack and SDPA's backward as CUDA runs them. The functions are replaced where the code looks
    them up per call (torch.nn.functional's and torch's attributes), not in a TorchFunctionMode: torch runs a mode's
    calls with the mode off, so `loss.backward()` would recompute checkpointed blocks without it."""
    real = {(F, name): getattr(F, name) for name in ("layer_norm", "group_norm", "rms_norm")}
    real |= {(torch, name): getattr(torch, name) for name in ("cat", "stack")}
    real[F, "scaled_dot_product_attention"] = F.scaled_dot_product_attention
    F.layer_norm = _fp32_under_autocast(real[F, "layer_norm"])
    F.group_norm = _fp32_under_autocast(real[F, "group_norm"])
    F.rms_norm = _fused_rms_norm(real[F, "rms_norm"])
    torch.cat = _native_promotion(real[torch, "cat"])
    torch.stack = _native_promotion(real[torch, "stack"])
    F.scaled_dot_product_attention = _flash_dq_accumulator(real[F, "scaled_dot_product_attention"])
    try:
        with _RefuseUnemulated():
            yield
    finally:
        for (module, name), fn in real.items():
            setattr(module, name, fn)


@contextlib.contextmanager
def held_kernel_workspaces() -> Iterator[None]:
    """Fake calls of the kernels use the per-device held dequantization buffer, as real calls do."""
    try:
        from urae_lite.kernels import autograd
    except ImportError:
        yield
        return
    real = autograd._tracing
    autograd._tracing = lambda t: torch.compiler.is_compiling()
    try:
        yield
    finally:
        autograd._tracing = real
        forget_fake_workspaces()


def forget_fake_workspaces() -> None:
    """Drop fake buffers from the kernels' global cache, so later real calls never see them."""
    try:
        from urae_lite.kernels import autograd
    except ImportError:
        return
    for key, buf in list(getattr(autograd, "_workspaces", {}).items()):
        if isinstance(buf, FakeTensor):
            autograd._workspaces.pop(key, None)


def kernel_workspaces() -> list[torch.Tensor]:
    """The kernels' held dequantization buffers (none before the first quantized call, or without kernels)."""
    try:
        from urae_lite.kernels import autograd
    except ImportError:
        return []
    return list(getattr(autograd, "_workspaces", {}).values())


@contextlib.contextmanager
def host_saved_tensors() -> Iterator[None]:
    """`torch.autograd.graph.save_on_cpu` as on a GPU: saved tensors live in (uncounted) host memory and come back
    as new device tensors in backward. On a CPU the real one would keep the device tensors themselves."""

    @contextlib.contextmanager
    def save_on_host(pin_memory: bool = False, device_type: str = "cuda"):
        def pack(t: torch.Tensor):
            return t.device, t.to(HOST)

        def unpack(packed):
            device, t = packed
            return t.to(device)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    real = torch.autograd.graph.save_on_cpu
    torch.autograd.graph.save_on_cpu = save_on_host
    try:
        yield
    finally:
        torch.autograd.graph.save_on_cpu = real


@contextlib.contextmanager
def cuda_like() -> Iterator[None]:
    """Everything above at once: run the measured phases inside it."""
    with held_kernel_workspaces(), host_saved_tensors(), cuda_autocast_policy():
        yield
