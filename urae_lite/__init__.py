"""urae_lite: URAE 2K/4K adaptation of FLUX on one consumer GPU (quantized base + bf16 adapters)."""

from .adapted_linear import AdaptedLinear, LowRankSlice
from .adapter_io import AdapterFile, attach_adapter, read_adapter, save_adapter
from .component_files import ComponentFiles
from .convert import convert_urae_4k
from .errors import UraeError
from .loader import LoadSpec, add_lora, load_transformer, read_transformer
from .memory import MemorySettings
from .minor import MinorSpec
from .model_files import ModelFiles, resolve_files
from .prepare import prepare
from .quant import FORMATS, QUANT_FORMATS, QuantFormat, QuantizedWeight
from .version import __version__ as __version__

__all__ = [
    "AdaptedLinear",
    "LowRankSlice",
    "AdapterFile",
    "attach_adapter",
    "read_adapter",
    "save_adapter",
    "convert_urae_4k",
    "UraeError",
    "MinorSpec",
    "add_lora",
    "load_transformer",
    "prepare",
    "LoadSpec",
    "read_transformer",
    "ModelFiles",
    "resolve_files",
    "load_pipeline",
    "ComponentFiles",
    "FORMATS",
    "MemorySettings",
    "QUANT_FORMATS",
    "QuantFormat",
    "QuantizedWeight",
]


def __getattr__(name: str):
    """`load_pipeline` imports diffusers' pipelines: loaded on first use so `import urae_lite` stays light."""
    if name == "load_pipeline":
        from .pipeline import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'urae_lite' has no attribute {name!r}")
