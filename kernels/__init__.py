"""Triton kernels (installed as urae_lite.kernels), each beside a plain-PyTorch reference."""
