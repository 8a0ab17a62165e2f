"""Peak device memory of `urae-lite generate` or `train` for one configuration, phase by phase.

Each phase (text encoding, denoising, VAE decode; or forward, backward, optimizer step, validation) gets the
components resident on the device during it: weights where the offload mode puts them, activations at the phase's
worst moment, gradients and optimizer states, the CUDA context and the caching allocator's reserve. The peak is the
largest phase total. What each offload mode keeps where is read from urae_lite/pipeline.py and offload.py; what a
training step keeps, from urae_lite/train/ (fp32 adapter masters, autocast, save_on_cpu for offloaded checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import flux_configs as F
from ..flux_configs import VARIANTS
from ..quant import NF4_BLOCKSIZE
from ..vae_memory import HEADROOM, estimate_untiled_decode_bytes, tiled_working_bytes
from . import constants as C
from .activations import (
    CPU,
    CUDA_AUTOCAST,
    CUDA_INFERENCE,
    Precision,
    Tokens,
    inference_bytes,
    kept_block_inputs,
    training_bytes,
)
from .arch import FluxArch, clip_params, t5_params, vae_params
from .job import ADAPTERS, BACKENDS, BASE_ADAPTER_RANK, OPTIMIZERS, TASKS, PlanConfig
from .swap import Placement, SwapLayout


@dataclass(frozen=True)
class Estimate:
    """Bytes per component per phase; totals add the CUDA context and the allocator reserve."""

    config: PlanConfig
    phases: tuple[str, ...]
    rows: tuple[tuple[str, tuple[int, ...]], ...]  # (component, bytes in each phase)
    notes: tuple[str, ...] = ()
    host: int = 0  # host memory the mode parks there: offloaded weights, swapped blocks, checkpointed tensors
    pinned: int = 0  # the part of `host` that is pinned: block swap's host copies and save_on_cpu's saved tensors

    def allocated(self) -> tuple[int, ...]:
        """Per phase: what torch allocates (comparable to torch.cuda.max_memory_allocated)."""
        return tuple(sum(v[i] for _, v in self.rows) for i in range(len(self.phases)))

    def totals(self) -> tuple[int, ...]:
        """Per phase: what the card must hold (allocated + reserve + context)."""
        if self.config.backend != "cuda":
            return self.allocated()
        return tuple(int(a * (1 + C.ALLOCATOR_RESERVE) + C.CUDA_CONTEXT) for a in self.allocated())

    @property
    def peak(self) -> int:
        return max(self.totals())

    @property
    def peak_allocated(self) -> int:
        return max(self.allocated())

    @property
    def peak_phase(self) -> str:
        totals = self.totals()
        return self.phases[totals.index(max(totals))]

    def table(self) -> str:
        """The per-phase table in GiB, with the peak and the phase that sets it."""
        width = max(len(n) for n, _ in self.rows) + 2
        cols = [max(len(p), 6) + 2 for p in self.phases]
        lines = [
            self.config.summary(),
            " " * width + "".join(f"{p:>{w}}" for p, w in zip(self.phases, cols)) + "   (GiB)",
        ]

        def row(name: str, values) -> str:
            return f"{name:<{width}}" + "".join(
                f"{(v / C.GiB):>{w}.2f}" if v else f"{'-':>{w}}" for v, w in zip(values, cols)
            )

        lines += [row(n, v) for n, v in self.rows]
        if self.config.backend == "cuda":
            alloc = self.allocated()
            lines.append(row("CUDA context", [C.CUDA_CONTEXT] * len(alloc)))
            lines.append(
                row(f"allocator reserve ({C.ALLOCATOR_RESERVE:.0%})", [int(a * C.ALLOCATOR_RESERVE) for a in alloc])
            )
        lines.append(row("total", self.totals()))
        lines.append(
            f"peak {self.peak / C.GiB:.2f} GiB in {self.peak_phase} "
            f"({self.peak_allocated / C.GiB:.2f} GiB allocated by torch)"
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "config": self.config.as_dict(),
            "phases": list(self.phases),
            "rows": {n: list(v) for n, v in self.rows},
            "allocated": list(self.allocated()),
            "totals": list(self.totals()),
            "peak_bytes": self.peak,
            "peak_allocated_bytes": self.peak_allocated,
            "peak_phase": self.peak_phase,
            "host_bytes": self.host,
            "pinned_bytes": self.pinned,
            "notes": list(self.notes),
        }


def estimate(cfg: PlanConfig, vram_gib: float | None = None) -> Estimate:
    """The per-phase memory of `cfg` (validated: UraeError names the valid values). `vram_gib`, the card's size,
    only decides what `--vae-tiling auto` will pick, as the pipeline decides it from the memory left free."""
    check(cfg)
    return _generate(cfg, vram_gib) if cfg.task == "generate" else _train(cfg)


def check(cfg: PlanConfig) -> None:
    """One UraeError line naming the valid values for anything a plan cannot be made for; the memory settings'
    rules are theirs (MemorySettings.check)."""
    from ..errors import UraeError
    from ..presets import check_size

    for name, valid in (
        ("task", TASKS),
        ("variant", VARIANTS),
        ("optimizer", OPTIMIZERS),
        ("backend", BACKENDS),
    ):
        if getattr(cfg, name) not in valid:
            raise UraeError(f"unknown {name} '{getattr(cfg, name)}': use one of {', '.join(valid)}")
    if cfg.adapter is not None and cfg.adapter not in ADAPTERS:
        raise UraeError(f"unknown adapter '{cfg.adapter}': use one of {', '.join(ADAPTERS)}")
    if cfg.rank is not None and cfg.rank < 1:
        raise UraeError(f"rank must be at least 1, got {cfg.rank}")
    check_size(cfg.width, cfg.height)
    cfg.memory.check(cfg.task, cfg.arch().n_blocks)


# ---- shared pieces -----------------------------------------------------------------------------------------------
def _dequant_buffer(cfg: PlanConfig, arch: FluxArch) -> int:
    """The kernels' reused bf16 buffer, the size of the largest quantized linear (kernels/autograd.py)."""
    if cfg.backend != "cuda" or cfg.memory.format.dense:
        return 0
    return arch.largest_linear().numel * C.BF16


