"""`urae-lite comfyui install|uninstall COMFYUI_DIR`: the custom_nodes shim and the example workflows.

The node pack is the installed `urae_lite.comfyui` package; ComfyUI only needs a folder in custom_nodes/ whose
__init__.py re-exports its mappings. The example workflows are copied to ComfyUI's user workflow folder (the
Workflows sidebar). Uninstall removes exactly what install wrote: the shim (recognised by its first line), the
workflow files that still hold our content, and the workflow folders if that leaves them empty.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

from ..errors import UraeError
from ..safetensors_io import atomic_write_text

NODE_FOLDER = "urae_lite"
MARKER = "# Written by `urae-lite comfyui install`; `urae-lite comfyui uninstall` removes it."
SHIM = f'''{MARKER}
"""URAE nodes for ComfyUI; they live in the urae-lite package (docs/comfyui.md)."""

from urae_lite.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''
WORKFLOW_FOLDER = Path("user", "default", "workflows")  # ComfyUI's per-user workflows (the frontend's sidebar)


def workflow_files() -> dict[str, str]:
    """Shipped example workflows: file name -> JSON text."""
    folder = resources.files("urae_lite.comfyui") / "workflows"
    return {f.name: f.read_text() for f in folder.iterdir() if f.name.endswith(".json")}


def comfyui_root(path: str | os.PathLike) -> Path:
    """COMFYUI_DIR checked: the folder holding ComfyUI's comfy/ package and custom_nodes/."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UraeError(f"{root} is not a folder: pass the ComfyUI folder (the one with main.py and custom_nodes/)")
    if not (root / "comfy").is_dir() or not (root / "custom_nodes").is_dir() or not (root / "nodes.py").is_file():
        raise UraeError(
            f"{root} is not a ComfyUI folder (no comfy/, nodes.py and custom_nodes/ inside): pass the folder "
            "that holds ComfyUI's main.py"
        )
    return root


def install(path: str | os.PathLike, workflows: bool = True) -> list[Path]:
    """Write the shim (and the workflows); returns the files written."""
    root = comfyui_root(path)
    shim = root / "custom_nodes" / NODE_FOLDER / "__init__.py"
    if shim.parent.exists() and not _is_ours(shim):
        raise UraeError(f"{shim.parent} exists and was not written by urae-lite: move it away, then install again")
    written = [atomic_write_text(shim, SHIM)]
    if workflows:
        for name, text in workflow_files().items():
            target = root / WORKFLOW_FOLDER / name
            if target.exists() and target.read_text() != text:
                print(f"kept {target} (changed since it was installed)")
                continue
            written.append(atomic_write_text(target, text))
    return written


def uninstall(path: str | os.PathLike) -> list[Path]:
    """Remove the shim folder and the unchanged workflows; returns what was removed."""
    root = comfyui_root(path)
    folder = root / "custom_nodes" / NODE_FOLDER
    removed: list[Path] = []
    if folder.exists():
        if not _is_ours(folder / "__init__.py"):
            raise UraeError(f"{folder} was not written by urae-lite: left as it is")
        shutil.rmtree(folder)  # the shim and the __pycache__ Python made beside it
        removed.append(folder)
    for name, text in workflow_files().items():
        target = root / WORKFLOW_FOLDER / name
        if target.is_file() and target.read_text() == text:
            target.unlink()
            removed.append(target)
    for folder in (root / WORKFLOW_FOLDER, *(root / WORKFLOW_FOLDER).parents):  # the folders install made, if empty
        if folder == root or not folder.is_dir() or any(folder.iterdir()):
            break
        folder.rmdir()
    if not removed:
        raise UraeError(f"nothing of urae-lite is installed in {root}")
    return removed


def _is_ours(shim: Path) -> bool:
    try:
        return shim.read_text().startswith(MARKER)
    except OSError:
        return False


def _cmd_install(args: argparse.Namespace) -> None:
    for path in install(args.comfyui_dir, workflows=not args.no_workflows):
        print(f"wrote {path}")
    print(f"restart ComfyUI; its Python must have urae-lite installed (this one is {sys.executable})")


def _cmd_uninstall(args: argparse.Namespace) -> None:
    for path in uninstall(args.comfyui_dir):
        print(f"removed {path}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("comfyui", help="install the URAE nodes into ComfyUI (docs/comfyui.md)")
    actions = p.add_subparsers(dest="comfyui_command", required=True)
    a = actions.add_parser("install", help="write custom_nodes/urae_lite and the example workflows")
    a.add_argument("comfyui_dir", metavar="COMFYUI_DIR", help="the ComfyUI folder (with main.py, custom_nodes/)")
    a.add_argument("--no-workflows", action="store_true", help="do not copy the example workflows")
    a.set_defaults(func=_cmd_install)
    a = actions.add_parser("uninstall", help="remove what install wrote")
    a.add_argument("comfyui_dir", metavar="COMFYUI_DIR")
    a.set_defaults(func=_cmd_uninstall)
