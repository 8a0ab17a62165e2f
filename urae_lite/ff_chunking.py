"""Token-chunked feed-forward for FLUX blocks: the same math, with the 4x-wide MLP intermediates alive for one
chunk of tokens at a time.

At 4096² a block sees 65,536 + 512 tokens; each T x 4D MLP intermediate (proj_mlp's output, GELU's output, the
single blocks' cat(attention, mlp)) is then 1.5-1.9 GiB in bf16, the largest tensors of a block. Everything in
those regions is per token, so it can run on token chunks:

* double blocks: `ff` and `ff_context` (diffusers FeedForward: Linear D->4D, GELU(tanh), Linear 4D->D);
* single blocks: the attention runs first over all tokens, then per chunk
  `residual + gate * proj_out(cat(attn, GELU(proj_mlp(norm))))` (diffusers computes the MLP before the
  attention; the two are independent, so the order does not change a value).

Modules keep their names and parameters (adapters are saved and loaded by name): only the instances' classes are
swapped for the subclasses below, whose `forward` chunks. Without grad (generation) the chunks run in a plain loop
writing into one preallocated output. With grad (training) each chunk runs under a non-reentrant
`torch.utils.checkpoint`, so backward recomputes the chunk's intermediates one chunk at a time; it nests inside
diffusers' block checkpointing, `save_on_cpu` and autocast. The cost: one more MLP forward per step in training,
and per chunk one more dequantization of the quantized MLP weights (fused into the kernel on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import UraeError

SEQ_DIM = 1  # FLUX hidden states are (batch, tokens, channels)


def check_ff_chunks(chunks: object) -> int:
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise UraeError(f"ff_chunks must be a whole number of at least 1 (1 = off), got {chunks!r}")
    return chunks


def _needs_grad(module: nn.Module, tensors: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (
        any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())
    )


def run_in_chunks(
    fn: Callable[..., torch.Tensor],
    split: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor],
    chunks: int,
    module: nn.Module,
) -> torch.Tensor:
    """`fn(*split, *shared)` computed on near-equal token chunks of the `split` tensors (`shared` go to every chunk).

    Without grad each chunk's result is copied into one preallocated output and freed, so the chunk results and a
    concatenated copy of them never coexist. With grad the chunk outputs are concatenated rather than written into a
    buffer: in-place writes into slices of one tensor would make autograd chain a CopySlices node per chunk, each
    cloning the full-size output gradient in backward, while `cat` costs one output-size copy in forward and only
    views in backward."""
    tokens = split[0].shape[SEQ_DIM]
    n = min(chunks, tokens)
    if n <= 1:
        return fn(*split, *shared)
    parts = zip(*(t.tensor_split(n, dim=SEQ_DIM) for t in split))
    if _needs_grad(module, [*split, *shared]):
        return torch.cat([checkpoint(fn, *part, *shared, use_reentrant=False) for part in parts], dim=SEQ_DIM)
    out, start = None, 0
    for part in parts:
        y = fn(*part, *shared)
        if out is None:  # shaped and typed by the first chunk's result (autocast may change the dtype)
            out = y.new_empty((*y.shape[:SEQ_DIM], tokens, *y.shape[SEQ_DIM + 1 :]))
        out.narrow(SEQ_DIM, start, y.shape[SEQ_DIM]).copy_(y)
        start += y.shape[SEQ_DIM]
        del y
    return out


class ChunkedFeedForward(FeedForward):
    """diffusers FeedForward run in `ff_chunks` token chunks."""

    ff_chunks: int = 1

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if hidden_states.ndim != 3:
            return super().forward(hidden_states, *args, **kwargs)
        plain = super().forward
        return run_in_chunks(lambda x: plain(x, *args, **kwargs), (hidden_states,), (), self.ff_chunks, self)


class ChunkedFluxSingleTransformerBlock(FluxSingleTransformerBlock):
    """FluxSingleTransformerBlock whose MLP + output projection run in `ff_chunks` token chunks.

    `forward` mirrors diffusers 0.42.1 `FluxSingleTransformerBlock.forward` (tests compare the two, so a change
    in diffusers shows up there) with the attention moved before the MLP."""

    ff_chunks: int = 1

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        joint_attention_kwargs = joint_attention_kwargs or {}
        attn_output = self.attn(
            hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **joint_attention_kwargs
        )
        hidden_states = run_in_chunks(
            self._mlp_out, (norm_hidden_states, attn_output, residual), (gate.unsqueeze(1),), self.ff_chunks, self
        )
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)

        encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
        return encoder_hidden_states, hidden_states

    def _mlp_out(
        self, norm_hidden_states: torch.Tensor, attn_output: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor
    ) -> torch.Tensor:
        """The per-token rest of the block: MLP, cat with the attention output, projection, gate, residual."""
        mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
        hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
        return residual + gate * self.proj_out(hidden_states)


_CHUNKED = {FeedForward: ChunkedFeedForward, FluxSingleTransformerBlock: ChunkedFluxSingleTransformerBlock}
_PLAIN = {chunked: plain for plain, chunked in _CHUNKED.items()}


def enable_ff_chunking(transformer: nn.Module, chunks: int) -> int:
    """Run every FeedForward and single block's MLP of `transformer` in `chunks` token chunks (1 restores the
    original classes). Apply it before offload hooks: accelerate's and diffusers' hooks keep the `forward` they
    found. Returns the number of modules it applies to."""
    check_ff_chunks(chunks)
    found = [
        (name, m, _PLAIN.get(type(m), type(m)))
        for name, m in transformer.named_modules()
        if _PLAIN.get(type(m), type(m)) in _CHUNKED
    ]
    if not found:
        raise UraeError(f"{type(transformer).__name__} has no FLUX feed-forward blocks to chunk")
    for name, module, plain in found:  # all checked before any is changed
        target = plain if chunks == 1 else _CHUNKED[plain]
        if type(module) is not target and "forward" in vars(module):
            raise UraeError(
                f"{name or 'the model'} has an offload or other hook wrapping its forward: enable ff "
                f"chunking before offloading the transformer"
            )
    for _, module, plain in found:
        if chunks == 1:
            module.__class__ = plain
            vars(module).pop("ff_chunks", None)
        else:
            module.__class__ = _CHUNKED[plain]
            module.ff_chunks = chunks
    return len(found)
