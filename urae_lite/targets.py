"""Which FLUX linears are quantized and which carry adapters.

Every nn.Linear inside the 19 double and 38 single blocks (494 in FLUX.1-dev) gets a quantized base; the
embedders and the output projection outside the blocks stay bf16, as in diffusers' NF4 recipes.
Adapters go on the authors' targets by default (190 attention projections, docs/method.md), or on every block linear.
"""

from __future__ import annotations

import re

from torch import nn

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
AUTHOR_TARGETS = re.compile(
    r"^(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))$"
)
TARGET_CHOICES = ("authors", "all")


def is_block_linear_name(name: str) -> bool:
    return name.startswith(BLOCK_PREFIXES)


def block_linear_names(model: nn.Module) -> list[str]:
    """Names of the linears that get a quantized base (works on meta-device models too)."""
    from .adapted_linear import AdaptedLinear

    return [
        n for n, m in model.named_modules() if isinstance(m, (nn.Linear, AdaptedLinear)) and is_block_linear_name(n)
    ]


def is_adapter_target(name: str, targets: str = "authors") -> bool:
    if targets not in TARGET_CHOICES:
        raise ValueError(f"unknown adapter targets '{targets}': use one of {', '.join(TARGET_CHOICES)}")
    return is_block_linear_name(name) if targets == "all" else AUTHOR_TARGETS.match(name) is not None


def adapter_target_names(model: nn.Module, targets: str = "authors") -> list[str]:
    return [n for n in block_linear_names(model) if is_adapter_target(n, targets)]
