"""URAE's three high-resolution inference changes to FLUX, as plain switches on a diffusers model.

* Proportional attention: the softmax scale grows with the token count N (text + image) so attention entropy at
  2K/4K stays what the model saw at 1024²: ``scale = sqrt(log N / log 4608) / sqrt(head_dim)``, 4608 = 512 text
  + 64·64 image tokens. Multipliers: 1024² 1.000, 2048² 1.0743, 4096² 1.1470. An attention processor, on all
  57 blocks.
* NTK RoPE: the rotary base θ = 10000 · ntk (same for the three axes; positions are not interpolated).
* Static time shift: dynamic (resolution-dependent) shifting off and a static ``shift``; it lives in
  urae_lite/timeshift.py, shared with training's validation sampler. The authors' notebooks set
  ``time_shift = 10`` on the scheduler config, but no code reads that name: their images were made with the
  scheduler's own ``shift`` (3.0 for dev, 1.0 for schnell), so that is our default and ``shift`` is a setting.
  See docs/high-resolution.md.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

BASE_TOKENS = 4608  # 512 text + 4096 image tokens: FLUX's native 1024² sequence
BASE_THETA = 10000.0  # FluxPosEmbed's rope base in FLUX.1


def attention_scale(n_tokens: int, head_dim: int, base_tokens: int = BASE_TOKENS) -> float:
    """URAE's SDPA scale for a sequence of `n_tokens` (text + image)."""
    return math.sqrt(math.log(n_tokens) / math.log(base_tokens)) / math.sqrt(head_dim)


class ProportionalAttnProcessor(FluxAttnProcessor):
    """diffusers' FluxAttnProcessor with the token-count-dependent softmax scale passed to SDPA.

    Same projections, QK-norms, RoPE and output split as the stock processor; only `scale=` differs, and with
    `base_tokens = N` it reproduces the stock output (tested).
    """

    def __init__(self, base_tokens: int = BASE_TOKENS):
        super().__init__()
        self.base_tokens = base_tokens

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        # (B, S, heads·D) -> (B, S, heads, D)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:  # double block: text tokens first, then image tokens
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        scale = attention_scale(query.shape[1], attn.head_dim, self.base_tokens)  # N = text + image tokens
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            scale=scale,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)  # (B, N, heads·D)
        if encoder_hidden_states is None:
            return out
        n_text = encoder_hidden_states.shape[1]
        text, image = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


def set_proportional_attention(transformer: nn.Module, enabled: bool) -> None:
    """Install URAE's processor on every FLUX attention module, or diffusers' stock one."""
    transformer.set_attn_processor(ProportionalAttnProcessor() if enabled else FluxAttnProcessor())


def set_ntk(transformer: nn.Module, factor: float) -> None:
    """RoPE base θ = 10000 · factor; FluxPosEmbed reads `theta` at every forward."""
    if factor <= 0:
        raise ValueError(f"ntk factor must be positive, got {factor}")
    transformer.pos_embed.theta = BASE_THETA * factor
