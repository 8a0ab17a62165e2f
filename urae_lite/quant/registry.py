"""The storage formats urae-lite knows, by name: adding one is a class in its own module and a line here."""

from __future__ import annotations

from ..errors import UraeError
from .base import QuantFormat
from .bf16 import BF16
from .fp8 import FP8
from .nf4 import NF4

FORMATS: dict[str, QuantFormat] = {f.name: f for f in (NF4(), FP8(), BF16())}
QUANT_FORMATS: tuple[str, ...] = tuple(FORMATS)  # the names, for command-line choices and recipe checks


def get_format(quant: QuantFormat | str) -> QuantFormat:
    """The format object of a name (a format object is returned as it is); an unknown name is one clear error."""
    if isinstance(quant, QuantFormat):
        return quant
    try:
        return FORMATS[quant]
    except (KeyError, TypeError):
        raise UraeError(f"unknown quantization '{quant}': use one of {', '.join(FORMATS)}") from None
