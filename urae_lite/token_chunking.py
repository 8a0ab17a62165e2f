"""Token-chunked FLUX blocks: the same math, with every per-token intermediate alive for one chunk of tokens at a
time. Only the attention itself (softmax over all tokens) runs over the whole sequence.

At 4096² a block sees 65,536 + 512 tokens, and each T x D tensor is 0.38 GiB in bf16 (0.75 GiB in fp32 under
autocast, whose norms, RMSNorms and RoPE run in fp32); the MLP's are 4-5x that. Except the attention, a block is
per token, so it runs in two chunked passes around it:

* pass 1 (per chunk): adaptive LayerNorm -> q, k, v projections -> q/k RMSNorm -> RoPE -> q, k, v in the dtype the
  attention computes in (single blocks also hand pass 2 the normed tokens in the linears' compute dtype);
* the attention over all tokens;
* pass 2 (per chunk): single blocks `x + gate * proj_out(cat(attn, GELU(proj_mlp(norm))))`; double blocks
  `h = x + gate_msa * to_out(attn)`, then `h + gate_mlp * ff(norm2(h) * (1 + scale) + shift)`.
The text stream of a double block (512 tokens) runs as one chunk.

Values: casting early to the dtype autocast would cast to anyway, and skipping diffusers' fp32 round trip of the
attention output (bf16 -> fp32 -> bf16 into the next linear) change no value, so outputs are those of diffusers'
forward (tests compare the two); weight and input gradients are sums over tokens, now added chunk by chunk.

Memory: without grad (generation) each pass writes its chunks into preallocated outputs. With grad (training)
each pass is one autograd node (`_ChunkedPass`) that keeps only its inputs; its backward recomputes one chunk at a
time under the forward's autocast state and writes the chunk's input gradients into full-size buffers, so neither
a chunk's intermediates nor its gradients outlive it. It nests inside diffusers' block checkpointing, `save_on_cpu`
and autocast. Like reentrant checkpointing it accumulates parameter gradients with `.backward()` of each chunk, so
the training step must use `loss.backward()` (not `torch.autograd.grad`). The cost: one more forward of the
per-token parts per training step, and per chunk one more dequantization of the block's quantized weights.

Modules keep their names and parameters (adapters are saved and loaded by name): only the blocks' classes are
swapped for the subclasses below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from .adapted_linear import compute_dtype
from .errors import UraeError
from .hires import ProportionalAttnProcessor, attention_scale

SEQ_DIM = 1  # FLUX hidden states are (batch, tokens, channels); RoPE tables are (tokens, head_dim)
Tensors = tuple[torch.Tensor, ...]


def chunk_bounds(tokens: int, chunks: int) -> list[tuple[int, int]]:
    """(start, length) of `chunks` near-equal token chunks (at most one per token), cut as `tensor_split` cuts."""
    n = max(1, min(chunks, tokens))
    size, larger = divmod(tokens, n)
    lengths = [size + (i < larger) for i in range(n)]
    return [(sum(lengths[:i]), length) for i, length in enumerate(lengths)]


def _narrow(t: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """A token chunk of a hidden-state tensor (tokens on dim 1) or of a RoPE table (tokens on dim 0)."""
    return t.narrow(SEQ_DIM if t.ndim > 2 else 0, start, length)


def _run_chunks(fn: Callable[..., Tensors], split: Tensors, shared: Tensors, chunks: int) -> Tensors:
    """`fn` over token chunks of `split` (with `shared` whole), each output written into a preallocated full-size
    tensor shaped and typed by the first chunk's result (autocast may change dtypes)."""
    tokens = split[0].shape[SEQ_DIM]
    outs: list[torch.Tensor] = []
    for start, length in chunk_bounds(tokens, chunks):
        ys = fn(*(_narrow(t, start, length) for t in split), *shared)
        if not outs:
            outs = [y.new_empty((*y.shape[:SEQ_DIM], tokens, *y.shape[SEQ_DIM + 1 :])) for y in ys]
        for out, y in zip(outs, ys):
            out.narrow(SEQ_DIM, start, length).copy_(y)
        del ys
    return tuple(outs)


