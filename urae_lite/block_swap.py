"""Block swap: the last N transformer blocks keep their frozen weights in host memory and visit the device one at a
time, so a transformer larger than the GPU still generates and trains, at the price of host-to-device copies.

What moves: every *frozen* tensor of a swapped block (the quantized base buffers, biases, norm weights, frozen
adapter slices). The host copies are the same packed tensors (pinned when the device is CUDA, at their exact size:
urae_lite/pinned.py), never re-quantized, so results are bit-identical to running without swap. Trainable factors
stay on the device: the optimizer keeps pointing at the same Parameter objects, and their gradients never leave the
device.

The window: entering a swapped block (forward pre-hook) makes it resident, releases every other swapped block
(its tensors point at the host copies again; Parameters keep their identity because only `.data` changes), and
prefetches the swapped block entered next on a side CUDA stream, so the copy overlaps the block's compute. Which
block comes next depends on the pass: a forward runs blocks 0 -> N-1; a checkpointed backward recomputes them
N-1 -> 0, and with checkpoint segments (`memory.checkpoint_every` k >= 2) it first replays, without grad, the
blocks from the segment's kept input up to the one it recomputes (`backward_entries`: the order is fixed by
train/checkpoint_segments.py). A block is released only when another swapped block is entered, never after its
own forward: its recompute and backward read the weights again. Device memory for the transformer: the resident
blocks + 2 swapped blocks.

Why the window stays two blocks on a GPU: the prefetch copies are allocated from the compute stream's pool (the
side stream first waits for the compute stream, whose earlier work may still read memory it freed), and a copy is
freed only after the compute stream waited for it (when the block runs, or when an unused prefetch is released).
The caching allocator can then hand freed copies to the next block at once, in stream order, however far the CPU
runs ahead. Copies made on the side stream and freed with `record_stream` would stay reserved until the GPU caught
up: one more block per block the CPU is ahead.

Training needs gradient checkpointing: without it the backward pass would read swapped weights (norm weights saved
for backward, the quantized bases the linears dequantize again) after the window has pointed them back at the host.

On the CPU there is no stream (`InlineStreams`): copies are synchronous, but the same window runs with separate
"host" and "device" storages, which is how the tests see it; a stand-in for `CudaStreams` runs the stream path on
CPU tensors.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .errors import UraeError
from .pinned import exact_pinned_sizes

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # FLUX's execution order
# How a block is entered: a forward pass with or without grad, or inside a checkpointed backward, a recompute (with
# grad) or a checkpoint segment's replay (without grad) of the blocks before the one it recomputes.
FORWARD, INFERENCE, RECOMPUTE, REPLAY = "forward", "inference", "recompute", "replay"


def execution_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's blocks in the order a forward runs them (double blocks, then single blocks)."""
    return [block for name in BLOCK_LISTS for block in getattr(transformer, name, ())]


def block_names(n_double: int, n_single: int) -> tuple[str, ...]:
    """Module names of FLUX's blocks in execution order (`transformer_blocks.0` ... `single_transformer_blocks.37`)."""
    return tuple(f"{BLOCK_LISTS[0]}.{i}" for i in range(n_double)) + tuple(
        f"{BLOCK_LISTS[1]}.{i}" for i in range(n_single)
    )


def backward_entries(n_blocks: int, every: int) -> tuple[tuple[int, str], ...]:
    """Every block entry of a checkpointed backward over `n_blocks` blocks, in order: (block index in execution
    order, RECOMPUTE or REPLAY), with checkpoint segments of `every` blocks (1: plain block checkpointing).

    From train/checkpoint_segments.py: segments start at blocks 0, k, 2k, ... and backward takes them last first.
    In a segment, backward asks for the input of its blocks last first; a block whose input is not at hand gets it
    by replaying the blocks from the segment's start up to it without grad (`_Segment.input`), which also keeps the
    input of the block before it (unless that is the start), so that one is recomputed at once, and the one before
    it replays again: a segment of 3 is entered 0r 1r 2 1 0, one of 4 0r 1r 2r 3 2 0r 1 0 (r: replay)."""
    entries: list[tuple[int, str]] = []
    for start in reversed(range(0, n_blocks, every)):
        ready = None  # the position whose input the last replay kept
        for pos in reversed(range(min(every, n_blocks - start))):
            if pos > 0 and pos != ready:
                entries += [(start + q, REPLAY) for q in range(pos)]
                ready = pos - 1
            entries.append((start + pos, RECOMPUTE))
    return tuple(entries)


_SWAPPED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # every module inside a swapped block


