"""`--vram N`: every configuration of a job that fits the card, fastest first, by an expected-speed model.

Speed model (for ranking only): FLOPs of the transformer's GEMMs and attention at the reference card's throughput,
slowed by the quantized base's dequantization, plus the host<->device traffic each offload or checkpointing mode
adds (overlapped with compute for group offloading, serial otherwise). It orders what matters: no offload >
model > group > sequential, bf16 > fp8 > nf4, checkpointing off > on > cpu, fewer swapped blocks > more, FF
chunks off > on in training (the chunks are recomputed once more), and it knows that streaming blocks costs nothing
when a 4K step's compute hides the transfer but dominates at 1024².
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from ..memory import MemorySettings, searched
from . import constants as C
from .activations import kept_block_inputs
from .arch import FluxArch, t5_params, vae_params
from .estimate import Estimate, estimate
from .job import BASE_ADAPTER_RANK, PlanConfig
from .swap import transfer_seconds


def forward_flops(arch: FluxArch, image: int, text: int) -> float:
    """GEMM + attention FLOPs of one transformer forward."""
    return sum(arch.block_flops(image, text).values())


def segment_forwards(n_blocks: int, every: int) -> int:
    """Extra block forwards (without grad) a backward runs to recompute the inputs checkpoint segments of `every`
    blocks do not keep: L²//4 per segment of L blocks (train/checkpoint_segments.py)."""
    full, rest = divmod(n_blocks, every)
    return full * (every * every // 4) + rest * rest // 4


def segment_waits(n_blocks: int, every: int) -> int:
    """Recomputed block inputs that wait for backward where the kept ones live (L - 2 per segment of L)."""
    full, rest = divmod(n_blocks, every)
    return full * max(every - 2, 0) + max(rest - 2, 0)


def _memory_options_seconds(cfg: PlanConfig, arch: FluxArch, block_seconds: dict[str, float]) -> float:
    """What block swap and token chunking add to a step: copies the compute does not hide, per-block hooks, and
    in training the chunked passes' second recompute of the blocks' per-token parts."""
    train = cfg.task == "train"
    passes = (1.0, 3.0) if train else (1.0,)  # training: the checkpointed forward, then recompute + backward
    extra = 0.0
    if cfg.memory.blocks_to_swap:
        frozen_rank = (
            (BASE_ADAPTER_RANK + cfg.adapter_rank if cfg.adapter_kind == "minor" else 0) if train else cfg.adapter_rank
        )
        extra += transfer_seconds(
            arch, cfg.memory.quant, frozen_rank, cfg.memory.blocks_to_swap, C.REF_PCIE_PINNED, block_seconds, passes
        )
        extra += cfg.memory.blocks_to_swap * len(passes) * C.SWAP_OVERHEAD_PER_BLOCK
    if cfg.memory.token_chunks > 1:
        tok = cfg.tokens()
        if train:
            extra += arch.token_flops(tok.image, tok.text) / C.REF_FLOPS * cfg.memory.format.speed
        extra += arch.n_blocks * cfg.memory.token_chunks * len(passes) * C.TOKEN_CHUNK_OVERHEAD
    return extra


def expected_seconds(cfg: PlanConfig) -> float:
    """Seconds per image (generate) or per optimizer step (train) on the reference card; for ranking only."""
    arch, tok = cfg.arch(), cfg.tokens()
    slowdown = cfg.memory.format.speed / C.REF_FLOPS
    block_seconds = {k: v * slowdown for k, v in arch.block_flops(tok.image, tok.text).items()}
    compute = sum(block_seconds.values())
    memory = _memory_options_seconds(cfg, arch, block_seconds)
    weights = arch.weight_bytes(cfg.memory.quant)
    if cfg.task == "train":
        passes = 3 + (cfg.memory.checkpointing != "off")  # forward + backward (2x) + the recompute
        moved = kept_block_inputs(arch.n_blocks, cfg.memory.checkpoint_every) + segment_waits(
            arch.n_blocks, cfg.memory.checkpoint_every
        )
        traffic = 2 * moved * tok.total * arch.hidden * C.BF16 if cfg.memory.checkpointing == "cpu" else 0
        segments = compute * segment_forwards(arch.n_blocks, cfg.memory.checkpoint_every) / arch.n_blocks
        return compute * passes + segments + traffic / C.REF_PCIE_PINNED + memory  # save_on_cpu copies synchronously
    compute += memory
    step = {
        "none": compute,
        "model": compute,
        "group": max(compute, weights / C.REF_PCIE_PINNED) + arch.n_blocks * C.GROUP_OVERHEAD_PER_BLOCK,
        "sequential": (compute + weights / C.REF_PCIE_PAGEABLE + len(arch.linears) * C.SEQUENTIAL_OVERHEAD_PER_LAYER),
    }[cfg.memory.offload]
    once = (
        (weights + (t5_params() + vae_params()) * C.BF16) / C.REF_PCIE_PAGEABLE if cfg.memory.offload != "none" else 0
    )
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
    fits_card_only: tuple[Candidate, ...] = ()  # fit the card but need more host memory than `ram_gib`

    @property
    def best(self) -> Candidate | None:
        return self.fitting[0] if self.fitting else None

    def impossible(self) -> str:
        """One line for a request nothing fits: the smallest peak reachable and what it would need."""
        if self.fits_card_only:  # the card is enough, host memory is not
            fastest = self.fits_card_only[0]
            least = min(c.estimate.host for c in self.fits_card_only)
            cfg = fastest.config
            return (
                f"nothing fits in {self.vram_gib:g} GiB with {self.ram_gib:g} GiB of host memory for {cfg.task} "
                f"at {cfg.width}x{cfg.height}: the fastest plan that fits the card ({options(cfg)}) needs "
                f"{fastest.estimate.host / C.GiB:.1f} GiB of host memory, and every plan that fits needs at "
                f"least {least / C.GiB:.1f} GiB; add host memory or raise --ram"
            )
        s = self.smallest
        cfg = s.config
        ram = f" and {self.ram_gib:g} GiB of host memory" if self.ram_gib is not None else ""
        line = (
            f"nothing fits in {self.vram_gib:g} GiB{ram} for {cfg.task} at {cfg.width}x{cfg.height}: the "
            f"smallest peak is {s.peak / C.GiB:.1f} GiB ({options(cfg)}), so it needs a card with at least "
            f"{s.peak / C.GiB:.1f} GiB"
        )
        if not _fits_ram(s, self.ram_gib):
            line += f" and {s.estimate.host / C.GiB:.1f} GiB of host memory"
        if self.largest_fitting_size:
            w, h = self.largest_fitting_size
            line += f"; {self.vram_gib:g} GiB fits up to {w}x{h} with those settings"
        return line


def candidates(base: PlanConfig, fixed: set[str], vram_gib: float | None = None) -> list[Candidate]:
    """Every valid combination of the memory settings `--vram` searches for the task (MemorySettings.search_space)
    and `fixed` does not name, estimated and timed. The optimizer is not searched: switching it means editing the
    recipe's optimizer section (its arguments differ), and its states are small next to activations."""
    n_blocks = base.arch().n_blocks
    space = {
        name: (getattr(base.memory, name),) if name in fixed else values
        for name, values in MemorySettings.search_space(base.task, n_blocks).items()
    }
    out = []
    for values in itertools.product(*space.values()):
        memory = base.memory.replace(**dict(zip(space, values)))
        if memory.valid(base.task, n_blocks):
            cfg = base.replace(memory=memory)
            out.append(Candidate(cfg, estimate(cfg, vram_gib), expected_seconds(cfg)))
    return out


def _rank(c: Candidate) -> tuple[float, int]:
    return round(c.seconds, 6), c.peak


def best_config(
    job: PlanConfig, vram_gib: float, ram_gib: float | None = None, fixed: Iterable[str] = ()
) -> PlanResult:
    """The fastest way to run `job` whose peak fits `vram_gib` GiB, and the next best.

    `ram_gib`: host memory available for offloaded weights, swapped blocks or checkpoints (None: not a constraint).
    `fixed`: the memory settings the user chose (they keep `job.memory`'s value); the other searched settings are
    tried in all their values.
    """
    from ..errors import UraeError

    if vram_gib <= 0:
        raise UraeError(f"--vram must be a positive number of GiB, got {vram_gib:g}")
    if ram_gib is not None and ram_gib <= 0:
        raise UraeError(f"--ram must be a positive number of GiB, got {ram_gib:g}")
    from .estimate import check

    check(job)  # a wrong job fails with its own message, not as "nothing fits"
    everything = candidates(job, set(fixed), vram_gib)
    limit = vram_gib * C.GiB
    card = sorted((c for c in everything if c.peak <= limit), key=_rank)
    fitting = tuple(c for c in card if _fits_ram(c, ram_gib))
    pool = [c for c in everything if _fits_ram(c, ram_gib)] or everything  # host-fitting ones, unless none is
    smallest = min(pool, key=lambda c: (c.peak, _rank(c)))
    short = () if fitting else tuple(card)
    largest = None if fitting or short else _largest_fitting(smallest.config, limit, vram_gib)
    return PlanResult(vram_gib, fitting, smallest, largest, ram_gib, short)


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
    """The searched memory settings of `cfg` as the job's own command line spells them (generate: the ones not at
    their default; train: all of them, as recipe overrides, since a recipe's own values are not the defaults)."""
    return cfg.memory.describe(cfg.task, searched(cfg.task), skip_defaults=cfg.task == "generate")
