"""`URAE_LITE_KERNELS`: whether the fused Triton kernels or the libraries' PyTorch code run an op on a tensor.

The one owner of the switch: the quantized bases (urae_lite.quant) and the adapted linears (urae_lite.adapted_linear)
both ask `kernels_enabled` for the op they are about to run. In `auto` mode a CUDA op runs its kernel only once the
kernel has passed its self-check on that card (urae_lite.kernel_verdicts): an op that failed, or did not compile,
runs through PyTorch instead while the other ops keep their kernels.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from . import kernel_verdicts
from .errors import UraeError
from .kernel_check import OPS as KERNEL_OPS

logger = logging.getLogger(__name__)

KERNELS_ENV = "URAE_LITE_KERNELS"
KERNEL_MODES = ("auto", "off", "on")


def kernels_mode() -> str:
    """`URAE_LITE_KERNELS`: `auto` (default; also `1`) runs the Triton kernels for CUDA tensors once each has passed
    its self-check, `off` (or `0`) never, `on` for every tensor without a check (on the CPU that needs
    TRITON_INTERPRET=1: Triton's interpreter, for checking)."""
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower()
    mode = {"1": "auto", "0": "off"}.get(value, value)
    if mode not in KERNEL_MODES:
        raise UraeError(f"{KERNELS_ENV}={value} is not one of {', '.join(KERNEL_MODES)}")
    return mode


@functools.cache
def triton_available() -> bool:
    """Triton installs on Linux only; elsewhere the libraries' PyTorch paths run, and we say so once."""
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.warning(
            "Triton is not installed (it ships for Linux only): the adapted linears run through "
            "PyTorch (bitsandbytes / optimum-quanto dequantization + F.linear), with the same results "
            "up to rounding"
        )
        return False
    return True


def auto_runs_kernels(device: torch.device) -> bool:
    """Whether `auto` mode considers the kernels for tensors on `device`: CUDA only (on the CPU Triton can only
    interpret them, far slower than the libraries' code)."""
    return device.type == "cuda"


def kernels_enabled(t: torch.Tensor, op: str, dtype: torch.dtype | None = None) -> bool:
    """Whether kernel `op` (one of KERNEL_OPS) runs for `t`, computing in `dtype` (default `t.dtype`): see
    `kernels_mode`; the libraries' code runs otherwise."""
    if op not in KERNEL_OPS:
        raise ValueError(f"unknown kernel op {op!r}: one of {', '.join(KERNEL_OPS)}")
    mode = kernels_mode()
    if mode == "off" or (mode == "auto" and not auto_runs_kernels(t.device)) or not triton_available():
        return False
    return mode == "on" or kernel_verdicts.passed(t.device, op, dtype or t.dtype)
