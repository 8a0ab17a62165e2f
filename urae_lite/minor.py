"""URAE minor-component adapters: the r smallest singular triplets of W initialise the trainable factors.

The authors rewrite the base as W − B0·A0 and train (B', A') from (B0, A0): W_eff = W − B0·A0 + B'·A'.
We keep the base as Q(W), the quantized *original* weight, and put −B0·A0 into the branch as a frozen slice:

    W_eff = Q(W) + B'·A' − B0·A0

Both equal W − B0·A0 + B'·A' exactly in real arithmetic; they differ only by Q(W) − Q(W − B0·A0), i.e. by how the
quantizer rounds two weights that differ by the *smallest* rank-r part of W (‖B0·A0‖₂ = σ_{K-r}, tiny next to
‖W‖₂), which is at the level of the quantization error itself. In exchange the quantized base stays the plain
base model, shareable between the 2K LoRA, the 4K adapter, other LoRAs and a `prepare`d checkpoint, and the
residual never has to be re-quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapted_linear import AdaptedLinear

MINOR_SLICE = "urae_minor"
MINOR_RESIDUAL_SLICE = "urae_minor_residual"


@dataclass
class MinorSpec:
    """Minor-component adapter to initialise from each target's full-precision weight while streaming."""

    rank: int = 16
    targets: str = "authors"
    trainable: bool = True
    svd_device: str | None = None


def minor_components(
    weight: torch.Tensor, rank: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0 (N, r), A0 (r, K)) from the r smallest singular triplets of `weight`, SVD in fp32.

    B0 = U[:, -r:]·sqrt(S[-r:]),  A0 = sqrt(S[-r:])·Vh[-r:, :]  (docs/method.md).
    """
    w = weight.detach().to(device or weight.device, torch.float32)
    if not 0 < rank <= min(w.shape):
        raise ValueError(f"minor rank {rank} must be in 1..{min(w.shape)} for a {tuple(w.shape)} weight")
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = S[-rank:].sqrt()
    return (U[:, -rank:] * root).cpu(), (root[:, None] * Vh[-rank:, :]).cpu()


def add_minor_slices(
    module: AdaptedLinear,
    A0: torch.Tensor,
    B0: torch.Tensor,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    trainable: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Attach (B', A') (default: initialised to (B0, A0)) and the frozen residual slice (−B0, A0)."""
    module.add_slice(MINOR_SLICE, A0 if A is None else A, B0 if B is None else B, trainable=trainable, dtype=dtype)
    module.add_slice(MINOR_RESIDUAL_SLICE, A0, -B0, trainable=False, dtype=dtype)