def _denoise_io(arch: FluxArch, tok: Tokens) -> int:
    """FluxPipeline's loop: bf16 latents and prediction, the scheduler's fp32 step, the prompt embeddings."""
    return tok.image * arch.in_channels * (2 * C.BF16 + 2 * C.FP32) + tok.text * arch.joint_dim * C.BF16


def _vae_decode(cfg: PlanConfig, tiled: bool) -> int:
    """Activation bytes of the VAE decode at the image size (bf16), plain or exact strip-tiled with the full-size
    maps in host memory (where the pipeline keeps them on a card sized to the plan: plan/vae.py)."""
    import torch

    vae = F.FLUX_VAE_CONFIG
    if not tiled:
        return estimate_untiled_decode_bytes(vae, cfg.height, cfg.width, torch.bfloat16)
    lh, lw = cfg.height // F.VAE_DOWNSAMPLE, cfg.width // F.VAE_DOWNSAMPLE
    return tiled_working_bytes(vae, lh, lw, torch.bfloat16, 1, cfg.memory.vae_strip_rows)


def _precision(cfg: PlanConfig, autocast: bool) -> Precision:
    if cfg.backend == "cpu":
        return CPU
    return CUDA_AUTOCAST if autocast else CUDA_INFERENCE


ROW_ORDER = (
    "transformer weights",
    "adapters",
    "text encoders",
    "VAE",
    "gradients",
    "optimizer states",
    "dequantization buffer",
    "training batch",
    "activations",
)


def _build(cfg: PlanConfig, phases: dict[str, dict[str, int]], notes: list[str], host: int, pinned: int) -> Estimate:
    """Rows in ROW_ORDER; a component absent from a phase is 0 there."""
    names = sorted(
        dict.fromkeys(name for parts in phases.values() for name in parts),
        key=lambda n: next(i for i, prefix in enumerate(ROW_ORDER) if n.startswith(prefix)),
    )
    rows = tuple((n, tuple(int(parts.get(n, 0)) for parts in phases.values())) for n in names)
    return Estimate(cfg, tuple(phases), tuple(r for r in rows if any(r[1])), tuple(notes), host, pinned)


# ---- generate ----------------------------------------------------------------------------------------------------
def _t5_activations(tokens: int) -> int:
    """T5-XXL encoder at `tokens` (no grad): the position bias and its masked copy, then the larger of one
    layer's attention and feed-forward (plan/constants.py; measured on the real encoder, measure/fake.py)."""
    bias = C.T5_BIAS_TENSORS * F.T5_HEADS * tokens * tokens * C.BF16
    attention = bias + tokens * F.T5_D_MODEL * C.T5_ATTENTION_HIDDEN * C.BF16
    ff = bias // C.T5_BIAS_TENSORS + tokens * (F.T5_D_MODEL * C.T5_FF_HIDDEN + F.T5_D_FF * C.T5_FF_TENSORS) * C.BF16
    return max(attention, ff)


