"""NF4: bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`.

Layout (what the kernel reads): `weight` uint8 (ceil(N*K/2), 1), two codes per byte, first element in the high
nibble, row-major over (N, K); `absmax` uint8 (ceil(N*K/64),) indexes `nested_quant_map` (256 fp32, bitsandbytes'
dynamic 8-bit map); real absmax of block j = nested_quant_map[absmax[j]] * nested_absmax[j // 256] + offset;
w = quant_map[code] * absmax_real[i // 64], quant_map = the 16 NF4 levels.

Blocks run over the row-major flattened weight, as in bitsandbytes, so `in_features` need not be a multiple of the
block size: a block may span two rows, and the last block may be partial (its absmax covers what is there).
"""

from __future__ import annotations

import torch

from ..errors import UraeError
from .base import Layout, QuantFormat

NF4_BLOCKSIZE = 64  # weights per absmax code
NF4_NESTED_BLOCKSIZE = 256  # absmax codes per fp32 nested absmax (double quantization)
NF4_LEVELS = 16
NESTED_MAP_SIZE = 256


def nf4_quantize(w: torch.Tensor, chunk_elems: int = 2**18) -> dict[str, torch.Tensor]:
    """bitsandbytes NF4 with double-quantized absmax, bit-identical to `quantize_4bit(compress_statistics=True)`.

    bnb's CPU path makes temporaries ~16x the input in fp32 (3 GB for one FLUX MLP weight), so on CPU we quantize
    row chunks with the same op and then double-quantize the whole absmax exactly as `quantize_4bit` does (blocks of
    64 never straddle a chunk, and the offset is the mean over the full absmax)."""
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
    return _buffers(
        torch.cat(packed).reshape(-1, 1),
        absmax_u8,
        bnbf.get_4bit_type("nf4", device=w.device),
        nested.absmax,
        nested.code,
        offset,
    )


def _buffers(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset) -> dict[str, torch.Tensor]:
    return {
        "weight": packed,
        "absmax": absmax,
        "quant_map": quant_map.float(),
        "nested_absmax": nested_absmax.float(),
        "nested_quant_map": nested_quant_map.float(),
        "offset": torch.as_tensor(offset, dtype=torch.float32).reshape(()),
    }


def bnb_quant_state(qw):
    """The bitsandbytes QuantState describing NF4 buffers (cheap; no copies)."""
    from bitsandbytes.functional import QuantState

    nested = QuantState(
        absmax=qw.nested_absmax, code=qw.nested_quant_map, blocksize=NF4_NESTED_BLOCKSIZE, dtype=torch.float32
    )
    return QuantState(
        absmax=qw.absmax,
        shape=qw.shape,
        code=qw.quant_map,
        blocksize=NF4_BLOCKSIZE,
        quant_type="nf4",
        dtype=qw.dtype,
        offset=qw.offset,
        state2=nested,
    )


def dequantize_bnb(packed: torch.Tensor, state) -> torch.Tensor:
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


class NF4(QuantFormat):
    name = "nf4"
    kernel_op = "nf4_dequantize"
    speed = 1.06  # table lookups and the nested absmax on the way into the workspace

    def layout(self, out_features: int, in_features: int, dtype: torch.dtype) -> Layout:
        n = out_features * in_features
        blocks = -(-n // NF4_BLOCKSIZE)
        return {
            "weight": (((n + 1) // 2, 1), torch.uint8),
            "absmax": ((blocks,), torch.uint8),
            "quant_map": ((NF4_LEVELS,), torch.float32),
            "nested_absmax": ((-(-blocks // NF4_NESTED_BLOCKSIZE),), torch.float32),
            "nested_quant_map": ((NESTED_MAP_SIZE,), torch.float32),
            "offset": ((), torch.float32),
        }

    def quantize(self, weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return nf4_quantize(weight)

    def dequantize(self, qw) -> torch.Tensor:
        return dequantize_bnb(qw.weight, bnb_quant_state(qw))

    def dequantize_kernel(self, qw, out: torch.Tensor | None) -> torch.Tensor:
        from urae_lite import kernels

        return kernels.nf4_dequantize(
            qw.weight,
            qw.absmax,
            qw.nested_absmax,
            qw.nested_quant_map,
            qw.offset,
            qw.quant_map,
            qw.shape,
            out=out,
            dtype=qw.dtype,
        )

    def state_tensors(self, qw, prefix: str) -> dict[str, torch.Tensor]:
        """bitsandbytes' serialization of a Linear4bit weight: the packed weight and its QuantState's dict."""
        out = {f"{prefix}.weight": qw.weight}
        out.update({f"{prefix}.weight.{k}": v for k, v in bnb_quant_state(qw).as_dict(packed=True).items()})
        return out

    def from_state_tensors(self, prefix: str, tensors: dict[str, torch.Tensor], shape) -> dict[str, torch.Tensor]:
        from bitsandbytes.functional import QuantState

        head = f"{prefix}.weight."
        extra = {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}
        packed = tensors[f"{prefix}.weight"]
        state = QuantState.from_dict(extra, device=packed.device)
        if tuple(state.shape) != tuple(shape):
            raise UraeError(f"{prefix}: stored NF4 shape {tuple(state.shape)} does not match {tuple(shape)}")
        return _buffers(packed, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset)
