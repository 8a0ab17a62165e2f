"""The kernels' self-check: before an op's first use on a GPU, check it there against its reference, once per card and
software stack, and run the libraries' PyTorch code for any op that fails.

A user's first run is often the kernels' first contact with that card (a new architecture, a Triton release whose
compiler changed, a card with less shared memory than any we tried). So in `auto` mode the first use of each op in
each dtype runs `urae_lite.kernel_check.check_op` at the self-check's shape (milliseconds once compiled; the shape
makes Triton compile the kernel variants a FLUX run uses, not extra ones), and the verdict is kept in
`<cache>/kernel-checks/` under a key of device name, compute capability, torch, Triton and urae-lite versions: a
later run, or another process, reads it instead of checking again; a change of any of these checks again. An op that
failed or raised runs through PyTorch from then on (the others keep their kernels), and one warning line names it
and says to run `urae-lite doctor`, which re-checks every op and rewrites the verdicts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .cache_dir import cache_root
from .safetensors_io import atomic_write_text
from .version import __version__

if TYPE_CHECKING:
    from .kernel_check import CheckResult

logger = logging.getLogger(__name__)

#: Bump when the checks change, so that verdicts of the old checks are not trusted.
CHECK_VERSION = 1
FOLDER = "kernel-checks"

_lock = threading.RLock()
_known: dict[tuple[torch.device, str, torch.dtype], bool] = {}  # this process's verdicts: the per-call fast path
_warned: set[tuple[str, str]] = set()


def device_key(device: torch.device) -> dict[str, object]:
    """What a verdict holds for: the card (name, compute capability), the software that compiles and runs the
    kernels, and the checks' own version."""
    import triton

    from .kernels import interpreting

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = "{}.{}".format(*torch.cuda.get_device_capability(device))
    else:
        name, capability = f"{device.type} {platform.machine()}", ""
    return {
        "device": name,
        "capability": capability,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "urae_lite": __version__,
        "interpreter": interpreting(),
        "check": CHECK_VERSION,
    }


def verdict_path(key: dict[str, object]) -> Path:
    """`<cache>/kernel-checks/<device>-<hash of the key>.json`: readable name, one file per key."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(key["device"])).strip("-")[:40]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / FOLDER / f"{slug}-{digest}.json"


def read_verdicts(key: dict[str, object]) -> dict[str, dict[str, dict]]:
    """op -> dtype name -> verdict stored for `key` ({} when none, or the file is unreadable or of another key)."""
    try:
        data = json.loads(verdict_path(key).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("ops", {}) if isinstance(data, dict) and data.get("key") == key else {}


def _write(key: dict[str, object], results: list[CheckResult]) -> Path | None:
    """Merge `results` into the key's file (atomically: a reader never sees half a file). A read-only cache, or an
    entry lost to another process writing at the same moment, only costs a check in a later process."""
    ops = read_verdicts(key)
    for r in results:
        ops.setdefault(r.op, {})[r.dtype] = {
            "ok": r.ok,
            "error": r.error if math.isfinite(r.error) else None,  # strict JSON: the message says what went wrong
            "bound": r.bound,
            "shape": list(r.shape),
            "message": r.message,
            "seed": r.seed,
        }
    path = verdict_path(key)
    try:
        atomic_write_text(path, json.dumps({"key": key, "ops": ops}, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        logger.debug("cannot write the kernels' self-check verdicts to %s: %s", path, e)
        return None
    return path


def _tracing() -> bool:
    """Under torch.compile or a fake mode nothing real can run: the check waits for the first real call."""
    from torch._guards import detect_fake_mode

    return torch.compiler.is_compiling() or detect_fake_mode() is not None


def _warn(key: dict[str, object], op: str, dtype: str, verdict: dict) -> None:
    if (op, dtype) in _warned:
        return
    _warned.add((op, dtype))
    why = verdict.get("message") or "wrong results"
    logger.warning(
        "kernel %s (%s) failed its self-check on %s: %s; it runs through PyTorch instead (slower, same results up to "
        "rounding): run `urae-lite doctor`",
        op,
        dtype,
        key["device"],
        why,
    )


def passed(device: torch.device, op: str, dtype: torch.dtype) -> bool:
    """Whether `op` in `dtype` passed its self-check on `device`: this process's answer, else the cached verdict,
    else the check, run now and cached. A dtype the kernels do not compute in never passes (nothing to check)."""
    known = _known.get((device, op, dtype))
    if known is not None:
        return known
    from .kernel_check import DTYPES, check_op, dtype_name

    if dtype not in DTYPES:
        return False
    with _lock:  # one check per op even when threads race to the first call
        known = _known.get((device, op, dtype))
        if known is not None:
            return known
        if _tracing():
            return True  # the traced graph calls the kernels, as a real run would after a passing check
        key, name = device_key(device), dtype_name(dtype)
        verdict = read_verdicts(key).get(op, {}).get(name)
        if verdict is None:
            result = check_op(op, device, dtype)
            _write(key, [result])
            verdict = {"ok": result.ok, "error": result.error, "bound": result.bound, "message": result.message}
        ok = _known[(device, op, dtype)] = bool(verdict.get("ok"))
        if not ok:
            _warn(key, op, name, verdict)
        return ok


def record(device: torch.device, results: list[CheckResult]) -> Path | None:
    """Store checks run elsewhere (doctor's, at the self-check's shapes) as this device's verdicts, replacing what
    was cached: a failure that is gone no longer bypasses the kernel. Returns the file written (None if not)."""
    with _lock:
        for k in [k for k in _known if k[0] == device]:
            del _known[k]
        return _write(device_key(device), results)


def cached(device: torch.device) -> dict[str, dict[str, dict]]:
    """The verdicts cached for `device` (op -> dtype -> verdict), without checking anything."""
    return read_verdicts(device_key(device))


def reset() -> None:
    """Forget this process's verdicts and warnings (the cached files stay): the next use reads the files again."""
    with _lock:
        _known.clear()
        _warned.clear()
