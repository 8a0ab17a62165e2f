"""Where block swap puts a transformer's frozen bytes, phase by phase: the resident blocks and the window of swapped
blocks on the device, every swapped block's copy in pinned host memory.

urae_lite/block_swap.py swaps the LAST `blocks_to_swap` blocks in execution order. Entering a swapped block makes it
resident, prefetches the next one in the pass's direction and releases every other: the window is the running
block + its neighbour (a double and a single block where the kinds meet), and after a pass's last swapped block it
holds what that block left (`_next`: nothing more with grad, the first swapped block again without). Between passes
the window keeps that; moving the transformer off the device (model offload) empties it. So the window at a
phase's peak is the one held while the block kind with the most activations runs, not the two largest blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

from . import constants as C
from .activations import BLOCK_KINDS
from .arch import FluxArch

Window = frozenset[str]  # names of the swapped blocks with device copies
PASSES = {  # (runs last block first, grad on) of each pass over the blocks
    "inference": (False, False),  # a denoising or validation step
    "forward": (False, True),  # a checkpointed training forward
    "backward": (True, True),  # the checkpoint recomputes in backward
}


def swapped_blocks(arch: FluxArch, blocks_to_swap: int) -> tuple[str, ...]:
    """The names of the swapped blocks: the last `blocks_to_swap` in execution order."""
    names = arch.block_names()
    return names[len(names) - blocks_to_swap :] if blocks_to_swap else ()


@lru_cache(maxsize=1024)
def block_kind(name: str) -> str:
    """`single_transformer_blocks.3` -> `single` (activations.BLOCK_KINDS, in block_swap.BLOCK_LISTS order)."""
    from ..block_swap import BLOCK_LISTS

    return BLOCK_KINDS[BLOCK_LISTS.index(name.split(".")[0])]


def _prefetched(pos: int, n: int, backward: bool, grad: bool) -> int | None:
    """BlockSwap._next: the swapped block fetched while swapped block `pos` of `n` runs."""
    if backward:
        return pos - 1 if pos > 0 else None
    if pos + 1 < n:
        return pos + 1
    return None if grad or pos == 0 else 0


def pass_windows(names: tuple[str, ...], swapped: tuple[str, ...], kind: str, before: Window) -> tuple[dict, Window]:
    """The window while each block runs in one pass of `kind` (PASSES), and the window the pass leaves; `before`:
    the window the pass starts with (what resident blocks run beside until the first swapped block)."""
    backward, grad = PASSES[kind]
    position = {name: i for i, name in enumerate(swapped)}
    held, windows = before, {}
    for name in reversed(names) if backward else names:
        if name in position:
            nxt = _prefetched(position[name], len(swapped), backward, grad)
            held = frozenset((name,) if nxt is None else (name, swapped[nxt]))
        windows[name] = held
    return windows, held


@lru_cache(maxsize=256)
def steady_windows(
    names: tuple[str, ...], swapped: tuple[str, ...], passes: tuple[str, ...]
) -> tuple[tuple[dict[str, tuple[Window, ...]], Window], ...]:
    """(per block kind: the windows held while a block of it runs; the window left after) of each pass of a job
    that repeats `passes` (a generation's denoising steps; a training step and its validation), from the second
    round on: the first starts from an empty window, and every later one holds at least as much."""
    held: Window = frozenset()
    for _ in range(2):
        rounds = []
        for kind in passes:
            windows, held = pass_windows(names, swapped, kind, held)
            by_kind: dict[str, dict[Window, None]] = {}
            for name, window in windows.items():
                by_kind.setdefault(block_kind(name), {})[window] = None
            rounds.append(({k: tuple(w) for k, w in by_kind.items()}, held))
    return tuple(rounds)


@dataclass(frozen=True)
class Placement:
    """The transformer's bytes on the device at one moment, and the activations beside them."""

    weights: int  # the bf16 parameters outside the blocks + the resident blocks' and the window's quantized weights
    adapters: int  # the frozen adapter slices (bf16) of the same blocks
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.activations


@dataclass(frozen=True)
class SwapLayout:
    """What block swap moves, per block (quantized weights, frozen adapter slices), and which blocks it swaps; with
    none swapped, every block is resident."""

    names: tuple[str, ...]  # execution order
    swapped: tuple[str, ...]
    weights: dict[str, int]
    adapters: dict[str, int]
    other: int  # bf16 parameters outside the blocks: always resident

    @classmethod
    def of(cls, arch: FluxArch, quant: str, blocks_to_swap: int, frozen_rank: int) -> SwapLayout:
        """`frozen_rank`: total rank of the frozen adapter slices (0: none), streamed with their blocks."""
        adapters = {k: v * C.BF16 for k, v in arch.block_adapter_params(frozen_rank).items()}
        swapped = swapped_blocks(arch, blocks_to_swap)
        return cls(arch.block_names(), swapped, arch.block_weight_bytes(quant), adapters, arch.other_params * C.BF16)

    @property
    def host(self) -> int:
        """Pinned host bytes: every swapped block's copy."""
        return sum(self.weights[n] + self.adapters[n] for n in self.swapped)

    @cached_property
    def kinds(self) -> tuple[str, ...]:
        """The block kinds present (BLOCK_KINDS), in execution order."""
        return tuple(dict.fromkeys(block_kind(n) for n in self.names))

    @cached_property
    def _resident(self) -> tuple[int, int]:
        swapped = set(self.swapped)
        on = [n for n in self.names if n not in swapped]
        return sum(self.weights[n] for n in on), sum(self.adapters[n] for n in on)

    def held(self, window: Window, activations: int = 0) -> Placement:
        """The resident blocks and `window` on the device."""
        weights, adapters = self._resident
        return Placement(
            self.other + weights + sum(self.weights[n] for n in window),
            adapters + sum(self.adapters[n] for n in window),
            activations,
        )

    def rounds(self, *passes: str) -> tuple[tuple[dict[str, tuple[Window, ...]], Window], ...]:
        """steady_windows of a job repeating `passes` (PASSES keys)."""
        return steady_windows(self.names, self.swapped, passes)

    def peak(self, windows: dict[str, tuple[Window, ...]], activations: Callable[[str], int]) -> Placement:
        """A pass's worst moment (`windows`: a pass of `rounds`): for each block kind, its activations while one
        of its blocks runs (`activations(kind)`) beside the largest window held then; the kind where they add up
        to the most."""
        moments = []
        for kind, held in windows.items():
            window = max(held, key=lambda w: sum(self.weights[n] + self.adapters[n] for n in w))
            moments.append(self.held(window, activations(kind)))
        return max(moments, key=lambda p: p.total)


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
