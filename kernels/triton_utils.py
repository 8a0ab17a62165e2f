"""What every kernel shares: the interpreter switch, exact fp32 -> storage-dtype rounding, launch checks and the
device guard."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


# Triton picks interpreter or compiler when a kernel is *decorated* (at module import), so ask the decorator what
# it did (works across Triton versions); every launcher and config list follows this one answer.
_INTERPRET: bool = not isinstance(_probe, triton.runtime.jit.JITFunction)


def interpreting() -> bool:
    """True when this package's kernels were built for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


def check_launchable(*tensors: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter takes any device (it copies to the host)."""
    if not _INTERPRET and not all(t.is_cuda for t in tensors):
        raise RuntimeError("urae_lite.kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` current for a launch: Triton launches on the current CUDA device, not the tensors', so
    `--device cuda:1` would otherwise run on GPU 0 with pointers into GPU 1. A no-op off CUDA (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """Round fp32 `x` to `dtype` to nearest-even.

    bf16 is rounded on the bit pattern: the Triton interpreter truncates fp32 -> bf16, and this keeps the
    interpreter and the GPU (whose cvt.rn gives the same bits) identical, which the bit-exact tests rely on.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN (the carry could turn it into inf)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
