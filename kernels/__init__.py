"""Triton kernels (installed as urae_lite.kernels), each beside a plain-PyTorch reference.

* dequant.py      -- NF4 (bitsandbytes) and FP8 (quanto) base weights -> dense bf16, bit-exact with the libraries.
* lowrank_gemm.py -- GEMM with the adapter up-projection and bias folded into the accumulator (fwd and dx).
* autograd.py     -- `adapted_linear`: the frozen base re-dequantized in backward instead of saved.
* reference.py    -- the same maths in plain PyTorch, for tests.

Kernels are compiled for CUDA, or simulated on the CPU when TRITON_INTERPRET=1 is set before this import.
"""

from .autograd import AdaptedLinearFunction, adapted_linear
from .dequant import fp8_dequantize, nf4_dequantize
from .lowrank_gemm import lowrank_forward
from .triton_utils import interpreting

__all__ = [
    "AdaptedLinearFunction",
    "adapted_linear",
    "fp8_dequantize",
    "interpreting",
    "lowrank_forward",
    "nf4_dequantize",
]
