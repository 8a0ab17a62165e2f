"""Activation memory of token-chunked FLUX blocks (urae_lite/token_chunking.py), moment by moment.

A chunked block runs pass 1 (norm -> q, k, v -> RMSNorm -> RoPE) in token chunks into full-size q, k, v (and, in
single blocks, the normed tokens), the attention over all tokens, then pass 2 (the output projection, MLP, gates and
residuals) in token chunks into the full-size output. With grad each pass is one autograd node keeping only its
inputs, and its backward recomputes one chunk at a time, writing the chunk's input gradients into full-size buffers.

Units as in plan/activations.py: bytes per (token x hidden element) of the whole block's T tokens. Full-size tensors
are the block's input and output (`a` each), q, k, v and the attention output (`a`: they are cast to the dtype the
attention computes in), the single blocks' normed tokens (`a`, the linears' compute dtype) and the gradient buffers
(`a`). A chunk's working set (`W`, per token of the chunk) counts only for the chunk's fraction of the tokens: 1/c in
single blocks; in double blocks the image stream's chunks, (1 - text share)/c, or the text stream run whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import FP32


@dataclass(frozen=True)
class ChunkedCosts:
    """What differs between precisions, per (token x hidden element) (see activations.Precision)."""

    act: int  # activations and the tensors the passes hand on
    norm: int  # LayerNorm / RMSNorm outputs (fp32 under CUDA autocast)
    rope: float  # one of q / k through RoPE (activations._rope)
    out: float  # a linear's output (+ the reference path's separate `+ bias` copy)
    sdpa_backward: float  # SDPA backward's fp32 buffers
    lse: float  # SDPA's saved logsumexp (fp32 per token and head)
    dense_qkv: float = 0.0  # the reference path's dense weight of a q/k/v projection while it runs
    dense_mlp: float = 0.0  # ... of the largest pass-2 linear (proj_out in single blocks, the FF's in double)


@dataclass(frozen=True)
class ChunkedBlock:
    """The moments of one chunked block kind (activations._Block's fields): inside a block checkpoint the forward
    is `inference` (nothing is saved) and the backward after the recompute is `backward`."""

    saved: float  # kept for backward without block checkpointing
    inference: float  # no grad
    forward: float  # with grad, no block checkpointing (its own saved tensors included)
    backward: float  # its backward (its own saved tensors included; the block input no longer needed)
    recompute: float  # the block checkpoint's recompute in backward, block input included


def _pass1(c: ChunkedCosts) -> tuple[float, float]:
    """(forward, backward) working sets of one pass-1 chunk: the normed tokens (and their compute-dtype copy), q and
    k after RMSNorm, v, q after RoPE and k in RoPE; backward: what the recompute saves (LayerNorm's input and output,
    the linears' inputs, the RMSNorm inputs) and the fp32 gradients of q and k through RoPE and RMSNorm."""
    a, n = c.act, c.norm
    forward = 4 * n + 2 * a + c.rope
    backward = 2 * n + 5 * a + 3 * n
    return forward, backward


def single(c: ChunkedCosts, m: float, chunks: int) -> ChunkedBlock:
    """A chunked single block (joint tokens chunked): block input `y` (the previous output), its cat `x`, q, k, v,
    the normed tokens `h`, the attention output `o`, the output; with grad the output gradient `g` and the
    gradient buffers of h, o and x."""
    a, f = c.act, 1 / chunks
    w1, w1_grad = _pass1(c)
    w2 = (1 + 2 * m) * a + c.out  # MLP output and GELU, the cat, proj_out's output
    w2_grad = 3 * (1 + m) * a  # the recompute's GELU input and cat, d(cat) and GELU's gradient
    w1, w1_grad = w1 * f + c.dense_qkv, w1_grad * f + c.dense_qkv
    w2, w2_grad = w2 * f + c.dense_mlp, w2_grad * f + c.dense_mlp
    pass1 = 6 * a + w1  # y, x, q, k, v, h (preallocated) + a chunk
    attention = 7 * a + c.lse  # y, x, q, k, v, h, o
    pass2 = 5 * a + w2  # y, x, h, o, the output + a chunk
    inference = max(pass1, attention, pass2)
    saved = 6 * a + c.lse  # x (both passes), q, k, v, o (SDPA), h (pass 2)
    grad_pass2 = 10 * a + w2_grad  # g, x, q, k, v, o, h, d(h), d(o), d(x)
    sdpa = 11 * a + c.sdpa_backward + c.lse  # x, q, k, v, o, d(h), d(o), d(x), dq, dk, dv
    grad_pass1 = 7 * a + w1_grad  # x, d(h), dq, dk, dv, d(x) of both passes
    after = max(grad_pass2, sdpa, grad_pass1)
    forward = max(pass1, attention, 8 * a + c.lse + w2)  # + the saved q, k, v in pass 2
    return ChunkedBlock(
        saved=saved,
        inference=inference,
        forward=forward,
        backward=after,
        recompute=max(a + pass1, a + attention, 9 * a + c.lse + w2),  # + g; pass 2 with the saved q, k, v
    )


def double(c: ChunkedCosts, m: float, chunks: int, text_share: float) -> ChunkedBlock:
    """A chunked double block (image tokens chunked, the text stream whole): the inputs `x` (both streams), q, k,
    v per stream then joint, the attention output `o`, the outputs; with grad the output gradient `g` and the
    gradient buffers of o and x."""
    a, n = c.act, c.norm
    f = max((1 - text_share) / chunks, text_share)  # the largest chunk: an image chunk or the text stream
    w1, w1_grad = _pass1(c)
    cast = a if n != a else 0  # the linears' compute-dtype copy of a normed tensor
    w2 = a + n + cast + 2 * m * a + c.out  # h, norm2 output (+ cast), the FF hidden and GELU, an output
    w2_grad = 3 * a + 2 * n + 3 * m * a  # the recompute's saved tensors and the FF's gradients
    w1, w1_grad = w1 * f + c.dense_qkv, w1_grad * f + c.dense_qkv
    w2, w2_grad = w2 * f + c.dense_mlp, w2_grad * f + c.dense_mlp
    pass1 = 4 * a + w1  # x, the per-stream q, k, v + a chunk
    joint = 5 * a  # x, the parts, one joint tensor
    attention = 5 * a + c.lse  # x, q, k, v, o
    pass2 = 3 * a + w2  # x, o, the output + a chunk
    inference = max(pass1, joint, attention, pass2)
    saved = 5 * a + c.lse  # x, q, k, v, o
    grad_pass2 = 8 * a + w2_grad  # g, x, q, k, v, o, d(o), d(x)
    sdpa = 10 * a + c.sdpa_backward + c.lse  # x, q, k, v, o, d(o), d(x), dq, dk, dv
    grad_pass1 = 6 * a + w1_grad  # x, dq, dk, dv, d(x) of both passes
    after = max(grad_pass2, sdpa, grad_pass1)
    forward = max(pass1, joint, attention, 6 * a + c.lse + w2)  # + the saved q, k, v in pass 2
    return ChunkedBlock(
        saved=saved,
        inference=inference,
        forward=forward,
        backward=after,
        recompute=max(a + pass1, a + joint, a + attention, 7 * a + c.lse + w2),
    )


def lse_bytes(heads: int, hidden: int) -> float:
    """SDPA's logsumexp, fp32 per token and head, per (token x hidden element)."""
    return heads * FP32 / hidden
