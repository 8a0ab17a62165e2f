"""Block checkpointing that keeps only every k-th block's input (`memory.checkpoint_every: k`).

Why: with block checkpointing autograd still keeps every block's input until backward: 57 x tokens x 3072 x 2 B,
21.5 GiB at 4096², in host memory with checkpointing=cpu, which with block swap's host copies of the weights is more
than a 32 GB desktop has. With k only the inputs of blocks 0, k, 2k, ... are kept; backward gets the input of any
other block by running the blocks from the last kept input up to it forward again, without grad.

How: diffusers calls `_gradient_checkpointing_func(block, hidden, encoder, temb, rotary, kwargs)` per block, and
torch's non-reentrant checkpoint saves those inputs through the saved-tensor hooks active around that call
(`_CheckpointFrame.save_inputs`), which is how `save_on_cpu` moves them to host memory. Our hooks are pushed
around the call only, so they are the innermost ones for the inputs (the block's own saved tensors go through the
hooks checkpoint pushes after them):

* a segment's first block's tensors, and every block's other tensors (temb), go through the surrounding hooks as
  they would without us: `save_on_cpu`'s host copies for checkpointing=cpu, the tensors themselves for `on`;
* the hidden / encoder states of the blocks in between become a token; unpacking it runs the segment's blocks
  from the kept input under no_grad, with each block's forward autocast and RNG state.

A segment is a run of calls where each block's (hidden, encoder) are the previous call's outputs (checked by
identity) with the same temb / rotary / kwargs objects, at most k long; anything else (a new forward, a
ControlNet residual added between blocks) starts a new one, so the recomputed input is the forward's.

Cost for a segment of L blocks: L²//4 extra block forwards (no grad), since each recompute also keeps the input
of the block below, which backward asks for next (k=2: one per segment; k=3: two, as few as possible). Memory:
ceil(n/k) kept inputs instead of n; in backward, besides them, the recomputed input of the running block (on the
device, as with save_on_cpu's copy back) and at most one more input where kept inputs live (k ≥ 3).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, get_device_states, set_device_states

from ..errors import UraeError

Hooks = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]
HIDDEN, ENCODER = 0, 1  # positions of a FLUX block's hidden and encoder states in its inputs


def _surrounding_hooks() -> Hooks | None | bool:
    """The saved-tensor hooks active now (None: none), or False inside another checkpoint's forward or recompute,
    where the block inputs are that checkpoint's business (torch marks its own hooks `_checkpoint_internal`)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None and getattr(hooks[0], "_checkpoint_internal", False):
        return False
    return hooks


def check_torch_supports(every: int) -> None:
    """`every` > 1 rests on a private torch hook: one clear line where this torch lacks it."""
    if every > 1 and not hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks"):
        raise UraeError(
            f"checkpoint_every > 1 needs a newer torch than {torch.__version__} (tested with 2.14): "
            f"set memory.checkpoint_every=1 or upgrade torch"
        )


class _Kept:
    """A tensor as the surrounding hooks packed it (the tensor itself without hooks)."""

    __slots__ = ("packed", "unpack_hook")

    def __init__(self, t: torch.Tensor, hooks: Hooks | None):
        self.packed = t.detach() if hooks is None else hooks[0](t)
        self.unpack_hook = None if hooks is None else hooks[1]

    def unpack(self) -> torch.Tensor:
        return self.packed if self.unpack_hook is None else self.unpack_hook(self.packed)


@dataclass(eq=False)
class _Step:
    """One block of a segment and the state its forward ran in."""

    block: nn.Module
    autocast: list[tuple[str, dict]]  # (device type, torch.autocast kwargs)
    cpu_rng: torch.Tensor
    device_type: str
    device_ids: list[int]
    device_rng: list[torch.Tensor]


@dataclass(eq=False)
class _Segment:
    """Blocks run one after the other from a kept input; recomputes the input of any of them."""

    shared: tuple  # temb, rotary embeddings, attention kwargs: the same objects for every block
    hooks: Hooks | None
    start: list[_Kept | None] = field(default_factory=lambda: [None, None])  # (hidden, encoder) of the first block
    steps: list[_Step] = field(default_factory=list)
    ready: dict[tuple[int, int], torch.Tensor | _Kept] = field(default_factory=dict)  # (pos, HIDDEN|ENCODER)

    def input(self, pos: int, which: int) -> torch.Tensor:
        """Block `pos`'s hidden (which=HIDDEN) or encoder states, as its forward got them."""
        ready = self.ready.pop((pos, which), None)
        if ready is not None:
            return ready.unpack() if isinstance(ready, _Kept) else ready
        states = [kept.unpack() for kept in self.start]
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=self.steps[0].device_ids, device_type=self.steps[0].device_type),
        ):
            for q in range(pos):
                if q == pos - 1 and q > 0:  # the input of the block backward reaches next: keep it, like kept ones
                    for w in (HIDDEN, ENCODER):
                        self.ready.setdefault((q, w), _Kept(states[w], self.hooks))
                step = self.steps[q]
                torch.set_rng_state(step.cpu_rng)
                set_device_states(step.device_ids, step.device_rng, device_type=step.device_type)
                with _autocast(step.autocast):
                    encoder, hidden = step.block(states[HIDDEN], states[ENCODER], *self.shared)
                states = [hidden, encoder]
        self.ready[(pos, 1 - which)] = states[1 - which]  # the other half: unpacked right after this one
        return states[which]


