"""Where block swap puts a transformer's frozen bytes: resident blocks and a two-block window on the device, the
swapped blocks in pinned host memory (urae_lite/block_swap.py swaps the LAST `blocks_to_swap` blocks in execution
order and keeps the running and the prefetched block on the device)."""

from __future__ import annotations

from dataclasses import dataclass

from .arch import FluxArch

WINDOW = 2  # the running block + the one being prefetched on the side stream


@dataclass(frozen=True)
class SwapSplit:
    """Bytes of one per-block quantity (weights, or frozen adapter factors) on each side."""

    device: int  # resident blocks + the window
    host: int  # every swapped block's copy in pinned host memory


def swapped_blocks(arch: FluxArch, blocks_to_swap: int) -> tuple[str, ...]:
    """The names of the swapped blocks: the last `blocks_to_swap` in execution order."""
    names = arch.block_names()
    return names[len(names) - blocks_to_swap :] if blocks_to_swap else ()


def split(per_block: dict[str, int], swapped: tuple[str, ...]) -> SwapSplit:
    """Device and host bytes of `per_block` when `swapped` blocks stream through a window of WINDOW blocks."""
    resident = sum(v for name, v in per_block.items() if name not in swapped)
    window = sum(sorted((per_block[name] for name in swapped), reverse=True)[:WINDOW])
    return SwapSplit(resident + window, sum(per_block[name] for name in swapped))


def transfer_seconds(
    arch: FluxArch,
    quant: str,
    frozen_rank: int,
    blocks_to_swap: int,
    bandwidth: float,
    compute: dict[str, float],
    passes: tuple[float, ...],
) -> float:
    """Copy time not hidden behind compute, over one step's passes: each swapped block is fetched once per pass
    while the previous block computes (`passes`: the compute of one pass over a block, as a multiple of its
    forward, e.g. (1,) for a denoising step, (1, 3) for a checkpointed training step: the forward, then the
    recompute and backward)."""
    names = arch.block_names()
    swapped = set(swapped_blocks(arch, blocks_to_swap))
    weights = arch.block_weight_bytes(quant)
    adapters = arch.block_adapter_params(frozen_rank) if frozen_rank else dict.fromkeys(names, 0)
    stall = 0.0
    for i, name in enumerate(names):
        if name not in swapped:
            continue
        copy = (weights[name] + 2 * adapters[name]) / bandwidth
        previous = compute[names[i - 1]] if i else compute[names[-1]]
        stall += sum(max(0.0, copy - k * previous) for k in passes)
    return stall