def _text_encoder_weights(offload: str, t5_quant: str = "bf16") -> int:
    """Text-encoder bytes on the device while they run (bf16 as FluxPipeline loads them; T5's linears optionally
    NF4 through transformers' bitsandbytes integration: 4 bits + absmax; the embedding, norms and the FF output
    `wo` (T5's `_keep_in_fp32_modules`, which transformers never quantizes) stay bf16)."""
    linear_numel = F.T5_LAYERS * (4 * F.T5_D_MODEL**2 + 3 * F.T5_D_MODEL * F.T5_D_FF)
    quantized = F.T5_LAYERS * (4 * F.T5_D_MODEL**2 + 2 * F.T5_D_MODEL * F.T5_D_FF) if t5_quant == "nf4" else 0
    linear_bytes = quantized * (0.5 + 1 / NF4_BLOCKSIZE) + (linear_numel - quantized) * C.BF16
    t5 = int((t5_params() - linear_numel) * C.BF16 + linear_bytes)
    clip = clip_params() * C.BF16
    t5_layer = int(linear_bytes / F.T5_LAYERS)
    embedding = F.T5_VOCAB * F.T5_D_MODEL * C.BF16
    return {
        "none": t5 + clip,  # every component resident
        "model": t5,  # one component at a time: CLIP, then T5
        "group": embedding + 2 * t5_layer,  # the unmatched top-level modules + the running and prefetched layer
        "sequential": embedding,
    }[offload]  # the largest leaf module


def _generate(cfg: PlanConfig, vram_gib: float | None) -> Estimate:
    arch, tok = cfg.arch(), cfg.tokens()
    mode = cfg.memory.offload
    weights = {
        "none": arch.weight_bytes(cfg.memory.quant),
        "model": arch.weight_bytes(cfg.memory.quant),
        "group": 2 * arch.block_bytes(cfg.memory.quant) + arch.other_params * C.BF16,  # running + prefetched block
        "sequential": arch.largest_linear().weight_bytes(cfg.memory.quant),
    }[mode]  # one AdaptedLinear at a time
    share = {"none": 1.0, "model": 1.0, "group": 2 / arch.n_blocks, "sequential": 0.0}[mode]
    adapters = arch.adapter_params(cfg.adapter_rank) * C.BF16 * share
    transformer = {
        f"transformer weights ({cfg.memory.quant})": weights,
        f"adapters (rank {cfg.adapter_rank})": adapters,
    }
    prec = _precision(cfg, autocast=False)
    denoise, idle, swapped_host = (
        inference_bytes(arch, tok, cfg.memory.quant, prec, cfg.memory.token_chunks),
        transformer,
        0,
    )
    parked = arch.weight_bytes(cfg.memory.quant)  # what the offload hooks keep in host memory between its turns
    if cfg.memory.blocks_to_swap:  # the window at the denoising peak; `idle`: what the last step leaves (plan/swap.py)
        swap = SwapLayout.of(arch, cfg.memory.quant, cfg.memory.blocks_to_swap, cfg.adapter_rank)
        ((windows, left),) = swap.rounds("inference")
        peak = swap.peak(
            windows, lambda kind: inference_bytes(arch, tok, cfg.memory.quant, prec, cfg.memory.token_chunks, kind)
        )
        transformer, idle = (dict(zip(transformer, (p.weights, p.adapters))) for p in (peak, swap.held(left)))
        denoise, swapped_host = peak.activations, swap.host
        parked = swapped_host + swap.held(frozenset()).total  # the pinned copies + the resident part moved there
    text = {f"text encoders (T5-XXL {cfg.memory.t5_quant} + CLIP)": _text_encoder_weights(mode, cfg.memory.t5_quant)}
    vae = {"VAE": vae_params() * C.BF16}
    # `none`: everything stays on the device; `model` moves a block-swapped transformer off too (its window emptied)
    resident = {**idle, **text} if mode == "none" else {}
    always = vae if mode in ("none", "group") else {}  # group offloading excludes the VAE: it stays on the device
    dequant = {"dequantization buffer": _dequant_buffer(cfg, arch)}  # allocated on the first step, then held
    denoise += _denoise_io(arch, tok)
    phases = {
        "text encoding": {**resident, **text, **always, "activations": _t5_activations(tok.text)},
        "denoising": {**resident, **transformer, **always, **dequant, "activations": denoise},
    }
    before = [sum(p.values()) for p in phases.values()]
    decode_held = sum({**resident, **vae, **dequant}.values())
    tiled, note = _resolve_tiling(cfg, max(before), decode_held, vram_gib)
    phases["VAE decode"] = {**resident, **vae, **dequant, "activations": _vae_decode(cfg, tiled)}
    notes = [note] if note else []
    host = swapped_host
    if mode != "none":  # every component waits in host memory between its turns
        host = parked + _text_encoder_weights("none", cfg.memory.t5_quant) + vae_params() * C.BF16
        notes.append(
            f"offload {mode}: {host / C.GiB:.1f} GiB of weights wait in host memory"
            + (" (pinned)" if mode == "group" else "")
        )
    if swapped_host:
        notes.append(
            f"block swap: {cfg.memory.blocks_to_swap} blocks ({swapped_host / C.GiB:.1f} GiB) stream from pinned "
            "host memory"
        )
    return _build(cfg, phases, notes, host, swapped_host)


