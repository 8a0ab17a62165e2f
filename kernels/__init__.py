"""Triton kernels (installed as urae_lite.kernels), each beside a plain-PyTorch reference.

* dequant.py      -- NF4 (bitsandbytes) and FP8 (quanto) base weights -> dense bf16, bit-exact with the libraries.
* lowrank_gemm.py -- GEMM with the adapter up-projection and bias folded into the accumulator (fwd and dx),
                     autotuned among the tiles that fit the device's shared memory, any stacked rank.
* autograd.py     -- `adapted_linear`: the frozen base re-dequantized in backward instead of saved.
* reference.py    -- the same maths in plain PyTorch, for tests.

Every launch is a torch.library custom op (`torch.ops.urae_lite.*`, registered on import) with a fake
implementation, so FakeTensorMode and torch.compile trace through the kernels; each launch runs on its tensors'
GPU. Kernels are compiled for CUDA, or simulated on the CPU when TRITON_INTERPRET=1 is set before this import.
"""

import importlib
import sys
from types import ModuleType


def _canonical_package() -> ModuleType | None:
    """urae_lite.kernels when this folder is being imported under another name, else None.

    transformers probes for the PyPI package `kernels` by importing it, which finds this folder whenever a
    checkout root is on sys.path; running it a second time would register every torch.ops.urae_lite op again
    (silently taking them over) and duplicate every Triton kernel and autotune cache."""
    if __name__ == "urae_lite.kernels":
        return None
    try:
        return importlib.import_module("urae_lite.kernels")
    except ImportError:  # nothing to defer to: this copy is the only one
        return None


if (_canonical := _canonical_package()) is not None:
    sys.modules[__name__] = _canonical  # the importer receives the one real package
else:
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
