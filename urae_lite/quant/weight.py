"""`QuantizedWeight`: a frozen (out_features, in_features) weight held as module buffers in one storage format.

The libraries quantize; we only hold their tensors as buffers so that `.to(device)`, offload hooks and `state_dict`
move and see everything. Dequantization goes through the Triton kernel on CUDA (when enabled) and through the
libraries' own code elsewhere, so the CPU path is the reference the kernels are tested against. Everything that
depends on the format is asked of `self.quant` (a `QuantFormat`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UraeError
from ..kernel_switch import kernels_enabled
from .base import QuantFormat
from .registry import get_format


class QuantizedWeight(nn.Module):
    """A frozen (out_features, in_features) weight in the storage format `quant`; buffers only, never parameters."""

    def __init__(
        self,
        quant: QuantFormat,
        out_features: int,
        in_features: int,
        dtype: torch.dtype = torch.bfloat16,
        buffers: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.quant = quant
        self.out_features, self.in_features = out_features, in_features
        self.dtype = dtype  # the dtype dequantization produces (compute dtype)
        for name, tensor in (buffers or {}).items():
            self.register_buffer(name, tensor)

    @classmethod
    def quantize(
        cls, weight: torch.Tensor, quant: QuantFormat | str, dtype: torch.dtype = torch.bfloat16
    ) -> QuantizedWeight:
        """Quantize a dense weight with the library that owns the format."""
        fmt = get_format(quant)
        out_features, in_features = weight.shape
        return cls(fmt, out_features, in_features, dtype, fmt.quantize(weight.detach().to(dtype), dtype))

    @classmethod
    def from_state_tensors(
        cls,
        quant: QuantFormat | str,
        prefix: str,
        tensors: dict[str, torch.Tensor],
        shape: tuple[int, int],
        dtype: torch.dtype = torch.bfloat16,
    ) -> QuantizedWeight:
        """The weight from tensors under the keys `to_state_tensors` writes (a prepared checkpoint)."""
        fmt = get_format(quant)
        try:
            buffers = fmt.from_state_tensors(prefix, tensors, shape)
        except KeyError as e:
            raise UraeError(
                f"quantized checkpoint lacks tensor {e} for module {prefix}: re-run `urae-lite prepare`"
            ) from e
        return cls(fmt, shape[0], shape[1], dtype, buffers)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def dense(self) -> bool:
        """Stored dense in the compute dtype (nothing to dequantize: the kernels need no workspace for it)."""
        return self.quant.dense

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense (N, K) weight in `self.dtype`; into `out` when given (a reused buffer)."""
        op = self.quant.kernel_op
        if op is not None and kernels_enabled(self.weight, op, self.dtype):
            return self.quant.dequantize_kernel(self, out)
        w = self.dequantize_reference()
        return w if out is None else out.copy_(w)

    def dequantize_reference(self) -> torch.Tensor:
        """Dequantize with the owning library's code (bitsandbytes / quanto arithmetic)."""
        return self.quant.dequantize(self)

    def to_state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under the keys diffusers/transformers use for a serialized bitsandbytes or quanto layer."""
        return self.quant.state_tensors(self, prefix)

    def extra_repr(self) -> str:
        return f"{self.quant.name}, out_features={self.out_features}, in_features={self.in_features}"
