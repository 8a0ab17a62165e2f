"""Pinned host memory that costs what it holds.

torch's caching host allocator (ATen/core/CachingHostAllocator.h, `allocate`) rounds every pinned request up to a
power of two unless the request is above `pinned_max_round_threshold` or above `pinned_max_cached_size`
(c10/core/AllocatorConfig.h: both unlimited by default). Block swap pins each frozen tensor of its blocks on its
own and `save_on_cpu(pin_memory=True)` pins each saved tensor, so by default a 9 MiB fp8 3072x3072 weight takes
16 MiB and a 384 MiB block input at 4096² takes 512 MiB: the 4K training plan for a 12 GiB card would pin 31.9 GiB
instead of 23.7 (tests/test_pinned.py), more than a 32 GB desktop can lock.

`exact_pinned_sizes` sets the threshold to 0 (`pinned_max_round_threshold_mb:0`), after which a pinned request
reserves its own size. The allocator reads the threshold on every allocation, so setting it before the first
pinned allocation of a purpose is enough; block swap calls it before it pins its host copies, the trainer before
`save_on_cpu(pin_memory=True)`. The planner counts exact sizes (plan/estimate.py); where this torch cannot take
the setting, one warning says that pinned memory may take up to twice what the plan counts.

Freed pinned blocks stay cached (unlimited `pinned_max_cached_size`) and serve later requests of the same
power-of-two bucket that fit in them. Each step pins the same shapes again, so the cache holds one block per tensor
alive at the step's peak: what the planner counts.
"""

from __future__ import annotations

import logging
import re

import torch

logger = logging.getLogger("urae_lite.pinned")

MiB = 2**20
EXACT = "pinned_max_round_threshold_mb:0"
_UNLIMITED = 2**64 - 1  # size_t max: torch's default for both limits
_applied: bool | None = None  # None: not tried yet in this process


def exact_pinned_sizes() -> bool:
    """Make every later pinned host allocation reserve exactly the requested bytes (idempotent). Returns whether
    that is in force; the first time this torch cannot, one warning says so."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    try:
        if getter is None or setter is None:
            raise RuntimeError("no torch._C._accelerator_setAllocatorSettings")
        current = getter()
        if _limit(current, "pinned_max_round_threshold_mb") == 0:
            return True
        # Setting the allocator settings resets max_split_size, roundup_power2_divisions and the garbage collection
        # threshold to their defaults unless named (AcceleratorAllocatorConfig::parseArgs): keep what is set.
        setter(f"{current},{EXACT}" if current.strip() else EXACT)
        if _limit(getter(), "pinned_max_round_threshold_mb") != 0:
            raise RuntimeError("the setting did not take")
    except (RuntimeError, ValueError, TypeError) as e:
        logger.warning(
            "this torch (%s) cannot size pinned host memory exactly (%s: %s): pinned tensors (block swap, "
            "checkpointing=cpu) may take up to twice the host memory the plan counts",
            torch.__version__,
            EXACT,
            e,
        )
        return False
    return True


def _limit(settings: str, key: str) -> int | None:
    """The last `key:N` (MiB) in an allocator settings string, in bytes; None when absent."""
    values = re.findall(rf"(?:^|[,\s]){key}\s*:\s*(\d+)", settings)
    return int(values[-1]) * MiB if values else None


def pinned_bytes(nbytes: int, exact: bool | None = None) -> int:
    """The host bytes torch's caching host allocator reserves for one pinned request of `nbytes`: the request itself
    where sizes are exact or the request is above the rounding or caching limit, else the next power of two.
    `exact`: the rule to apply (None: the one in force now in this process)."""
    if nbytes <= 0:
        return 0
    threshold, cached = _rule() if exact is None else ((0, _UNLIMITED) if exact else (_UNLIMITED, _UNLIMITED))
    if nbytes <= threshold and nbytes <= cached:
        return 1 << (nbytes - 1).bit_length()
    return nbytes


def _rule() -> tuple[int, int]:
    """(round threshold, max cached size) in bytes as this process has them. The settings string is the last one
    parsed, so a limit it names is in force; one it does not name keeps its earlier value, which for the threshold
    is 0 once `exact_pinned_sizes` applied it (parseArgs resets neither pinned limit)."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    settings = getter() if getter is not None else ""
    threshold = _limit(settings, "pinned_max_round_threshold_mb")
    if threshold is None:
        threshold = 0 if _applied else _UNLIMITED
    cached = _limit(settings, "pinned_max_cached_size_mb")
    return threshold, _UNLIMITED if cached is None else cached
