"""Activation memory of FLUX blocks, tensor by tensor, as diffusers 0.3x-0.4x runs them (transformer_flux.py).

Everything is linear in the token count: attention goes through flash/memory-efficient SDPA (CUDA, and the CPU
flash kernel), which keeps no N x N matrix. Each inventory is a sum of named tensors in bytes per (token x hidden
element); `T` is text + image tokens, `D` the hidden width, `m` the MLP ratio (4), `a` the activation element size
(bf16), `n` the element size of normalised tensors (fp32 under CUDA autocast, which runs layer_norm and rms_norm
in fp32; otherwise bf16).

A block's memory is the maximum over a few moments of its forward or backward; the moments are where the most
tensors overlap, found by reading the code and checked against a live-tensor tracker on CPU (tests/test_plan.py).
Terms that only exist on one backend are switched by `Precision`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..quant import get_format
from . import chunked
from .arch import FluxArch
from .chunked import ChunkedCosts, lse_bytes
from .constants import BF16, FP32


@dataclass(frozen=True)
class Precision:
    """What differs between the CUDA kernel path and the CPU reference path, and with autocast."""

    norm: int  # bytes/element of LayerNorm/RMSNorm outputs (4 under CUDA autocast)
    rms_saved: int  # bytes/element RMSNorm keeps for backward (fp32 when upcast: CPU composite, CUDA autocast)
    rms_backward_fp32: int  # fp32 (T, D) temporaries of one RMSNorm backward (CPU composite 5, fused kernel 2)
    sdpa_backward_fp32: int  # fp32 (T, D) buffers of SDPA's backward (flash-attention 2 accumulates dq in fp32)
    bias_copy: bool  # reference path: F.linear, then `+ bias` as a second output (the kernels fuse the bias)
    dequant_transient: bool  # reference path: a dense W per linear call (the kernels reuse one buffer instead)
    act: int = BF16


CUDA_INFERENCE = Precision(
    norm=BF16, rms_saved=BF16, rms_backward_fp32=2, sdpa_backward_fp32=1, bias_copy=False, dequant_transient=False
)
CUDA_AUTOCAST = Precision(
    norm=FP32, rms_saved=FP32, rms_backward_fp32=2, sdpa_backward_fp32=1, bias_copy=False, dequant_transient=False
)
# CPU autocast keeps layer_norm / rms_norm in the input dtype (no AutocastCPU kernels for them), so inference and
# training share one CPU precision; torch's RMSNorm is a composite there that upcasts to fp32.
CPU = Precision(
    norm=BF16, rms_saved=FP32, rms_backward_fp32=5, sdpa_backward_fp32=0, bias_copy=True, dequant_transient=True
)


def _rope(p: Precision) -> float:
    """apply_rotary_emb: x_rotated (q's dtype) + x·cos, x_rotated·sin and their sum, all fp32."""
    return p.norm + 3 * FP32


def _out(p: Precision) -> float:
    """A linear's output, plus the separate `+ bias` result on the reference path."""
    return p.act * (2 if p.bias_copy else 1)


def single_inference(p: Precision, m: float, w: float) -> float:
    """Peak of a single block without grad: RoPE of k, or proj_out over cat(attention, MLP).

    `w`: the reference path's dense proj_out weight, per T·D (0 with the kernels or a bf16 base).
    """
    a, n = p.act, p.norm
    held = a + a + n + m * a  # block input (the caller's), residual cat, norm output, GELU(proj_mlp) for the cat
    rope = held + 2 * n + a + _rope(p)  # q, k normed, v, RoPE temporaries
    cast = (1 + m) * a if n != a else 0  # the linear casts an fp32 cat back to bf16
    cat = held + n + (1 + m) * n + cast  # attention output in q's dtype, the cat (+ its bf16 copy)
    return max(rope, cat + _out(p), cat + a + w)


def double_inference(p: Precision, m: float, w: float) -> float:
    """Peak of a double block without grad: RoPE, or the feed-forward after attention (`w`: FF input weight)."""
    a, n = p.act, p.norm
    rope = a + n + 2 * n + a + _rope(p)  # inputs, norm output, q, k normed, v, RoPE temporaries
    ff = 4 * a + n + m * a  # input, attention output, gated, new hidden; norm2; FF projection
    return max(rope, ff + m * a, ff + w)  # + GELU (or the + bias copy), or + the dense W


def single_saved(p: Precision, m: float, lora_layers: int, rank_frac: float) -> float:
    """What a single block keeps for backward with trainable adapters on q, k, v."""
    a, n = p.act, p.norm
    ln_input = a if n == a else FP32  # LayerNorm saves its input: the residual, or autocast's fp32 copy of it
    lora_x = a if n == a else lora_layers * a  # each adapted linear casts an fp32 input to its own bf16 copy
    return (
        ln_input
        + m * a  # GELU saves proj_mlp's output
        + lora_x
        + 2 * p.rms_saved
        + 4 * a  # RMSNorm inputs of q, k; SDPA's q, k, v, out
        + lora_layers * rank_frac * a
    )  # x·Aᵀ per adapted linear


def double_saved(p: Precision, m: float, lora_layers: int, rank_frac: float) -> float:
    """What a double block keeps for backward with trainable adapters on q, k, v, out."""
    a, n = p.act, p.norm
    ln_input = a if n == a else FP32
    lora_x = a if n == a else (lora_layers - 1) * a  # q, k, v share the norm output (copies under autocast)
    out_x = 0 if n == a else a  # to_out reads SDPA's saved output, or a bf16 copy of its fp32 cast
    return (
        2 * ln_input
        + m * a
        + lora_x
        + out_x  # norm1 and norm2 inputs, GELU input
        + 2 * p.rms_saved
        + 4 * a
        + lora_layers * rank_frac * a
    )


def single_forward(p: Precision, m: float, saved: float, inference: float) -> float:
    """A single block's forward with grad, its saved tensors included: the inference peak (RoPE) plus what
    autograd keeps that inference frees (proj_mlp's output, RMSNorm's upcast inputs)."""
    return max(saved, inference + m * p.act + 2 * p.rms_saved)


def double_forward(p: Precision, saved: float, inference: float) -> float:
    """A double block's forward with grad: the feed-forward moment plus the attention tensors autograd keeps
    (norm output, RMSNorm inputs, SDPA's q, k, v, out)."""
    return max(saved, inference + 5 * p.act + 2 * p.rms_saved)


def single_backward(p: Precision, m: float, saved: float) -> float:
    """A single block's backward, its saved tensors included.

    The gradient of cat(attention, MLP) stays alive while either branch still uses its half; the worst moments
    are GELU's backward (MLP branch), SDPA's backward, and RMSNorm's after SDPA's saved tensors are freed.
    """
    a, n = p.act, p.norm
    d_cat = (1 + m) * n  # in the cat's dtype (fp32 under autocast)
    mlp = saved + a + d_cat + m * a  # output grad, d_cat, d(proj_mlp output)
    sdpa = saved + a + d_cat + 3 * a + p.sdpa_backward_fp32 * FP32  # dq, dk, dv and the kernel's accumulator
    attn = saved - 4 * a + a + d_cat + 2 * a + p.rms_backward_fp32 * FP32  # SDPA freed; dq/dk in flight
    return max(mlp, sdpa, attn)


def single_recompute(p: Precision, m: float, saved: float) -> float:
    """A checkpointed single block's backward while its forward is recomputed: the forward's cat moment with
    every saved tensor alive and the output gradient waiting (the block input included, as in `*_inference`)."""
    a, n = p.act, p.norm
    upcast = n != a  # under autocast the residual cat and the norm output are not what LayerNorm / LoRA keep
    held = a + (a if upcast else 0) + (n if upcast else 0) + m * a  # input, residual cat, norm output, GELU output
    cast = (1 + m) * a if upcast else 0  # the linear's bf16 copy of the fp32 cat
    return saved + a + held + n + (1 + m) * n + cast  # + output gradient, attention output, the cat


def double_backward(p: Precision, m: float, saved: float) -> float:
    """A double block's backward: the checkpoint recompute reaching the feed-forward, or RMSNorm's backward
    once the FF and SDPA tensors are freed."""
    a = p.act
    recompute = saved + a + m * a + _out(p)  # output grads, GELU output, FF output
    attn = saved - 4 * a - m * a + 3 * a + 2 * a + p.rms_backward_fp32 * FP32
    return max(recompute, attn)


@dataclass(frozen=True)
class Tokens:
    """Transformer sequence: packed image tokens (H/16 x W/16) and T5 text tokens, attended together."""

    image: int
    text: int

    @property
    def total(self) -> int:
        return self.image + self.text


def _dense(quant: str, p: Precision, numel: int, T: int, D: int) -> float:
    """The reference path's dense W temporary of a `numel`-weight linear per T·D (none for bf16: no copy)."""
    return numel * p.act / (T * D) if p.dequant_transient and not get_format(quant).dense else 0.0


@dataclass(frozen=True)
class _Block:
    """One block type's numbers per T·D: how many, saved for backward, and the peaks of its passes."""

    count: int
    saved: float
    inference: float
    forward: float
    backward: float
    recompute: float = 0.0  # checkpointing: the backward moment while the block's forward is recomputed
    after_recompute: float = 0.0  # token chunks: backward moments once the recompute is over (its input freed)


BLOCK_KINDS = ("double", "single")  # FLUX's transformer_blocks and single_transformer_blocks


def _blocks(
    arch: FluxArch,
    T: int,
    quant: str,
    p: Precision,
    branch_rank: int,
    chunks: int = 1,
    checkpointed: bool = True,
    text: int = 0,
) -> dict[str, _Block]:
    """Per block kind present. `chunks`: the token chunks (1: off, plan/chunked.py); `checkpointed`: block
    checkpointing (training with it on / cpu); `text`: the text tokens among the T (the double blocks' text stream
    runs as one chunk)."""
    D, m = arch.hidden, arch.mlp_ratio
    mlp, frac = int(m * D), branch_rank / D
    out = {}
    if chunks > 1:
        for kind, count in (("double", arch.n_double), ("single", arch.n_single)):
            if not count:
                continue
            costs = ChunkedCosts(
                act=p.act,
                norm=p.norm,
                rope=_rope(p),
                out=_out(p),
                sdpa_backward=p.sdpa_backward_fp32 * FP32,
                lse=lse_bytes(D // arch.head_dim, D),
                dense_qkv=_dense(quant, p, D * D, T, D),
                dense_mlp=_dense(quant, p, (D + mlp) * D if kind == "single" else mlp * D, T, D),
            )
            b = chunked.double(costs, m, chunks, text / T) if kind == "double" else chunked.single(costs, m, chunks)
            if checkpointed:
                out[kind] = _Block(
                    count, b.saved, b.inference, b.inference, 0.0, b.recompute, after_recompute=b.backward
                )
            else:
                out[kind] = _Block(count, b.saved, b.inference, b.forward, b.backward)
        return out
    if arch.n_double:
        s = double_saved(p, m, arch.targets_per_block(True), frac)
        w = _dense(quant, p, mlp * D, T, D)
        inf = double_inference(p, m, w)
        out["double"] = _Block(arch.n_double, s, inf, double_forward(p, s, inf), double_backward(p, m, s))
    if arch.n_single:
        s = single_saved(p, m, arch.targets_per_block(False), frac)
        w = _dense(quant, p, (D + mlp) * D, T, D)
        inf = single_inference(p, m, w)
        out["single"] = _Block(
            arch.n_single, s, inf, single_forward(p, m, s, inf), single_backward(p, m, s), single_recompute(p, m, s)
        )
    return out


def rope_tables(arch: FluxArch, tok: Tokens) -> int:
    """FluxPosEmbed's cos and sin, (T, head_dim) fp32, alive for the whole forward (and backward)."""
    return 2 * tok.total * arch.head_dim * FP32


def inference_bytes(
    arch: FluxArch, tok: Tokens, quant: str, p: Precision, chunks: int = 1, kind: str | None = None
) -> int:
    """Peak activation bytes of one transformer forward without grad (the caller's inputs not included);
    `chunks`: the token chunks (1: off; plan/chunked.py); `kind`: only while blocks of this kind run (BLOCK_KINDS)."""
    T = tok.total
    peak = max(b.inference for b in _of_kind(_blocks(arch, T, quant, p, 0, chunks, text=tok.text), kind))
    return int(peak * T * arch.hidden + rope_tables(arch, tok))


@dataclass(frozen=True)
class TrainingActivations:
    """Activation bytes of one training step: what is kept between forward and backward, and the peaks."""

    kept: int  # saved for backward (all blocks) or the checkpointed block inputs, on the device
    forward_peak: int  # kept + the working set at the forward's worst moment
    backward_peak: int  # kept + the working set at the backward's worst moment


def kept_block_inputs(n_blocks: int, every: int) -> int:
    """Block inputs a checkpointed forward keeps: every `every`-th block's (train/checkpoint_segments.py)."""
    return -(-n_blocks // every)


def _of_kind(blocks: dict[str, _Block], kind: str | None) -> list[_Block]:
    """The blocks of `kind`, or all (None); a kind the model lacks is an error."""
    return list(blocks.values()) if kind is None else [blocks[kind]]


def training_bytes(
    arch: FluxArch,
    tok: Tokens,
    quant: str,
    p: Precision,
    checkpointing: str,
    branch_rank: int,
    chunks: int = 1,
    every: int = 1,
    kind: str | None = None,
) -> TrainingActivations:
    """Activations of a training step with trainable adapters on the authors' targets (`branch_rank`: total rank
    of each adapted linear's low-rank branch, trainable and frozen slices).

    checkpointing: `off` (autograd keeps every block's saved tensors), `on` (only block inputs are kept; a block is
    recomputed in backward), `cpu` (block inputs go to pinned host memory: two blocks' worth on the device).
    `chunks`: the token chunks (1: off; plan/chunked.py). `every`: only every `every`-th block input is kept;
    backward runs the blocks between forward again, without grad, from the last kept one. `kind`: the peaks while
    blocks of this kind run (what is kept is all blocks'); block swap holds a different window of weights for
    each.
    """
    T, D, a = tok.total, arch.hidden, p.act
    TD = T * D
    every_block = _blocks(arch, T, quant, p, branch_rank, chunks, checkpointing != "off", tok.text)
    blocks = _of_kind(every_block, kind)
    rope = rope_tables(arch, tok)
    # the prediction and norm_out's saved input (LayerNorm over the image tokens before proj_out), kept until backward
    head = tok.image * (arch.in_channels * a + D * (a if p.norm == a else FP32))
    if checkpointing == "off":
        kept = sum(b.count * b.saved for b in every_block.values()) * TD
        forward = kept + max(b.forward - b.saved for b in blocks) * TD
        backward = kept + max(b.backward - b.saved for b in blocks) * TD
    else:
        on = checkpointing == "on"
        kept = (kept_block_inputs(arch.n_blocks, every) if on else 2) * a * TD  # block inputs
        # the running block's input is one of `kept`, unless it is one the segments do not keep (then it is
        # recomputed in backward); with `every` >= 3 the next block's recomputed input waits beside it
        own = a if on and every > 1 else 0
        ready = a if on and every > 2 else 0
        # the running block's input is one of `kept` (`on`); with `cpu` it is the only one on the device in the
        # forward (save_on_cpu moves each input to host memory as the checkpoint saves it)
        running = kept if on else a * TD
        forward = running + max(b.inference - a + own for b in blocks) * TD
        backward = kept + max(max(b.backward, b.recompute - a + own) + ready for b in blocks) * TD
        if chunks > 1:  # after a block's recompute its input is gone from the device, unless kept there (`on`)
            after = max(b.after_recompute for b in blocks) + ready
            backward = max(backward, (kept if on else 0) + after * TD)
        if every > 1:  # a segment's blocks run from its kept input without grad, the output gradient waiting
            backward = max(backward, kept + (a + max(b.inference for b in blocks)) * TD)
    if checkpointing == "off":
        backward += head
    else:  # the head (its saved tensors, the fp32 gradients in and out of norm_out) is freed before the first
        backward = max(backward, kept + head + 2 * tok.image * D * p.norm)  # block recomputes
    return TrainingActivations(int(kept + rope + head), int(forward + rope), int(backward + rope))
