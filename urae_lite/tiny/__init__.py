"""Offline stand-ins for FLUX.1: a tiny complete pipeline folder and random full-size checkpoints.

Tests and benchmarks never download weights. Two tools cover what they need:

* ``build_tiny_flux`` writes a complete FLUX.1-dev/-schnell folder in diffusers layout (transformer, VAE,
  CLIP and T5 encoders, both tokenizers, scheduler) with the real architecture *shapes of interfaces*
  (16 latent channels, 8x VAE, 2x2 packing, guidance input) but tiny widths, so a 1024² generation
  runs in seconds on a laptop CPU. ``--model tiny`` on the CLI resolves to ``tiny_flux_path()``.
* ``write_random_transformer`` / ``iter_random_transformer_tensors`` produce random weights for any
  ``FluxTransformer2DModel`` config, including the full 11.9 B FLUX.1-dev one (``urae_lite.flux_configs``), one
  tensor at a time: memory and speed do not depend on weight values, so benchmarks can measure the real architecture.

Everything is deterministic from a seed, and folders are written atomically (built beside the target,
then renamed), so an interrupted build never leaves a half-written model that a later run would trust.

Modules: ``configs`` (tiny shapes), ``weights`` (random transformer tensors and folders), ``tokenizers`` (CLIP and
T5 tokenizers built offline), ``folders`` (atomic folder writes), ``build`` (the pipeline folder and its cache).
"""

from __future__ import annotations

from ..flux_configs import VARIANTS, flux_dev_config
from .build import FORMAT_VERSION, MARKER_NAME, build_tiny_flux, tiny_flux_path
from .configs import tiny_transformer_config
from .weights import iter_random_transformer_tensors, write_random_transformer

__all__ = [
    "FORMAT_VERSION",
    "MARKER_NAME",
    "VARIANTS",
    "build_tiny_flux",
    "flux_dev_config",
    "iter_random_transformer_tensors",
    "tiny_flux_path",
    "tiny_transformer_config",
    "write_random_transformer",
]
