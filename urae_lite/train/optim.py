"""Optimizer and LR schedule from the recipe's `_component_` sections.

The authors' setting is Prodigy (lr 1.0, wd 1e-4, decoupled, bias correction, safeguard warmup) with a constant
LR. `bitsandbytes.optim.AdamW8bit` keeps two 8-bit states per parameter instead of Prodigy's four fp32 ones;
with 190 rank-16 adapters that is 19 MiB against 300 MiB, which matters little next to activations, so Prodigy
stays the default. bitsandbytes 0.50 runs AdamW8bit on CPU as well, so tests use the same optimizer as a GPU run;
tensors under its `min_8bit_size` (4096 values) keep fp32 states, so the tiny test model's factors (512 values)
take the 8-bit path only with `min_8bit_size: 0`.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable

import torch

from .config import TrainConfig, instantiate


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """LR ramps linearly over `warmup_steps`, then stays at the optimizer's lr (the authors': no warmup)."""
    warmup = int(warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))


def build_optimizer(
    cfg: TrainConfig, params: Iterable[torch.nn.Parameter]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    with contextlib.redirect_stdout(io.StringIO()):  # Prodigy prints a note ("Using decoupled weight decay")
        optimizer = instantiate(cfg.optimizer, list(params))
    return optimizer, instantiate(cfg.lr_scheduler, optimizer)