class _ChunkedPass(torch.autograd.Function):
    """One chunked pass as one autograd node: forward without grad into full-size outputs, keeping only the inputs;
    backward recomputes chunk by chunk with grad and writes input gradients into full-size buffers.

    The trainable parameters `fn` uses are passed as inputs too (unused by `fn`), so the outputs require grad even
    when no tensor input does (the first block); their gradients are accumulated by each chunk's `.backward()`."""

    @staticmethod
    def forward(
        ctx, fn: Callable[..., Tensors], chunks: int, n_split: int, n_tensors: int, *inputs: torch.Tensor
    ) -> Tensors:
        tensors = inputs[:n_tensors]
        device = tensors[0].device.type
        ctx.fn, ctx.chunks, ctx.n_split, ctx.n_params, ctx.device = fn, chunks, n_split, len(inputs) - n_tensors, device
        ctx.tokens = tensors[0].shape[SEQ_DIM]
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.autocast_cache = torch.is_autocast_cache_enabled()
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)
        with torch.no_grad():
            return _run_chunks(fn, tensors[:n_split], tensors[n_split:], chunks)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        tensors = ctx.saved_tensors
        split, shared = tensors[: ctx.n_split], tensors[ctx.n_split :]
        needs = ctx.needs_input_grad[4 : 4 + len(tensors)]
        split_grads = [torch.zeros_like(t) if need else None for t, need in zip(split, needs)]
        shared_grads: list[torch.Tensor | None] = [None] * len(shared)
        enabled, dtype = ctx.autocast
        for start, length in chunk_bounds(ctx.tokens, ctx.chunks):
            pieces = [_narrow(t, start, length).detach().requires_grad_(need) for t, need in zip(split, needs)]
            whole = [t.detach().requires_grad_(need) for t, need in zip(shared, needs[ctx.n_split :])]
            with (
                torch.enable_grad(),
                torch.autocast(ctx.device, dtype=dtype, enabled=enabled, cache_enabled=ctx.autocast_cache),
            ):
                ys = ctx.fn(*pieces, *whole)
            pairs = [(y, g.narrow(SEQ_DIM, start, length)) for y, g in zip(ys, grads) if g is not None]
            pairs = [(y, g) for y, g in pairs if y.requires_grad]
            if pairs:
                torch.autograd.backward([y for y, _ in pairs], [g for _, g in pairs])
            for full, piece in zip(split_grads, pieces):
                if full is not None and piece.grad is not None:
                    full.narrow(SEQ_DIM, start, length).copy_(piece.grad)
            for i, t in enumerate(whole):
                if t.grad is not None:
                    shared_grads[i] = t.grad if shared_grads[i] is None else shared_grads[i] + t.grad
            del ys, pairs, pieces, whole
        return (None, None, None, None, *split_grads, *shared_grads, *([None] * ctx.n_params))


