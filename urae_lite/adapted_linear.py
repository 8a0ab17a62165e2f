"""A linear layer = frozen quantized base + ONE concatenated low-rank branch built from named slices.

    y = x·Wᵀ + bias + Σ_i s_i·(x·A_iᵀ)·B_iᵀ  =  x·Wᵀ + bias + (x·Aᵀ)·Bᵀ,
    A = cat_i A_i  (R, K),  B = cat_i s_i·B_i  (N, R),  R = Σ r_i

One branch instead of one per adapter means one skinny GEMM pair (or one fused kernel) however many adapters a
module carries: a style LoRA, the URAE 2K LoRA, and the frozen/trainable halves of a minor-component adapter
are all slices. Slices are concatenated trainable-first so the fused kernel's backward computes dA/dB only for
the prefix [0, n_trainable).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_switch import kernels_enabled
from .quant import QuantizedWeight


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype linears and attention compute `x` in: autocast's lower precision where it is on for `x`'s device
    (both are on autocast's cast-down list), else `x`'s own. Casting to it early changes no value."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class LowRankSlice(nn.Module):
    """One adapter's factors in a branch: delta W = scale · B·A with A (r, K), B (N, r)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, trainable: bool = False):
        super().__init__()
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"slice factors do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}")
        self.A = nn.Parameter(A, requires_grad=trainable)
        self.B = nn.Parameter(B, requires_grad=trainable)
        self.scale = float(scale)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def trainable(self) -> bool:
        return self.A.requires_grad

    def delta(self) -> torch.Tensor:
        """The dense (N, K) update in fp32, for tests, conversion and merging."""
        return self.scale * (self.B.float() @ self.A.float())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, trainable={self.trainable}"


class _FrozenBaseLinear(torch.autograd.Function):
    """x·Wᵀ with W dequantized in forward AND again in backward, so no dense W is saved for autograd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: QuantizedWeight) -> torch.Tensor:
        ctx.base = base
        return F.linear(x, base.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.base.dequantize().to(grad_out.dtype), None


class AdaptedLinear(nn.Module):
    """Drop-in for nn.Linear inside FLUX blocks; the base weight lives in `self.base` (NF4/FP8/bf16 buffers)."""

    def __init__(self, base: QuantizedWeight | None, bias: torch.Tensor | None, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.base = base
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.slices = nn.ModuleDict()

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, dtype: torch.dtype = torch.bfloat16) -> AdaptedLinear:
        base = QuantizedWeight.quantize(linear.weight.data, fmt, dtype)
        bias = None if linear.bias is None else linear.bias.data.to(dtype)
        return cls(base, bias, linear.in_features, linear.out_features)

    # ---- slices --------------------------------------------------------------------------------------
    def add_slice(
        self,
        name: str,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float = 1.0,
        trainable: bool = False,
        dtype: torch.dtype = torch.bfloat16,
    ) -> LowRankSlice:
        """Attach factors A (r, in_features), B (out_features, r); names are unique per module.

        Refused on a linear of a block-swapped block: its frozen tensors move between host and device memory with
        the window, which knows only those it found when it was enabled, so new factors would stay where the base's
        host copy is while the rest of the branch is on the GPU, and the concatenation would mix devices."""
        from .block_swap import is_swapped
        from .errors import UraeError

        if is_swapped(self):
            raise UraeError(
                f"cannot add adapter slice '{name}' while block swap streams this layer's block: add adapters "
                "before block swap (disable_block_swap(transformer), add them, then enable_block_swap again)"
            )
        if A.shape[1] != self.in_features or B.shape[0] != self.out_features:
            raise ValueError(
                f"adapter '{name}' has A {tuple(A.shape)}, B {tuple(B.shape)} but the layer is "
                f"{self.out_features}x{self.in_features}"
            )
        device = next(self.base.buffers()).device  # the base is filled first; a bias may still be a meta placeholder
        piece = LowRankSlice(
            A.detach().to(device, dtype).clone(), B.detach().to(device, dtype).clone(), scale, trainable
        )
        self.slices[name] = piece
        return piece

    def add_lora(
        self,
        name: str,
        rank: int,
        alpha: float | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> LowRankSlice:
        """A fresh trainable LoRA: A Kaiming-uniform (as peft), B zero, so the layer is unchanged at init."""
        A = torch.empty(rank, self.in_features)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear and peft use
        A.uniform_(-bound, bound, generator=generator)
        B = torch.zeros(self.out_features, rank)
        scale = 1.0 if alpha is None else alpha / rank
        return self.add_slice(name, A, B, scale, trainable=True, dtype=dtype)

    def branch(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(A (R, K), s⊙B (N, R), n_trainable) with trainable slices first, each slice cast to `dtype` (if given)
        before the concatenation; None without slices. Casting first gives the same values, and each trainable
        factor's gradient is then its own fp32 tensor, not a view that keeps the whole concatenation's gradient."""
        if not self.slices:
            return None
        ordered = sorted(self.slices.values(), key=lambda s: not s.trainable)  # stable: keeps insertion order

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t if dtype is None else t.to(dtype)

        A = torch.cat([cast(s.A) for s in ordered], dim=0)
        B = torch.cat([cast(s.B * s.scale if s.scale != 1.0 else s.B) for s in ordered], dim=1)
        n_trainable = sum(s.rank for s in ordered if s.trainable)
        return A, B, n_trainable

    def delta(self) -> torch.Tensor:
        """Sum of all slices' updates (N, K) in fp32."""
        out = torch.zeros(self.out_features, self.in_features)
        for s in self.slices.values():
            out += s.delta().cpu()
        return out

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        x = x.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        branch = self.branch(dtype)
        if self._fused(x):
            from urae_lite import kernels

            if branch is None:
                return kernels.adapted_linear(x, self.base, bias, None, None, 0)
            A, B, n_trainable = branch
            return kernels.adapted_linear(x, self.base, bias, A.to(dtype), B.to(dtype), n_trainable)
        return self.forward_reference(x, bias, branch)

    @staticmethod
    def _fused(x: torch.Tensor) -> bool:
        """The fused kernel runs the layer when its forward passed, and its backward too if this call will need dx
        (the backward's kernel computes dx; the adapters' gradients are plain matmuls either way)."""
        if not kernels_enabled(x, "lowrank_forward"):
            return False
        return not (torch.is_grad_enabled() and x.requires_grad) or kernels_enabled(x, "lowrank_backward")

    def forward_reference(
        self, x: torch.Tensor, bias: torch.Tensor | None, branch: tuple[torch.Tensor, torch.Tensor, int] | None
    ) -> torch.Tensor:
        """Plain PyTorch: dequantize-and-matmul for the base, (x·Aᵀ)·Bᵀ for the branch."""
        with torch.autocast(x.device.type, enabled=False):
            y = _FrozenBaseLinear.apply(x, self.base)
            if bias is not None:
                y = y + bias
            if branch is not None:
                A, B, _ = branch
                y = y + F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
