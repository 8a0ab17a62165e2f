"""Block swap: the last N transformer blocks keep their frozen weights in host memory and visit the device one at a
time, so a transformer larger than the GPU still generates and trains, at the price of host-to-device copies.

What moves: every *frozen* tensor of a swapped block (the quantized base buffers, biases, norm weights, frozen
adapter slices). The host copies are the same packed tensors (pinned when the device is CUDA), never re-quantized,
so results are bit-identical to running without swap. Trainable factors stay on the device: the optimizer keeps
pointing at the same Parameter objects, and their gradients never leave the device.

The window: entering a swapped block (forward pre-hook) makes it resident, releases every other swapped block
(its tensors point at the host copies again; Parameters keep their identity because only `.data` changes), and
prefetches the next block in the current direction on a side CUDA stream, so the copy overlaps the block's compute.
Forward passes run blocks 0 -> N-1; inside backward (the gradient-checkpointing recompute) they run N-1 -> 0. A
block is released only when another swapped block is entered, never after its own forward: its recompute and
backward read the weights again. Device memory for the transformer: the resident blocks + 2 swapped blocks.

Training needs gradient checkpointing: without it the backward pass would read swapped weights (norm weights saved
for backward, the quantized bases the linears dequantize again) after the window has pointed them back at the host.

On the CPU there is no stream: copies are synchronous clones, but the same window runs with separate "host" and
"device" storages, which is how the tests see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UraeError

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # FLUX's execution order


def execution_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's blocks in the order a forward runs them (double blocks, then single blocks)."""
    return [block for name in BLOCK_LISTS for block in getattr(transformer, name, ())]


def block_names(n_double: int, n_single: int) -> tuple[str, ...]:
    """Module names of FLUX's blocks in execution order (`transformer_blocks.0` ... `single_transformer_blocks.37`)."""
    return tuple(f"{BLOCK_LISTS[0]}.{i}" for i in range(n_double)) + tuple(
        f"{BLOCK_LISTS[1]}.{i}" for i in range(n_single)
    )


def swapped_block_names(config: dict, blocks_to_swap: int) -> tuple[str, ...]:
    """The blocks `enable_block_swap(..., blocks_to_swap)` swaps in a transformer of this diffusers config: the last
    ones in execution order (the loader parks them in host memory while loading; the planner counts them)."""
    names = block_names(config["num_layers"], config["num_single_layers"])
    return names[len(names) - blocks_to_swap :] if blocks_to_swap else ()


def enable_block_swap(transformer: nn.Module, blocks_to_swap: int, device: torch.device | str) -> BlockSwap | None:
    """Swap the last `blocks_to_swap` blocks through host memory and put the rest of `transformer` on `device`.

    Returns the BlockSwap (`.remove()` puts everything back on the device), or None for 0 (off). `blocks_to_swap`
    comes checked (urae_lite.memory.MemorySettings.check: 0 to the number of blocks)."""
    blocks = execution_blocks(transformer)
    if blocks_to_swap == 0:
        return None
    if block_swap_of(transformer) is not None:
        raise UraeError("block swap is already on for this transformer: remove it first (disable_block_swap)")
    return BlockSwap(transformer, blocks[len(blocks) - blocks_to_swap :], torch.device(device))


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


@dataclass
class _SwappedBlock:
    module: nn.Module
    slots: list[tuple[dict, str]]  # where the frozen tensors live in the module tree
    tensors: list[torch.Tensor]  # those tensor objects (identity kept: only `.data` is swapped)
    host: list[torch.Tensor]  # their host copies
    copies: list[torch.Tensor] | None = None  # device copies while resident or prefetched
    ready: torch.cuda.Event | None = None  # set while a prefetch on the side stream may still be copying
    handles: list = field(default_factory=list)


class BlockSwap:
    """The window over the swapped blocks of one transformer; made by `enable_block_swap`."""

    def __init__(self, transformer: nn.Module, blocks: list[nn.Module], device: torch.device):
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.transformer, self.device = transformer, device
        self.pinned = device.type == "cuda"
        self._stream: torch.cuda.Stream | None = None
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
        transformer.__dict__["_urae_block_swap"] = self
        for pos, b in enumerate(self.blocks):
            b.module.__dict__["_apply"] = self._guarded_apply(b)  # `.to()` leaves the window's tensors alone
            b.handles.append(b.module.register_forward_pre_hook(lambda _m, _a, pos=pos: self._enter(pos)))
        transformer.to(device)  # everything else, trainable factors of swapped blocks included

    # ---- the window ------------------------------------------------------------------------------------------
    def _enter(self, pos: int) -> None:
        if torch.is_grad_enabled() and not getattr(self.transformer, "gradient_checkpointing", False):
            raise UraeError(
                "block swap with gradients needs gradient checkpointing (set memory.checkpointing=on "
                "or cpu): autograd would otherwise read swapped weights after they left the device"
            )
        nxt = self._next(pos, backward=torch._C._current_graph_task_id() != -1)
        for q, b in enumerate(self.blocks):
            if q not in (pos, nxt) and b.copies is not None:
                self._release(b)
        self._make_resident(self.blocks[pos])
        if nxt is not None and self.blocks[nxt].copies is None:
            self._prefetch(self.blocks[nxt])

    def _next(self, pos: int, backward: bool) -> int | None:
        """The swapped block entered after `pos`: backward walks down; a forward walks up, and after the last
        block comes backward (which starts with this same block) when grad is on, else the next forward."""
        if backward:
            return pos - 1 if pos > 0 else None
        if pos + 1 < len(self.blocks):
            return pos + 1
        return None if torch.is_grad_enabled() or pos == 0 else 0

    def _fetch(self, b: _SwappedBlock, non_blocking: bool) -> list[torch.Tensor]:
        """Device copies of the block's host tensors (on the current stream)."""
        return [h.to(self.device, non_blocking=non_blocking, copy=True) for h in b.host]

    def _prefetch(self, b: _SwappedBlock) -> None:
        if self.device.type != "cuda":
            b.copies = self._fetch(b, non_blocking=False)
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        # Pinned sources are never written, and the copies' memory comes from the side stream's own pool, so the
        # side stream need not wait for the compute stream.
        with torch.cuda.stream(self._stream):
            b.copies = self._fetch(b, non_blocking=True)
            b.ready = torch.cuda.Event()
            b.ready.record(self._stream)

    def _make_resident(self, b: _SwappedBlock) -> None:
        if b.copies is None:
            b.copies = self._fetch(b, non_blocking=self.pinned)  # in stream order with the compute that reads it
        elif b.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(b.ready)
            for c in b.copies:  # made on the side stream, read on this one: not reused before this one is done
                c.record_stream(compute)
            b.ready = None
        for t, c in zip(b.tensors, b.copies):
            t.data = c

    def _release(self, b: _SwappedBlock) -> None:
        for t, h in zip(b.tensors, b.host):
            t.data = h
        b.copies, b.ready = None, None  # device memory goes back to the allocator (after recorded streams)

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
            for t, h in zip(b.tensors, b.host):
                t.data = h.to(target, copy=True) if target.type != "cpu" or h.is_pinned() else h
        self.blocks = []
        del self.transformer.__dict__["_urae_block_swap"]

    disable = remove