def chunked_pass(
    module: nn.Module,
    fn: Callable[..., Tensors],
    split: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor],
    chunks: int,
) -> Tensors:
    """`fn(*split_chunk, *shared) -> tuple` over token chunks of `split`, concatenated: through `_ChunkedPass` when
    anything needs a gradient (an input or `module`'s trainable parameters), else a plain loop into preallocated
    outputs."""
    tensors = (*split, *shared)
    trainable = [p for p in module.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    if trainable or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _ChunkedPass.apply(fn, chunks, len(split), len(tensors), *tensors, *trainable)
    return _run_chunks(fn, tuple(split), tuple(shared), chunks)


# ---- the per-token pieces, as diffusers 0.42.1 writes them (FluxAttnProcessor, AdaLayerNormZero[Single]) --------
def _rope(t: torch.Tensor, rope: Tensors) -> torch.Tensor:
    return apply_rotary_emb(t, rope, sequence_dim=SEQ_DIM) if rope else t


def _heads(attn: nn.Module, x: torch.Tensor, linears: Sequence[nn.Module], norms: Sequence[nn.Module], rope: Tensors):
    """q, k, v of `x` (batch, tokens, heads, head_dim): projections, q/k RMSNorm, RoPE, then the attention's dtype."""
    q, k, v = (linear(x).unflatten(-1, (-1, attn.head_dim)) for linear in linears)
    q, k = norms[0](q), norms[1](k)
    q, k = _rope(q, rope), _rope(k, rope)
    return tuple(t.to(compute_dtype(t)) for t in (q, k, v))


def _attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The processor's attention over all tokens: diffusers' (default scale) or URAE's proportional scale."""
    processor = attn.processor
    scale = None
    if isinstance(processor, ProportionalAttnProcessor):
        scale = attention_scale(q.shape[SEQ_DIM], attn.head_dim, processor.base_tokens)
    out = dispatch_attention_fn(
        q,
        k,
        v,
        attn_mask=None,
        scale=scale,
        backend=processor._attention_backend,
        parallel_config=processor._parallel_config,
    )
    return out.flatten(2, 3).to(q.dtype)


def _modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def _plain_attention(attn: nn.Module, joint_attention_kwargs: dict | None) -> bool:
    """Chunk only what the passes reproduce: diffusers' or URAE's processor, unfused projections, no extra kwargs
    (anything else runs diffusers' unchunked forward)."""
    plain = type(attn.processor) in (FluxAttnProcessor, ProportionalAttnProcessor)
    return not joint_attention_kwargs and plain and not attn.fused_projections


class _TwoPassBlock:
    """The forward both chunked block classes share: diffusers' signature, and diffusers' own unchunked forward for
    what the passes do not reproduce; `_passes` is the block kind's two passes around its attention."""

    token_chunks: int = 1

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not _plain_attention(self.attn, joint_attention_kwargs):
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
        return self._passes(hidden_states, encoder_hidden_states, temb, tuple(image_rotary_emb or ()))


def _stream_qkv(attn: nn.Module, norm: nn.Module, added: bool, x: torch.Tensor, *rest: torch.Tensor) -> Tensors:
    """Pass 1 of one stream on a chunk: modulated LayerNorm, then q, k, v (`rest`: the RoPE chunks, shift, scale);
    `added`: the double blocks' text stream (its own projections and RMSNorms)."""
    *rope, shift, scale = rest
    if added:
        linears, norms = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k)
    else:
        linears, norms = (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
    return _heads(attn, _modulate(norm, x, shift, scale), linears, norms, rope)


class ChunkedFluxTransformerBlock(_TwoPassBlock, FluxTransformerBlock):
    """FluxTransformerBlock (double stream) in two token-chunked passes around the joint attention."""

    def _passes(self, hidden_states, encoder_hidden_states, temb, rope: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        text = encoder_hidden_states.shape[1]
        image_mods = self.norm1.linear(self.norm1.silu(temb)).chunk(6, dim=1)
        text_mods = self.norm1_context.linear(self.norm1_context.silu(temb)).chunk(6, dim=1)
        text_rope, image_rope = tuple(t[:text] for t in rope), tuple(t[text:] for t in rope)

        text_qkv = list(chunked_pass(self, self._text_qkv, (encoder_hidden_states, *text_rope), text_mods[:2], 1))
        image_qkv = list(
            chunked_pass(self, self._image_qkv, (hidden_states, *image_rope), image_mods[:2], self.token_chunks)
        )
        joint = []
        for i in range(3):  # one joint tensor at a time, each stream's part freed as soon as it is copied
            joint.append(torch.cat([text_qkv[i], image_qkv[i]], dim=SEQ_DIM))
            text_qkv[i] = image_qkv[i] = None
        out = _attention(self.attn, *joint)
        del joint
        text_attn, image_attn = out[:, :text], out[:, text:]

        (hidden_states,) = chunked_pass(
            self, self._image_out, (hidden_states, image_attn), image_mods[2:], self.token_chunks
        )
        (encoder_hidden_states,) = chunked_pass(
            self, self._text_out, (encoder_hidden_states, text_attn), text_mods[2:], 1
        )
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states

    def _image_qkv(self, x: torch.Tensor, *rest: torch.Tensor) -> Tensors:
        return _stream_qkv(self.attn, self.norm1.norm, False, x, *rest)

    def _text_qkv(self, x: torch.Tensor, *rest: torch.Tensor) -> Tensors:
        return _stream_qkv(self.attn, self.norm1_context.norm, True, x, *rest)

    def _image_out(self, x, attn, gate_msa, shift_mlp, scale_mlp, gate_mlp) -> Tensors:
        h = x + gate_msa.unsqueeze(1) * self.attn.to_out[1](self.attn.to_out[0](attn))
        return (h + gate_mlp.unsqueeze(1) * self.ff(_modulate(self.norm2, h, shift_mlp, scale_mlp)),)

    def _text_out(self, x, attn, gate_msa, shift_mlp, scale_mlp, gate_mlp) -> Tensors:
        h = x + gate_msa.unsqueeze(1) * self.attn.to_add_out(attn)
        return (h + gate_mlp.unsqueeze(1) * self.ff_context(_modulate(self.norm2_context, h, shift_mlp, scale_mlp)),)


class ChunkedFluxSingleTransformerBlock(_TwoPassBlock, FluxSingleTransformerBlock):
    """FluxSingleTransformerBlock in two token-chunked passes around the attention."""

    def _passes(self, hidden_states, encoder_hidden_states, temb, rope: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        shift, scale, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)

        q, k, v, normed = chunked_pass(self, self._qkv, (x, *rope), (shift, scale), self.token_chunks)
        attn = _attention(self.attn, q, k, v)
        del q, k, v
        (hidden_states,) = chunked_pass(self, self._mlp_out, (normed, attn, x), (gate,), self.token_chunks)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text], hidden_states[:, text:]

    def _qkv(self, x: torch.Tensor, *rest: torch.Tensor) -> Tensors:
        """q, k, v, and the normed tokens in the linears' compute dtype (what proj_mlp would cast them to)."""
        *rope, shift, scale = rest
        a = self.attn
        normed = _modulate(self.norm.norm, x, shift, scale)
        q, k, v = _heads(a, normed, (a.to_q, a.to_k, a.to_v), (a.norm_q, a.norm_k), rope)
        return q, k, v, normed.to(compute_dtype(normed))

    def _mlp_out(self, normed: torch.Tensor, attn: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> Tensors:
        mlp = self.act_mlp(self.proj_mlp(normed))
        return (x + gate.unsqueeze(1) * self.proj_out(torch.cat([attn, mlp], dim=2)),)


_CHUNKED = {
    FluxTransformerBlock: ChunkedFluxTransformerBlock,
    FluxSingleTransformerBlock: ChunkedFluxSingleTransformerBlock,
}
_PLAIN = {chunked: plain for plain, chunked in _CHUNKED.items()}


def enable_token_chunking(transformer: nn.Module, chunks: int) -> int:
    """Run every FLUX block of `transformer` in `chunks` token chunks (1 restores the original classes). Apply it
    before offload hooks: accelerate's and diffusers' hooks keep the `forward` they found. Returns the number of
    blocks it applies to. `chunks` comes checked (urae_lite.memory.MemorySettings)."""
    found = [
        (name, m, _PLAIN.get(type(m), type(m)))
        for name, m in transformer.named_modules()
        if _PLAIN.get(type(m), type(m)) in _CHUNKED
    ]
    if not found:
        raise UraeError(f"{type(transformer).__name__} has no FLUX blocks to chunk")
    for name, module, plain in found:  # all checked before any is changed
        target = plain if chunks == 1 else _CHUNKED[plain]
        if type(module) is not target and "forward" in vars(module):
            raise UraeError(
                f"{name or 'the model'} has an offload or other hook wrapping its forward: enable token "
                f"chunking before offloading the transformer"
            )
    for _, module, plain in found:
        if chunks == 1:
            module.__class__ = plain
            vars(module).pop("token_chunks", None)
        else:
            module.__class__ = _CHUNKED[plain]
            module.token_chunks = chunks
    return len(found)
