"""Where block swap puts a transformer's frozen bytes, phase by phase: the resident blocks and the window of swapped
blocks on the device, every swapped block's copy in pinned host memory.

urae_lite/block_swap.py swaps the LAST `blocks_to_swap` blocks in execution order. Entering a swapped block makes it
resident, prefetches the swapped block entered next and releases every other: the window is the running block +
the next one. Which one is next follows the order blocks are entered in (`pass_entries`): up in a forward, down in
a checkpointed backward, where checkpoint segments (`checkpoint_every` k >= 2) first replay the blocks from the
segment's kept input (block_swap.backward_entries), so the window may pair a block with one that is not its
neighbour (a recomputed segment start with the start of the segment below). After a pass's last swapped block the
window holds what that block left: with grad, the backward's first swapped block; without, the first swapped block
again (the next pass). Between passes the window keeps that; moving the transformer off the device (model offload)
empties it. So the window at a phase's peak is the one held while the block kind with the most activations runs,
not the two largest blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

from . import constants as C
from .activations import BLOCK_KINDS
from .arch import FluxArch

Window = frozenset[str]  # names of the swapped blocks with device copies
PASSES = ("inference", "forward", "backward")  # a denoising or validation step; a checkpointed training forward;
# its backward (the checkpoint recomputes, and the segment replays with checkpoint_every >= 2)


def swapped_blocks(arch: FluxArch, blocks_to_swap: int) -> tuple[str, ...]:
    """The names of the swapped blocks: the last `blocks_to_swap` in execution order."""
    names = arch.block_names()
    return names[len(names) - blocks_to_swap :] if blocks_to_swap else ()


@lru_cache(maxsize=1024)
def block_kind(name: str) -> str:
    """`single_transformer_blocks.3` -> `single` (activations.BLOCK_KINDS, in block_swap.BLOCK_LISTS order)."""
    from ..block_swap import BLOCK_LISTS

    return BLOCK_KINDS[BLOCK_LISTS.index(name.split(".")[0])]


@lru_cache(maxsize=256)
def pass_entries(n_blocks: int, kind: str, every: int = 1) -> tuple[int, ...]:
    """The blocks (indices in execution order) entered in one pass of `kind` (PASSES), in order; `every`: the
    checkpoint segments' length in a training step (block_swap.backward_entries)."""
    from ..block_swap import backward_entries

    if kind == "backward":
        return tuple(g for g, _ in backward_entries(n_blocks, every))
    return tuple(range(n_blocks))


def pass_windows(
    names: tuple[str, ...], swapped: tuple[str, ...], kind: str, before: Window, every: int = 1
) -> tuple[list[tuple[str, Window]], Window]:
    """The window while each block runs in one pass of `kind` (PASSES): (block, window) per block entry, in order,
    and the window the pass leaves; `before`: the window the pass starts with (what resident blocks run beside
    until the first swapped block). Mirrors BlockSwap._enter: the window is the running swapped block and the
    swapped block entered after it."""
    position = {name: i for i, name in enumerate(swapped)}
    entries = [names[g] for g in pass_entries(len(names), kind, every)]
    order = [name for name in entries if name in position]
    if kind == "forward":  # after the last block, the backward's first swapped block
        first = [names[g] for g in pass_entries(len(names), "backward", every) if names[g] in position][:1]
        after = first[0] if first else None
    elif kind == "inference":  # the next pass's first swapped block (none when it is the only one left)
        after = order[0] if len(order) > 1 else None
    else:
        after = None
    following = dict(zip(range(len(order)), [*order[1:], after]))
    held, windows, seen = before, [], 0
    for name in entries:
        if name in position:
            nxt = following[seen]
            seen += 1
            held = frozenset((name,) if nxt is None or nxt == name else (name, nxt))
        windows.append((name, held))
    return windows, held


@lru_cache(maxsize=256)
def steady_windows(
    names: tuple[str, ...], swapped: tuple[str, ...], passes: tuple[str, ...], every: int = 1
) -> tuple[tuple[dict[str, tuple[Window, ...]], Window], ...]:
    """(per block kind: the windows held while a block of it runs; the window left after) of each pass of a job
    that repeats `passes` (a generation's denoising steps; a training step and its validation), from the second
    round on: the first starts from an empty window, and every later one holds at least as much."""
    held: Window = frozenset()
    for _ in range(2):
        rounds = []
        for kind in passes:
            windows, held = pass_windows(names, swapped, kind, held, every)
            by_kind: dict[str, dict[Window, None]] = {}
            for name, window in windows:
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
    every: int = 1  # checkpoint segments' length in training (the backward's block order)

    @classmethod
    def of(cls, arch: FluxArch, quant: str, blocks_to_swap: int, frozen_rank: int, every: int = 1) -> SwapLayout:
        """`frozen_rank`: total rank of the frozen adapter slices (0: none), streamed with their blocks; `every`:
        memory.checkpoint_every of a training job."""
        adapters = {k: v * C.BF16 for k, v in arch.block_adapter_params(frozen_rank).items()}
        swapped = swapped_blocks(arch, blocks_to_swap)
        weights = arch.block_weight_bytes(quant)
        return cls(arch.block_names(), swapped, weights, adapters, arch.other_params * C.BF16, every)

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
        """steady_windows of a job repeating `passes` (PASSES)."""
        return steady_windows(self.names, self.swapped, passes, self.every)

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