def is_swapped(module: nn.Module) -> bool:
    """Whether `module` is inside a block that block swap moves between host and device memory."""
    return module in _SWAPPED


def swapped_block_names(config: dict, blocks_to_swap: int) -> tuple[str, ...]:
    """The blocks `enable_block_swap(..., blocks_to_swap)` swaps in a transformer of this diffusers config: the last
    ones in execution order (the loader parks them in host memory while loading; the planner counts them)."""
    names = block_names(config["num_layers"], config["num_single_layers"])
    return names[len(names) - blocks_to_swap :] if blocks_to_swap else ()


def enable_block_swap(
    transformer: nn.Module, blocks_to_swap: int, device: torch.device | str, streams: Streams | None = None
) -> BlockSwap | None:
    """Swap the last `blocks_to_swap` blocks through host memory and put the rest of `transformer` on `device`.

    Returns the BlockSwap (`.remove()` puts everything back on the device), or None for 0 (off). `blocks_to_swap`
    comes checked (urae_lite.memory.MemorySettings.check: 0 to the number of blocks). `streams`: how copies reach
    the device (default: `default_streams(device)`)."""
    blocks = execution_blocks(transformer)
    if blocks_to_swap == 0:
        return None
    if block_swap_of(transformer) is not None:
        raise UraeError("block swap is already on for this transformer: remove it first (disable_block_swap)")
    return BlockSwap(transformer, blocks[len(blocks) - blocks_to_swap :], torch.device(device), streams)


def block_swap_of(transformer: nn.Module) -> BlockSwap | None:
    return transformer.__dict__.get("_urae_block_swap")


def disable_block_swap(transformer: nn.Module) -> None:
    """Undo `enable_block_swap` (no-op when it is off): every tensor back where the rest of the transformer is."""
    swap = block_swap_of(transformer)
    if swap is not None:
        swap.remove()


def _frozen_slots(module: nn.Module) -> list[tuple[dict, str]]:
    """(owner dict, key) of every buffer and frozen Parameter under `module`, each tensor once."""
    slots, seen = [], set()
    for sub in module.modules():
        for owner in (sub._parameters, sub._buffers):
            for key, t in owner.items():
                if t is None or id(t) in seen or (isinstance(t, nn.Parameter) and t.requires_grad):
                    continue
                seen.add(id(t))
                slots.append((owner, key))
    return slots


class Stream(Protocol):
    """What the window asks of a stream (torch.cuda.Stream has both)."""

    def wait_stream(self, stream: Any) -> None: ...

    def wait_event(self, event: Any) -> None: ...


class Streams(Protocol):
    """How device copies are made: the stream operations the window uses, on one device. `CudaStreams` on a GPU,
    `InlineStreams` elsewhere; tests pass a stand-in that runs the stream path on CPU tensors."""

    def current(self) -> Stream:
        """The stream the blocks compute on."""
        ...

    def side(self) -> Stream:
        """The stream prefetch copies run on (the same one each time)."""
        ...

    def empty(self, like: torch.Tensor, stream: Stream) -> torch.Tensor:
        """An uninitialised device tensor shaped as `like`, from `stream`'s memory pool."""
        ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Stream) -> None:
        """`dst.copy_(src)`, queued on `stream`."""
        ...

    def event(self, stream: Stream) -> Any:
        """An event recorded on `stream` now."""
        ...