def _resolve_tiling(cfg: PlanConfig, other_phases: int, held: int, vram_gib: float | None) -> tuple[bool, str]:
    """`auto` tiles when the plain decode would not fit beside what the decode phase holds: in the card, or (card
    unknown) in a card just big enough for the other phases, which is what a plan that fits guarantees."""
    if cfg.memory.vae_tiling != "auto":
        return cfg.memory.vae_tiling == "on", ""
    plain = _vae_decode(cfg, tiled=False)
    card = other_phases if vram_gib is None else (vram_gib * C.GiB - C.CUDA_CONTEXT) / (1 + C.ALLOCATOR_RESERVE)
    tiled = held + plain * HEADROOM > card  # vae_tiling's `auto` asks for the same headroom (plan/vae.should_tile)
    return tiled, (
        f"VAE tiling auto -> {'exact tiled' if tiled else 'plain'} decode "
        f"(a plain decode needs {plain / C.GiB:.2f} GiB of activations, {HEADROOM:g}x of it free)"
    )


# ---- train -------------------------------------------------------------------------------------------------------
def _training_batch(arch: FluxArch, tok: Tokens) -> int:
    """One cached sample on the device (train/samples.py): fp32 noisy latents and target, the bf16 T5 and pooled
    CLIP embeddings, fp32 position ids."""
    ids = (tok.image + tok.text) * 3 * C.FP32
    return tok.image * arch.in_channels * 2 * C.FP32 + (tok.text * arch.joint_dim + F.CLIP_WIDTH) * C.BF16 + ids


