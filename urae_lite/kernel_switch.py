"""`URAE_LITE_KERNELS`: whether the fused Triton kernels or the libraries' PyTorch code run a tensor's layer.

The one owner of the switch: the quantized bases (urae_lite.quant) and the adapted linears (urae_lite.adapted_linear)
both ask `kernels_enabled`, so a layer never mixes a kernel dequantization with a library matmul by accident.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .errors import UraeError

logger = logging.getLogger(__name__)

KERNELS_ENV = "URAE_LITE_KERNELS"
KERNEL_MODES = ("auto", "off", "on")


def kernels_mode() -> str:
    """`URAE_LITE_KERNELS`: `auto` (default; also `1`) runs the Triton kernels for CUDA tensors, `off` (or `0`)
    never, `on` for every tensor (on the CPU that needs TRITON_INTERPRET=1: Triton's interpreter, for checking)."""
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


def kernels_enabled(t: torch.Tensor) -> bool:
    """Whether the fused Triton path runs for `t` (see `kernels_mode`); the libraries' code runs otherwise."""
    mode = kernels_mode()
    if mode == "off" or (mode == "auto" and not t.is_cuda):
        return False
    return triton_available()