class CudaStreams:
    """CUDA streams and events on `device`: non-blocking copies from pinned memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self._side: torch.cuda.Stream | None = None

    def current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def side(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def empty(self, like: torch.Tensor, stream: torch.cuda.Stream) -> torch.Tensor:
        with torch.cuda.stream(stream):  # the caching allocator serves the current stream's pool
            return torch.empty(like.shape, dtype=like.dtype, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def event(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(stream)
        return event


class _Inline:
    """The one stream of a device without streams: everything is done when issued, nothing waits."""

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass


class InlineStreams:
    """A device without streams (the CPU): synchronous copies, one stream."""

    _stream = _Inline()

    def __init__(self, device: torch.device):
        self.device = device

    def current(self) -> _Inline:
        return self._stream

    def side(self) -> _Inline:
        return self._stream

    def empty(self, like: torch.Tensor, stream: _Inline) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: _Inline) -> None:
        dst.copy_(src)

    def event(self, stream: _Inline) -> None:
        return None


def default_streams(device: torch.device) -> Streams:
    """CUDA streams on a GPU; elsewhere copies are synchronous (the CPU has no streams to overlap them on)."""
    return CudaStreams(device) if device.type == "cuda" else InlineStreams(device)


@dataclass
class _SwappedBlock:
    module: nn.Module
    slots: list[tuple[dict, str]]  # where the frozen tensors live in the module tree
    tensors: list[torch.Tensor]  # those tensor objects (identity kept: only `.data` is swapped)
    host: list[torch.Tensor]  # their host copies
    copies: list[torch.Tensor] | None = None  # device copies while resident or prefetched
    prefetched: bool = False  # copies made by a prefetch the block has not run on yet
    ready: Any = None  # the prefetch's copy event (Streams.event)
    handles: list = field(default_factory=list)


class BlockSwap:
    """The window over the swapped blocks of one transformer; made by `enable_block_swap`."""

    def __init__(
        self, transformer: nn.Module, blocks: list[nn.Module], device: torch.device, streams: Streams | None = None
    ):
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.transformer, self.device = transformer, device
        self.streams = streams if streams is not None else default_streams(device)
        self.pinned = device.type == "cuda"
        if self.pinned:
            exact_pinned_sizes()  # else each host copy takes the next power of two of its bytes
        order = {id(b): i for i, b in enumerate(execution_blocks(transformer))}
        self._index = [order[id(b)] for b in blocks]  # each swapped block's place in execution order
        self._n_blocks = len(order)
        self._backward: tuple[int, tuple[tuple[int, str], ...]] | None = None  # (every, the swapped entries)
        self._cursor = 0  # where in the backward's entries the last swapped block entered was
        self.blocks: list[_SwappedBlock] = []
        for block in blocks:
            slots = _frozen_slots(block)
            tensors = [owner[key] for owner, key in slots]
            host = []
            for t in tensors:
                copy = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pinned).copy_(t.detach())
                t.data = copy  # the original (device) storage is freed here, one tensor at a time
                host.append(copy)
            self.blocks.append(_SwappedBlock(block, slots, tensors, host))
            _SWAPPED.update(block.modules())
        transformer.__dict__["_urae_block_swap"] = self
        for pos, b in enumerate(self.blocks):
            b.module.__dict__["_apply"] = self._guarded_apply(b)  # `.to()` leaves the window's tensors alone
            b.handles.append(b.module.register_forward_pre_hook(lambda _m, _a, pos=pos: self._enter(pos)))
        transformer.to(device)  # everything else, trainable factors of swapped blocks included

    # ---- the window ------------------------------------------------------------------------------------------
    def _enter(self, pos: int) -> None:
        grad = torch.is_grad_enabled()
        if grad and not getattr(self.transformer, "gradient_checkpointing", False):
            raise UraeError(
                "block swap with gradients needs gradient checkpointing (set memory.checkpointing=on "
                "or cpu): autograd would otherwise read swapped weights after they left the device"
            )
        if torch._C._current_graph_task_id() != -1:
            mode = RECOMPUTE if grad else REPLAY
        else:
            mode = FORWARD if grad else INFERENCE
        nxt = self._next(pos, mode)
        if nxt == pos:
            nxt = None
        for q, b in enumerate(self.blocks):
            if q not in (pos, nxt) and b.copies is not None:
                self._release(b)
        self._make_resident(self.blocks[pos])
        if nxt is not None and self.blocks[nxt].copies is None:
            self._prefetch(self.blocks[nxt])

    def _next(self, pos: int, mode: str) -> int | None:
        """The swapped block entered after `pos` (entered in `mode`). A forward walks up; after its last block
        comes the backward's first entry with grad (`backward_entries`), the next pass's first block without.
        Inside backward the entries follow `backward_entries` from where the last one was (found again from the
        start if the pass went another way, e.g. a backward cut short)."""
        n = len(self.blocks)
        if mode in (FORWARD, INFERENCE):
            if mode == FORWARD:
                self._cursor = 0  # a new step
            if pos + 1 < n:
                return pos + 1
            if mode == INFERENCE:
                return 0 if pos else None
            entries = self._backward_entries()
            return entries[0][0] if entries else None
        entries = self._backward_entries()
        found = self._find(entries, (pos, mode))
        if found is None:  # not a checkpointed backward this window knows: its direction
            return (pos - 1 if pos > 0 else None) if mode == RECOMPUTE else (pos + 1 if pos + 1 < n else None)
        self._cursor = found + 1
        return entries[found + 1][0] if found + 1 < len(entries) else None

    def _find(self, entries: tuple[tuple[int, str], ...], entry: tuple[int, str]) -> int | None:
        for start, stop in ((self._cursor, len(entries)), (0, self._cursor)):
            for i in range(start, stop):
                if entries[i] == entry:
                    return i
        return None

    def _backward_entries(self) -> tuple[tuple[int, str], ...]:
        """The swapped blocks' entries (position among them, mode) in a checkpointed backward, for the checkpoint
        segments installed now (diffusers' `_gradient_checkpointing_func`: a SegmentCheckpointing has `every`)."""
        every = getattr(getattr(self.transformer, "_gradient_checkpointing_func", None), "every", 1)
        if self._backward is None or self._backward[0] != every:
            where = {g: pos for pos, g in enumerate(self._index)}
            entries = backward_entries(self._n_blocks, every)
            self._backward = (every, tuple((where[g], mode) for g, mode in entries if g in where))
        return self._backward[1]

    def _fetch(self, b: _SwappedBlock) -> list[torch.Tensor]:
        """Device copies of the block's host tensors, made on the compute stream (in order with what reads them)."""
        compute = self.streams.current()
        copies = [self.streams.empty(h, compute) for h in b.host]
        for c, h in zip(copies, b.host):
            self.streams.copy(c, h, compute)
        return copies

    def _prefetch(self, b: _SwappedBlock) -> None:
        """Device copies made on the side stream, in memory of the compute stream's pool (module docstring)."""
        compute, side = self.streams.current(), self.streams.side()
        b.copies = [self.streams.empty(h, compute) for h in b.host]
        side.wait_stream(compute)  # the memory may be a block's copies that compute work queued before still reads
        for c, h in zip(b.copies, b.host):
            self.streams.copy(c, h, side)
        b.ready, b.prefetched = self.streams.event(side), True

    def _make_resident(self, b: _SwappedBlock) -> None:
        if b.copies is None:
            b.copies = self._fetch(b)
        elif b.prefetched:
            self.streams.current().wait_event(b.ready)
            b.ready, b.prefetched = None, False
        for t, c in zip(b.tensors, b.copies):
            t.data = c

    def _release(self, b: _SwappedBlock) -> None:
        if b.prefetched:  # never used: compute work that reuses the memory must come after the copy into it
            self.streams.current().wait_event(b.ready)
        for t, h in zip(b.tensors, b.host):
            t.data = h
        b.copies, b.ready, b.prefetched = None, None, False  # back to the compute stream's pool, in its order

    def release_all(self) -> None:
        """Every swapped block back to its host copies (the window's device memory is freed)."""
        for b in self.blocks:
            if b.copies is not None:
                self._release(b)

    # ---- `.to()` and removal ---------------------------------------------------------------------------------
    def _guarded_apply(self, b: _SwappedBlock):
        """The block's `_apply` (what `.to()`, `.cuda()`, `.cpu()` call): trainable tensors move as usual, the
        window's tensors stay where the window put them, and moving off the device releases the window. This is
        what lets diffusers' model offload and `pipe.to()` handle a block-swapped transformer (diffusers 0.42 has no
        way to keep it out: `_exclude_from_cpu_offload` is ignored for components in `model_cpu_offload_seq`, and
        excluded components are moved whole with `.to(device)` each time the offload hooks are re-installed)."""

        def _apply(fn, recurse: bool = True):
            # what `fn` does, seen on two probes: any dtype conversion changes at least one of them
            probes = [fn(torch.zeros((), dtype=dt, device=self.device)) for dt in (torch.float16, torch.bfloat16)]
            if [p.dtype for p in probes] != [torch.float16, torch.bfloat16]:
                raise UraeError(
                    "block swap keeps the swapped blocks' frozen tensors in their dtype: remove it "
                    "(disable_block_swap) before converting the transformer's dtype"
                )
            if probes[0].device != self.device:
                self.release_all()
            held = [owner[key] for owner, key in b.slots]
            for owner, key in b.slots:
                owner[key] = None  # nn.Module._apply skips None entries
            try:
                return nn.Module._apply(b.module, fn, recurse)
            finally:
                for (owner, key), t in zip(b.slots, held):
                    owner[key] = t

        return _apply

    def remove(self) -> None:
        """Hooks off; the swapped tensors go where the rest of the transformer is (the host copies are dropped)."""
        self.release_all()
        held = {id(t) for b in self.blocks for t in b.tensors}
        target = next(
            (
                t.device
                for t in list(self.transformer.parameters()) + list(self.transformer.buffers())
                if id(t) not in held
            ),
            self.device,
        )
        for b in self.blocks:
            for h in b.handles:
                h.remove()
            del b.module.__dict__["_apply"]
            for sub in b.module.modules():
                _SWAPPED.discard(sub)
            for t, h in zip(b.tensors, b.host):
                t.data = h.to(target, copy=True) if target.type != "cpu" or h.is_pinned() else h
        self.blocks = []
        del self.transformer.__dict__["_urae_block_swap"]

    disable = remove
