"""Frozen base weights stored as NF4 (bitsandbytes), FP8 (optimum-quanto) or bf16.

The libraries quantize; we only hold their tensors as module buffers so that `.to(device)`, offload hooks and
`state_dict` move and see everything. Dequantization goes through the Triton kernel on CUDA (when available)
and through the libraries' own code elsewhere, so the CPU path is the reference the kernels are tested against.

Storage layouts (what the kernels read):
* nf4  -- bitsandbytes `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`:
  `weight` uint8 (N*K/2, 1), two codes per byte, first element in the high nibble, row-major over (N, K);
  `absmax` uint8 (N*K/64,) indexes `nested_quant_map` (256 fp32, bnb's dynamic 8-bit map);
  real absmax of block j = nested_quant_map[absmax[j]] * nested_absmax[j // 256] + offset;
  w = quant_map[code] * absmax_real[i // 64], quant_map = the 16 NF4 levels.
* fp8  -- optimum-quanto `qfloat8_e4m3fn`, axis 0: `weight` float8_e4m3fn (N, K), `scale` (N, 1) in the
  compute dtype, scale = absmax(row) / 448; w = weight.to(dtype) * scale.
* bf16 -- `weight` (N, K) bf16.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

from .errors import UraeError

logger = logging.getLogger(__name__)

QUANT_FORMATS = ("nf4", "fp8", "bf16")
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256


def check_quant_format(fmt: str) -> str:
    if fmt not in QUANT_FORMATS:
        raise UraeError(f"unknown quantization '{fmt}': use one of {', '.join(QUANT_FORMATS)}")
    return fmt


KERNELS_ENV = "URAE_LITE_KERNELS"
KERNEL_MODES = ("auto", "off", "on")


def kernels_mode() -> str:
    """`URAE_LITE_KERNELS`: `auto` (default; also `1`) runs the Triton kernels for CUDA tensors, `off` (or `0`)
    never, `on` for every tensor (on the CPU that needs TRITON_INTERPRET=1: Triton's interpreter, for checking)."""
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower()
    mode = {"1": "auto", "0": "off"}.get(value, value)
    if mode not in KERNEL_MODES:
        raise UraeError(f"{KERNELS_ENV}={value} is not one of {', '.join(KERNEL_MODES)}")
    return mode


@functools.cache
def triton_available() -> bool:
    """Triton installs on Linux only; elsewhere the libraries' PyTorch paths run, and we say so once."""
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.warning(
            "Triton is not installed (it ships for Linux only): the adapted linears run through "
            "PyTorch (bitsandbytes / optimum-quanto dequantization + F.linear), with the same results "
            "up to rounding"
        )
        return False
    return True


def kernels_enabled(t: torch.Tensor) -> bool:
    """Whether the fused Triton path runs for `t` (see `kernels_mode`); the libraries' code runs otherwise."""
    mode = kernels_mode()
    if mode == "off" or (mode == "auto" and not t.is_cuda):
        return False
    return triton_available()


def nf4_quantize(w: torch.Tensor, chunk_elems: int = 2**18) -> tuple[torch.Tensor, ...]:
    """bitsandbytes NF4 with double-quantized absmax, bit-identical to `quantize_4bit(compress_statistics=True)`.

    bnb's CPU path makes temporaries ~16x the input in fp32 (3 GB for one FLUX MLP weight), so on CPU we quantize
    row chunks with the same op and then double-quantize the whole absmax exactly as `quantize_4bit` does (blocks of
    64 never straddle a chunk, and the offset is the mean over the full absmax). Returns
    (packed, absmax_u8, quant_map, nested_absmax, nested_quant_map, offset).

    Blocks run over the row-major flattened weight, as in bitsandbytes, so `in_features` need not be a multiple of
    the block size: a block may span two rows, and the last block may be partial (its absmax covers what is there).
    """
    import bitsandbytes.functional as bnbf

    flat = w.reshape(-1)
    step = chunk_elems // NF4_BLOCKSIZE * NF4_BLOCKSIZE if w.device.type == "cpu" else flat.numel()
    packed, absmax = [], []
    for start in range(0, flat.numel(), step):
        p, a = torch.ops.bitsandbytes.quantize_4bit.default(
            flat[start : start + step], NF4_BLOCKSIZE, "nf4", torch.uint8
        )
        packed.append(p.reshape(-1))
        absmax.append(a.reshape(-1))
    absmax_f = torch.cat(absmax)
    offset = absmax_f.mean()
    absmax_u8, nested = bnbf.quantize_blockwise(absmax_f - offset, blocksize=NF4_NESTED_BLOCKSIZE)
    code = bnbf.get_4bit_type("nf4", device=w.device)
    return torch.cat(packed).reshape(-1, 1), absmax_u8, code, nested.absmax, nested.code, offset


def _nf4_dequantize_bnb(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit`, except where its native CPU kernel is wrong.

    bitsandbytes 0.50's C++ CPU decode (`cdequantize_blockwise_cpu_nf4_*`) walks the weight row by row, so it
    mis-reads every 64-value block that spans two rows: rows whose width is not a multiple of 64 decode to garbage
    on some CPUs (AVX-512 ones; a scalar build may be right by luck). For those widths the same arithmetic runs in
    plain PyTorch over the flat row-major block layout the quantizer wrote, on every CPU alike (bitsandbytes' own
    generic decode does the same under torch.compile, which costs seconds per shape on first use).
    """
    import bitsandbytes.functional as bnbf

    width = state.shape[-1]
    if packed.device.type != "cpu" or width % NF4_BLOCKSIZE == 0:
        return bnbf.dequantize_4bit(packed, state, quant_type="nf4").to(state.dtype)
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
    absmax = (absmax + state.offset).float()  # as dequantize_4bit: a separate add, then fp32
    byte = packed.reshape(-1).view(torch.uint8)
    n = state.shape.numel()
    codes = torch.stack([byte >> 4, byte & 15], dim=1).reshape(-1)[:n].int()  # element 2i in the high nibble
    w = state.code.float()[codes]
    del codes
    w.mul_(absmax.repeat_interleave(state.blocksize)[:n])  # fp32 products, as bitsandbytes; one rounding below
    return w.reshape(tuple(state.shape)).to(state.dtype)


class QuantizedWeight(nn.Module):
    """A frozen (out_features, in_features) weight in one storage format; buffers only, never parameters."""

    def __init__(self, fmt: str, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.format = check_quant_format(fmt)
        self.out_features, self.in_features = out_features, in_features
        self.dtype = dtype  # the dtype dequantization produces (compute dtype)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def quantize(cls, weight: torch.Tensor, fmt: str, dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
        """Quantize a dense weight with the library that owns the format (bitsandbytes / quanto)."""
        out_features, in_features = weight.shape
        qw = cls(fmt, out_features, in_features, dtype)
        w = weight.detach().to(dtype)
        if fmt == "nf4":
            qw._set_nf4(*nf4_quantize(w))
        elif fmt == "fp8":
            from optimum.quanto import qfloat8_e4m3fn, quantize_weight
            from optimum.quanto.calibrate import absmax_scale

            scale = absmax_scale(w, qfloat8_e4m3fn, axis=0)
            # optimized=False: quanto's plain layout. With the default, a CUDA GPU of compute capability >= 8
            # gets a Marlin tensor (int32-packed data, permuted scales, a JIT-built extension) for every FLUX shape,
            # which neither our kernel nor the reference path reads.
            q = quantize_weight(w, qtype=qfloat8_e4m3fn, axis=0, scale=scale, optimized=False)
            if q._data.dtype != torch.float8_e4m3fn or q._data.shape != w.shape:
                raise RuntimeError(
                    f"optimum-quanto returned {type(q).__name__} with {q._data.dtype} data "
                    f"{tuple(q._data.shape)}; urae-lite reads plain e4m3 (N, K)"
                )
            qw.register_buffer("weight", q._data.contiguous())
            qw.register_buffer("scale", q._scale.contiguous())
        else:
            qw.register_buffer("weight", w.contiguous())
        return qw

    def _set_nf4(self, packed, absmax, quant_map, nested_absmax, nested_quant_map, offset) -> None:
        self.register_buffer("weight", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("quant_map", quant_map.float())
        self.register_buffer("nested_absmax", nested_absmax.float())
        self.register_buffer("nested_quant_map", nested_quant_map.float())
        self.register_buffer("offset", torch.as_tensor(offset, dtype=torch.float32).reshape(()))

    # ---- use ----------------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def bnb_quant_state(self):
        """The bitsandbytes QuantState describing our NF4 buffers (cheap; no copies)."""
        from bitsandbytes.functional import QuantState

        nested = QuantState(
            absmax=self.nested_absmax, code=self.nested_quant_map, blocksize=NF4_NESTED_BLOCKSIZE, dtype=torch.float32
        )
        return QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=self.quant_map,
            blocksize=NF4_BLOCKSIZE,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=nested,
        )

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense (N, K) weight in `self.dtype`; into `out` when given (a reused buffer)."""
        if self.format == "bf16":
            w = self.weight if self.weight.dtype == self.dtype else self.weight.to(self.dtype)
            return w if out is None else out.copy_(w)
        if kernels_enabled(self.weight):
            from urae_lite import kernels

            if self.format == "nf4":
                return kernels.nf4_dequantize(
                    self.weight,
                    self.absmax,
                    self.nested_absmax,
                    self.nested_quant_map,
                    self.offset,
                    self.quant_map,
                    self.shape,
                    out=out,
                    dtype=self.dtype,
                )
            return kernels.fp8_dequantize(self.weight, self.scale, out=out, dtype=self.dtype)
        w = self.dequantize_reference()
        return w if out is None else out.copy_(w)

    def dequantize_reference(self) -> torch.Tensor:
        """Dequantize with the owning library's code (bitsandbytes / quanto arithmetic)."""
        if self.format == "nf4":
            return _nf4_dequantize_bnb(self.weight, self.bnb_quant_state())
        if self.format == "fp8":
            return self.weight.to(self.scale.dtype).mul(self.scale).to(self.dtype)
        return self.weight.to(self.dtype)

    # ---- serialization (bitsandbytes / diffusers key layout) -----------------------------------------
    def to_state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under the keys diffusers/transformers use for a serialized bnb or quanto layer."""
        if self.format == "nf4":
            packed = self.bnb_quant_state().as_dict(packed=True)
            out = {f"{prefix}.weight": self.weight}
            out.update({f"{prefix}.weight.{k}": v for k, v in packed.items()})
            return out
        if self.format == "fp8":
            return {f"{prefix}.weight._data": self.weight, f"{prefix}.weight._scale": self.scale}
        return {f"{prefix}.weight": self.weight}

    @classmethod
    def from_state_tensors(
        cls,
        fmt: str,
        prefix: str,
        tensors: dict[str, torch.Tensor],
        shape: tuple[int, int],
        dtype: torch.dtype = torch.bfloat16,
    ) -> QuantizedWeight:
        qw = cls(fmt, shape[0], shape[1], dtype)
        try:
            if fmt == "nf4":
                from bitsandbytes.functional import QuantState

                extra = {
                    k[len(prefix) + len(".weight.") :]: v
                    for k, v in tensors.items()
                    if k.startswith(f"{prefix}.weight.")
                }
                state = QuantState.from_dict(extra, device=tensors[f"{prefix}.weight"].device)
                if tuple(state.shape) != tuple(shape):
                    raise UraeError(f"{prefix}: stored NF4 shape {tuple(state.shape)} does not match {tuple(shape)}")
                qw._set_nf4(
                    tensors[f"{prefix}.weight"],
                    state.absmax,
                    state.code,
                    state.state2.absmax,
                    state.state2.code,
                    state.offset,
                )
            elif fmt == "fp8":
                qw.register_buffer("weight", tensors[f"{prefix}.weight._data"])
                qw.register_buffer("scale", tensors[f"{prefix}.weight._scale"])
            else:
                qw.register_buffer("weight", tensors[f"{prefix}.weight"])
        except KeyError as e:
            raise UraeError(
                f"quantized checkpoint lacks tensor {e} for module {prefix}: re-run `urae-lite prepare`"
            ) from e
        return qw

    def extra_repr(self) -> str:
        return f"{self.format}, out_features={self.out_features}, in_features={self.in_features}"
