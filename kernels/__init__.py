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

if __name__ != "urae_lite.kernels":
    # Imported under another name: a checkout root on sys.path makes this folder importable as the top-level
    # `kernels`, the name of an unrelated PyPI package that libraries probe for. What the importer gets is an empty
    # module without a file or version, which every probe reads as "not installed": transformers (it imports the
    # package when no metadata names it, and counts a module without `__file__` as absent; an ImportError here
    # would escape its probe and break `import transformers`), bitsandbytes (`from kernels import get_kernel` fails
    # as without the package) and diffusers (metadata only). Nothing of urae_lite is registered a second time.
    import sys as _sys
    from importlib.machinery import ModuleSpec as _ModuleSpec
    from types import ModuleType as _ModuleType

    _absent = _ModuleType(__name__, "urae_lite's kernel folder, not the `kernels` package")
    _absent.__spec__ = _ModuleSpec(__name__, None)  # importlib.util.find_spec reads it (None would raise)
    _sys.modules[__name__] = _absent
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