class _Start:
    """A segment's first block's hidden or encoder states as saved: holds the segment while that block's saved
    inputs live (the segment in turn holds only the packed tensor, so there is no reference cycle)."""

    __slots__ = ("segment", "which")

    def __init__(self, segment: _Segment, which: int):
        self.segment, self.which = segment, which

    def unpack(self) -> torch.Tensor:
        return self.segment.start[self.which].unpack()


class _Token:
    """What an in-between block saves instead of its hidden or encoder states."""

    __slots__ = ("segment", "pos", "which")

    def __init__(self, segment: _Segment, pos: int, which: int):
        self.segment, self.pos, self.which = segment, pos, which

    def unpack(self) -> torch.Tensor:
        return self.segment.input(self.pos, self.which)


def _autocast_state(device_type: str) -> list[tuple[str, dict]]:
    """The autocast settings in force now for `device_type` and the CPU, as torch's checkpoint captures them."""
    out = []
    for dt in dict.fromkeys((device_type, "cpu")):
        if torch.amp.is_autocast_available(dt):
            out.append(
                (
                    dt,
                    {
                        "enabled": torch.is_autocast_enabled(dt),
                        "dtype": torch.get_autocast_dtype(dt),
                        "cache_enabled": torch.is_autocast_cache_enabled(),
                    },
                )
            )
    return out


def _autocast(state: list[tuple[str, dict]]) -> contextlib.ExitStack:
    """The captured autocast contexts, entered."""
    stack = contextlib.ExitStack()
    for dt, kwargs in state:
        stack.enter_context(torch.autocast(dt, **kwargs))
    return stack


class _Packer:
    """The pack hook around one block's checkpoint call. Saved variables keep their pack hook, so the block's
    inputs are dropped (`inputs = None`) once the call returns."""

    def __init__(self, segment: _Segment, pos: int, hidden: torch.Tensor, encoder: torch.Tensor, hooks: Hooks | None):
        self.segment, self.pos, self.hooks = segment, pos, hooks
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = (hidden, encoder)

    def pack(self, t: torch.Tensor) -> _Kept | _Start | _Token:
        inputs = self.inputs or ()
        which = next((w for w, x in enumerate(inputs) if t is x), None)
        if which is None:
            return _Kept(t, self.hooks)
        if self.pos:
            return _Token(self.segment, self.pos, which)
        self.segment.start[which] = _Kept(t, self.hooks)
        return _Start(self.segment, which)


def _unpack(packed: _Kept | _Start | _Token) -> torch.Tensor:
    return packed.unpack()


class SegmentCheckpointing:
    """diffusers' `gradient_checkpointing_func` (non-reentrant torch checkpoint per block) that keeps the inputs of
    every `every`-th block only. Install with `enable_checkpoint_segments`."""

    def __init__(self, every: int):
        check_torch_supports(every)
        self.every = every
        self._tail: tuple[weakref.ref, int, weakref.ref, weakref.ref] | None = None  # last call's segment and outputs

    def __call__(self, block: nn.Module, *args: Any) -> Any:
        hooks = _surrounding_hooks()
        if self.every == 1 or hooks is False or len(args) < 2 or not all(torch.is_tensor(a) for a in args[:2]):
            self._tail = None
            return checkpoint(block, *args, use_reentrant=False)
        hidden, encoder, shared = args[HIDDEN], args[ENCODER], tuple(args[2:])
        segment, pos = self._continued(hidden, encoder, shared)
        if segment is None:
            segment, pos = _Segment(shared, hooks), 0
        device_ids, device_rng = get_device_states(hidden, encoder)
        segment.steps.append(
            _Step(
                block,
                _autocast_state(hidden.device.type),
                torch.get_rng_state(),
                hidden.device.type,
                device_ids,
                device_rng,
            )
        )
        packer = _Packer(segment, pos, hidden, encoder, hooks)
        try:
            with torch.autograd.graph.saved_tensors_hooks(packer.pack, _unpack):
                out = checkpoint(block, *args, use_reentrant=False)
        finally:
            packer.inputs = None  # the saved variables keep the pack hook: it must not keep the inputs alive
        # continued only from (encoder, hidden) outputs, and only if the first block's inputs came through `pack`
        chained = isinstance(out, tuple) and len(out) == 2 and all(torch.is_tensor(t) for t in out)
        self._tail = None
        if chained and all(kept is not None for kept in segment.start):
            self._tail = (weakref.ref(segment), pos, weakref.ref(out[1]), weakref.ref(out[0]))  # (hidden, encoder)
        return out

    def _continued(self, hidden: torch.Tensor, encoder: torch.Tensor, shared: tuple) -> tuple[_Segment | None, int]:
        """The segment this call continues and its position there, or (None, 0) for a new one."""
        if self._tail is None:
            return None, 0
        segment, pos, last_hidden, last_encoder = self._tail[0](), self._tail[1], self._tail[2](), self._tail[3]()
        if (
            segment is None
            or pos + 1 >= self.every
            or last_hidden is not hidden
            or last_encoder is not encoder
            or len(shared) != len(segment.shared)
            or any(a is not b for a, b in zip(shared, segment.shared))
        ):
            return None, 0
        return segment, pos + 1


def enable_checkpoint_segments(transformer: nn.Module, every: int) -> None:
    """Block checkpointing on `transformer` (diffusers ModelMixin) keeping every `every`-th block's input (checked:
    urae_lite.memory.MemorySettings)."""
    check_torch_supports(every)
    transformer.enable_gradient_checkpointing(SegmentCheckpointing(every) if every > 1 else None)
