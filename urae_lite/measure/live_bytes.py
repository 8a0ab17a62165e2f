"""Live device bytes of real code, counted op by op: the measuring half of the fake-tensor harness (measure/fake.py).

`LiveBytes`, a TorchDispatchMode, adds the untyped storage bytes of every op output once and subtracts them when
the storage dies (weakref.finalize), and keeps the peak. It works on real and fake tensors alike; tensors on the
`meta` device (`HOST`) stand for host memory and are not counted. It sees what torch allocates for tensors, not
allocator rounding and fragmentation, kernel-internal workspaces or the CUDA context (the planner's reserve and
context terms cover those).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HOST = torch.device("meta")  # fake host memory: not counted


class LiveBytes(TorchDispatchMode):
    """Live device storage bytes (op outputs + explicitly held tensors) and their peak since `start_phase`."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = self.peak = 0

    def add(self, t: object) -> None:
        """Count `t`'s storage once (a view or an in-place result of a counted storage adds nothing)."""
        if not isinstance(t, torch.Tensor) or t.device.type == HOST.type:
            return
        storage = t.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if size == 0 or key in self.live:
            return
        ref = weakref.ref(storage)
        self.live[key] = (ref, size)
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key, ref)

    def _free(self, key: int, ref: weakref.ref) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[0] is ref:
            del self.live[key]
            self.current -= entry[1]

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors on the device from now on (a module's weights moved there, a phase's inputs)."""
        for t in tensors:
            self.add(t)

    def release(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors leaving the device (model offload moving a module back to the host)."""
        for t in tensors:
            entry = self.live.pop(id(t.untyped_storage()), None)
            if entry is not None:
                self.current -= entry[1]

    def start_phase(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's parameters and buffers, and the bitsandbytes 4-bit quant states they carry (absmax, code: on the
    module's device, but neither parameters nor buffers)."""
    tensors = [*module.parameters(), *module.buffers()]
    return tensors + [t for p in tensors for t in _quant_state_tensors(getattr(p, "quant_state", None))]


def _quant_state_tensors(state) -> list[torch.Tensor]:
    if state is None:
        return []
    own = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    return [t for t in own if isinstance(t, torch.Tensor)] + _quant_state_tensors(getattr(state, "state2", None))


@dataclass
class Phase:
    """One measured phase: its planner name and the peak live device bytes during it."""

    name: str
    peak: int


def measure(tracker: LiveBytes, name: str, fn: Callable[[], object]) -> tuple[Phase, object]:
    """Run `fn` as one phase: the peak includes everything already held."""
    tracker.start_phase()
    result = fn()
    return Phase(name, tracker.peak), result


def offload_hooks(tracker: LiveBytes, modules: list[nn.Module]) -> list:
    """accelerate's `model` offload as the counter sees it: a module enters the device when it runs and the
    previously running one leaves."""
    state: dict[str, nn.Module | None] = {"on": None}

    def pre(module, args, kwargs=None):
        if state["on"] is not module:
            if state["on"] is not None:
                tracker.release(module_tensors(state["on"]))
            tracker.hold(module_tensors(module))
            state["on"] = module

    return [m.register_forward_pre_hook(pre) for m in modules]
