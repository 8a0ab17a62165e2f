"""FLUX's tokenizers and text encoders, loaded as the pipeline folder declares them, and T5 in NF4.

A FLUX folder names each component's class in `model_index.json` (`"tokenizer_2": ["transformers",
"T5TokenizerFast"]`); diffusers' pipeline loads those classes, so caching and validation do the same instead of
assuming T5/CLIP classes: a derivative whose `tokenizer_2` is another fast tokenizer loads everywhere or nowhere.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path

import torch

from .console import library_bars_off
from .errors import UraeError
from .quant import NF4_BLOCKSIZE

logger = logging.getLogger(__name__)

T5_QUANTS = ("bf16", "nf4")
#: bitsandbytes' CPU 4-bit matmul repacks weights in tiles of 32 rows x one 64-element block (an assert otherwise)
BNB_CPU_ROW_TILE = 32

_DEFAULT_CLASSES = {
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer_2": ("transformers", "T5TokenizerFast"),
    "text_encoder_2": ("transformers", "T5EncoderModel"),
}


def declared_name(root: Path, name: str) -> tuple[str, str]:
    """(library, class name) that `model_index.json` declares for component `name` (FLUX's when it lacks one)."""
    index = root / "model_index.json"
    entry = json.loads(index.read_text()).get(name) if index.is_file() else None
    return tuple(entry) if isinstance(entry, list) and len(entry) == 2 else _DEFAULT_CLASSES[name]


def declared_class(root: Path, name: str) -> type:
    """The class itself (transformers 5 aliases some names: `T5TokenizerFast` is `T5Tokenizer`)."""
    library, class_name = declared_name(root, name)
    index = root / "model_index.json"
    try:
        return getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        raise UraeError(
            f"{index}: '{name}' is declared as {library}.{class_name}, which is not installed; "
            f"install a {library} that has it or fix the folder's model_index.json"
        ) from None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_component(root: Path, name: str, **kwargs):
    """`from_pretrained` of the declared class; a folder it cannot read ends in one UraeError line."""
    cls = declared_class(root, name)
    try:
        with library_bars_off():
            return cls.from_pretrained(root / name, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        label = declared_name(root, name)[1]
        raise UraeError(
            f"cannot load {root / name} as {label}: {_one_line(e)}; check that the folder "
            f"holds the files of that class, or fix '{name}' in model_index.json"
        ) from e


def nf4_skip_modules(model: torch.nn.Module) -> list[str]:
    """Linear layers too narrow for NF4 through bitsandbytes' modules; real T5-XXL (4096 x 10240) has none.

    Our own NF4 (the transformer's) handles any width; transformers' `Linear4bit` on the CPU needs
    in_features % 64 == 0 and out_features % 32 == 0, so tiny or derived encoders keep those layers in bf16.
    """
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and (m.in_features % NF4_BLOCKSIZE or m.out_features % BNB_CPU_ROW_TILE)
    ]


def load_t5_nf4(root: Path, dtype: torch.dtype):
    """T5 with NF4 linears through transformers' bitsandbytes integration (double-quantized absmax)."""
    from transformers import AutoConfig

    cls = declared_class(root, "text_encoder_2")
    with torch.device("meta"):
        skeleton = cls(AutoConfig.from_pretrained(root / "text_encoder_2"))
    return load_component(root, "text_encoder_2", quantization_config=nf4_config(skeleton, dtype), dtype=dtype)


def nf4_config(skeleton: torch.nn.Module, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for NF4 T5, leaving (and logging) layers too narrow for NF4 blocks."""
    from transformers import BitsAndBytesConfig

    skip = nf4_skip_modules(skeleton)
    if skip:
        logger.warning(
            "T5: %d linear layers stay in %s: their widths are not multiples of the %d-element NF4 block (%s)",
            len(skip),
            str(dtype).removeprefix("torch."),
            NF4_BLOCKSIZE,
            ", ".join(skip[:3]) + (", ..." if len(skip) > 3 else ""),
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=[re.escape(n) for n in skip] or None,
    )