def _train(cfg: PlanConfig) -> Estimate:
    arch, tok = cfg.arch(), cfg.tokens()
    r = cfg.adapter_rank
    trainable = arch.adapter_params(r)
    frozen_rank = BASE_ADAPTER_RANK + r if cfg.adapter_kind == "minor" else 0  # the 2K LoRA + the residual slice
    # each forward concatenates and casts every branch to bf16; autograd keeps the copies unless blocks recompute
    casts = arch.adapter_params(r + frozen_rank) * C.BF16 if cfg.memory.checkpointing == "off" else 0
    states = trainable * C.PRODIGY_STATES * C.FP32 if cfg.optimizer == "prodigy" else int(trainable * C.ADAMW8BIT_BYTES)
    prec = _precision(cfg, autocast=True)
    # frozen weights and frozen slices stream through the window (none swapped: all resident); a validation's
    # first step starts from what the backward left, later ones from what a step leaves
    swap = SwapLayout.of(arch, cfg.memory.quant, cfg.memory.blocks_to_swap, frozen_rank, cfg.memory.checkpoint_every)
    rounds = swap.rounds("forward", "backward", *(("inference",) * 2 if cfg.validation else ()))
    acts = {  # per block kind: the peaks while blocks of that kind run (the window differs)
        kind: training_bytes(
            arch,
            tok,
            cfg.memory.quant,
            prec,
            cfg.memory.checkpointing,
            r + frozen_rank,
            cfg.memory.token_chunks,
            cfg.memory.checkpoint_every,
            kind,
        )
        for kind in swap.kinds
    }
    name = f"adapters ({cfg.adapter_kind} rank {r})"

    def held(p: Placement, extra: int = 0) -> dict[str, int]:
        """The step's device parts beside the transformer's bytes `p` (`extra`: the adapter casts): fp32 masters
        of the trained factors (urae_lite/train/model.py) beside the frozen slices in bf16, optimizer states, the
        kernels' buffer."""
        return {
            f"transformer weights ({cfg.memory.quant})": p.weights,
            name: trainable * C.FP32 + p.adapters + extra,
            f"optimizer states ({cfg.optimizer})": states,
            "dequantization buffer": _dequant_buffer(cfg, arch),
            "activations": p.activations,
        }

    batch = {"training batch": _training_batch(arch, tok)}
    grads = {"gradients (fp32)": trainable * C.FP32}
    phases = {
        "forward": {**held(swap.peak(rounds[0][0], lambda kind: acts[kind].forward_peak), casts), **batch},
        "backward": {**held(swap.peak(rounds[1][0], lambda kind: acts[kind].backward_peak), casts), **grads, **batch},
        "optimizer step": {**held(swap.held(rounds[1][1])), **grads, **batch},
    }
    notes = []
    if cfg.validation:  # the recipes' validation images: the trained model samples in place, then a tiled decode

        def sample(kind: str) -> int:
            return inference_bytes(arch, tok, cfg.memory.quant, prec, cfg.memory.token_chunks, kind) + _denoise_io(
                arch, tok
            )

        phases["validation"] = held(max((swap.peak(w, sample) for w, _ in rounds[2:]), key=lambda p: p.total))
        decode = swap.held(rounds[-1][1], _vae_decode(cfg, tiled=True))
        phases["val. decode"] = {**held(decode), "VAE": vae_params() * C.BF16}
        notes.append(
            "validation samples at the training size under autocast: lower validation.size (or "
            "validation.every=0) when it sets the peak"
        )
    saved = _saved_on_host(cfg, arch, tok, prec) if cfg.memory.checkpointing == "cpu" else 0
    if saved:
        notes.append(
            f"checkpointing cpu: {saved / C.GiB:.1f} GiB of block inputs and saved tensors in pinned host memory"
        )
    if swap.host:
        notes.append(
            f"block swap: {cfg.memory.blocks_to_swap} blocks ({swap.host / C.GiB:.1f} GiB) stream from pinned "
            "host memory"
        )
    return _build(cfg, phases, notes, saved + swap.host, saved + swap.host)


def _saved_on_host(cfg: PlanConfig, arch: FluxArch, tok: Tokens, prec: Precision) -> int:
    """What `save_on_cpu(pin_memory=True)` (checkpointing `cpu`) makes torch's caching host allocator hold for a
    training step: every tensor autograd saves is a pinned copy of its own, sized exactly (urae_lite/pinned.py), and
    a freed copy's block serves later requests of its size. The forward ends with all of them alive:

    * per block, the checkpoint's tensor inputs: the hidden states (image tokens) and encoder states (text tokens) of
      every `checkpoint_every`-th block (the segment starts: train/checkpoint_segments.py), and every block's temb;
    * outside the blocks, what autograd saves for diffusers' AdaLayerNormContinuous (norm_out) and proj_out: the
      LayerNorm's input (fp32 under CUDA autocast, which runs layer_norm in fp32) with its per-token mean and rstd
      (fp32), the (1 + scale) factor that multiplies the normalised states, and proj_out's bf16 weight (transposed:
      the input's gradient needs it). The embedders' inputs need no gradient, and the loss runs outside
      save_on_cpu (Trainer.forward_loss). The image rotary embeddings reach the blocks in a tuple, which checkpoint
      does not save.

    Backward pins one thing: with segments of 3 or more, a segment replay keeps the input of the block recomputed
    next, one at a time. The first comes in the last segment (backward's first). If that segment has 3 blocks or
    more, nothing of its size was freed yet (only norm_out's tensors, of other sizes) and the allocator adds a block;
    otherwise the last segment's own freed input is reused, as every later one reuses the one before."""
    a, d, n, every = prec.act, arch.hidden, arch.n_blocks, cfg.memory.checkpoint_every
    block_input = (tok.image + tok.text) * d * a
    blocks = kept_block_inputs(n, every) * block_input + n * d * a
    last_segment = n - (n - 1) // every * every
    replay = block_input if last_segment >= 3 else 0
    out_channels = arch.in_channels  # FLUX.1: out_channels unset -> in_channels, patch size 1
    final = tok.image * d * prec.norm + 2 * tok.image * C.FP32 + d * a + d * out_channels * C.BF16
    return blocks + replay + final
