"""URAE inside ComfyUI: the 2K/4K settings as nodes, the 4K adapter as a LoRA, the exact tiled VAE decode.

`urae-lite comfyui install COMFYUI_DIR` writes a two-line `custom_nodes/urae_lite/__init__.py` that re-exports the
mappings below. The pure parts (settings, patches, vae_convert, workflows) import without ComfyUI; the node
methods import ComfyUI's modules when ComfyUI calls them. See docs/comfyui.md.
"""

from __future__ import annotations

import importlib

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def __getattr__(name: str):
    """The mappings on first use: `urae-lite comfyui install` imports this package, and must not load diffusers (and
    Triton with it) before a command such as `doctor` has chosen how Triton runs."""
    if name in __all__:
        return getattr(importlib.import_module(".nodes", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
