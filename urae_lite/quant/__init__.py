"""Frozen base weights stored as NF4 (bitsandbytes), FP8 (optimum-quanto) or bf16: one `QuantFormat` per format
(`base.py` is the interface, `registry.FORMATS` the list), held by `QuantizedWeight` as module buffers."""

from .base import QuantFormat
from .nf4 import NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE, nf4_quantize
from .registry import FORMATS, QUANT_FORMATS, get_format
from .weight import QuantizedWeight

__all__ = [
    "FORMATS",
    "NF4_BLOCKSIZE",
    "NF4_NESTED_BLOCKSIZE",
    "QUANT_FORMATS",
    "QuantFormat",
    "QuantizedWeight",
    "get_format",
    "nf4_quantize",
]
