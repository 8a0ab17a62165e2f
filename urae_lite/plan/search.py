"""`--vram N`: every configuration of a job that fits the card, fastest first, by an expected-speed model.

Speed model (for ranking only): FLOPs of the transformer's GEMMs and attention at the reference card's throughput,
slowed by the quantized base's dequantization, plus the host<->device traffic each offload or checkpointing mode
adds (overlapped with compute for group offloading, serial otherwise). It orders what matters: no offload >
model > group > sequential, bf16 > fp8 > nf4, checkpointing off > on > cpu, and it knows that streaming blocks
costs nothing when a 4K step's compute hides the transfer but dominates at 1024².
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from . import constants as C
from .arch import FluxArch, t5_params, vae_params
from .estimate import CHECKPOINTING, OFFLOAD_MODES, Estimate, PlanConfig, estimate


def forward_flops(arch: FluxArch, image: int, text: int) -> float:
    """GEMM + attention FLOPs of one transformer forward (2 per multiply-add; q·kᵀ and p·v each 2·N²·D)."""
    total = 0.0
    for l in arch.linears:
        if ".norm" in l.name:  # adaLN modulation: applied to the (1, D) conditioning vector
            tokens = 1
        elif l.name.startswith("transformer_blocks."):  # two streams: text projections see the text only
            tokens = text if ("add_" in l.name or "context" in l.name) else image
        else:
            tokens = image + text
        total += 2.0 * l.numel * tokens
    return total + 4.0 * (image + text) ** 2 * arch.hidden * arch.n_blocks


def expected_seconds(cfg: PlanConfig) -> float:
    """Seconds per image (generate) or per optimizer step (train) on the reference card; for ranking only."""
    arch, tok = cfg.arch(), cfg.tokens()
    compute = forward_flops(arch, tok.image, tok.text) / C.REF_FLOPS * C.QUANT_SLOWDOWN[cfg.quant]
    weights = arch.weight_bytes(cfg.quant)
    if cfg.task == "train":
        passes = 3 + (cfg.checkpointing != "off")  # forward + backward (2x) + the recompute
        traffic = 2 * arch.n_blocks * tok.total * arch.hidden * C.BF16 if cfg.checkpointing == "cpu" else 0
        return compute * passes + traffic / C.REF_PCIE_PINNED  # save_on_cpu copies synchronously
    step = {"none": compute, "model": compute,
            "group": max(compute, weights / C.REF_PCIE_PINNED) + arch.n_blocks * C.GROUP_OVERHEAD_PER_BLOCK,
            "sequential": (compute + weights / C.REF_PCIE_PAGEABLE
                           + len(arch.linears) * C.SEQUENTIAL_OVERHEAD_PER_LAYER)}[cfg.offload]
    once = (weights + (t5_params() + vae_params()) * C.BF16) / C.REF_PCIE_PAGEABLE if cfg.offload != "none" else 0
    return cfg.steps * step + once


@dataclass(frozen=True)
class Candidate:
    """One configuration with its memory estimate and expected seconds (per image, or per training step)."""

    config: PlanConfig
    estimate: Estimate
    seconds: float

    @property
    def peak(self) -> int:
        return self.estimate.peak


@dataclass(frozen=True)
class PlanResult:
    """The candidates that fit `vram_gib`, fastest first, and the smallest peak any candidate reaches."""

    vram_gib: float
    fitting: tuple[Candidate, ...]
    smallest: Candidate
    largest_fitting_size: tuple[int, int] | None  # with the smallest configuration, when nothing fits
    ram_gib: float | None = None

    @property
    def best(self) -> Candidate | None:
        return self.fitting[0] if self.fitting else None

    def impossible(self) -> str:
        """One line for a request nothing fits: the smallest peak reachable and what it would need."""
        s = self.smallest
        cfg = s.config
        ram = f" and {self.ram_gib:g} GiB of host memory" if self.ram_gib is not None else ""
        line = (f"nothing fits in {self.vram_gib:g} GiB{ram} for {cfg.task} at {cfg.width}x{cfg.height}: the "
                f"smallest peak is {s.peak / C.GiB:.1f} GiB ({options(cfg)}), so it needs a card with at least "
                f"{s.peak / C.GiB:.1f} GiB")
        if not _fits_ram(s, self.ram_gib):
            line += f" and {s.estimate.host / C.GiB:.1f} GiB of host memory"
        if self.largest_fitting_size:
            w, h = self.largest_fitting_size
            line += f"; {self.vram_gib:g} GiB fits up to {w}x{h} with those settings"
        return line


# The optimizer is not searched: switching it means editing the recipe's optimizer section (its arguments differ),
# and its states are small next to activations (optim.py); `optimizer=` fixes it.
SEARCHED = {"generate": ("quant", "offload"), "train": ("quant", "checkpointing")}


def _space(task: str) -> dict[str, tuple[str, ...]]:
    from ..quant import QUANT_FORMATS

    valid = {"quant": QUANT_FORMATS, "offload": OFFLOAD_MODES, "checkpointing": CHECKPOINTING}
    return {k: valid[k] for k in SEARCHED[task]}


def candidates(base: PlanConfig, fixed: set[str], vram_gib: float | None = None) -> list[Candidate]:
    """Every combination of the searched options not in `fixed`, estimated and timed."""
    space = {k: (getattr(base, k),) if k in fixed else v for k, v in _space(base.task).items()}
    out = []
    for values in itertools.product(*space.values()):
        cfg = base.replace(**dict(zip(space, values)))
        out.append(Candidate(cfg, estimate(cfg, vram_gib), expected_seconds(cfg)))
    return out


def _rank(c: Candidate) -> tuple[float, int]:
    return round(c.seconds, 6), c.peak


def best_config(task: str, width: int, height: int, vram_gib: float, ram_gib: float | None = None,
                **fixed) -> PlanResult:
    """The fastest configuration of `task` at `width`x`height` whose peak fits `vram_gib` GiB, and the next best.

    `ram_gib`: host memory available for offloaded weights or checkpoints (None: not a constraint).
    `fixed`: PlanConfig fields the caller has chosen (e.g. quant="nf4", rank=16); the searched options
    (quant and offload for generate; quant and checkpointing for train) not fixed are tried in all values.
    """
    from ..errors import UraeError

    names = {f.name for f in dataclasses.fields(PlanConfig)} - {"task", "width", "height"}
    unknown = set(fixed) - names
    if unknown:
        raise UraeError(f"unknown plan option(s) {', '.join(sorted(unknown))}: use {', '.join(sorted(names))}")
    if vram_gib <= 0:
        raise UraeError(f"--vram must be a positive number of GiB, got {vram_gib:g}")
    base = PlanConfig(task=task, width=width, height=height, **fixed)
    pool = candidates(base, set(fixed), vram_gib)
    if ram_gib is not None:  # what needs more host memory is out, unless everything does
        pool = [c for c in pool if c.estimate.host <= ram_gib * C.GiB] or pool
    limit = vram_gib * C.GiB
    fitting = tuple(sorted((c for c in pool if c.peak <= limit and _fits_ram(c, ram_gib)), key=_rank))
    smallest = min(pool, key=lambda c: (c.peak, _rank(c)))
    largest = None if fitting else _largest_fitting(smallest.config, limit, vram_gib)
    return PlanResult(vram_gib, fitting, smallest, largest, ram_gib)


def _fits_ram(c: Candidate, ram_gib: float | None) -> bool:
    return ram_gib is None or c.estimate.host <= ram_gib * C.GiB


def _largest_fitting(cfg: PlanConfig, limit: float, vram_gib: float) -> tuple[int, int] | None:
    """The largest size with `cfg`'s aspect ratio (multiples of 64) whose peak fits, by bisection on the scale."""
    def size(scale: float) -> tuple[int, int]:
        return max(64, int(cfg.width * scale) // 64 * 64), max(64, int(cfg.height * scale) // 64 * 64)

    def fits(scale: float) -> bool:
        w, h = size(scale)
        return estimate(cfg.replace(width=w, height=h), vram_gib).peak <= limit

    lo, hi = 64 / min(cfg.width, cfg.height), 1.0
    if not fits(lo):
        return None
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return size(lo)


def options(cfg: PlanConfig) -> str:
    """The searched options of `cfg` as the job's own command line spells them."""
    if cfg.task == "generate":
        return f"--quant {cfg.quant} --offload {cfg.offload}"
    return " ".join(train_overrides(cfg))


def train_overrides(cfg: PlanConfig) -> list[str]:
    """`urae-lite train RECIPE key=value ...` overrides that select `cfg`'s searched memory settings."""
    return [f"quant={cfg.quant}", f"training.checkpointing={cfg.checkpointing}"]
