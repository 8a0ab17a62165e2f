"""What every benchmark result records beside its rows: library versions, the exact command and the git commit."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "triton", "diffusers", "transformers", "bitsandbytes")


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance() -> dict:
    """Versions (None for a library that is not installed; the kernel benchmark needs no diffusers), CUDA,
    command line and commit."""
    out: dict = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    import torch

    out["cuda"] = torch.version.cuda
    out["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    out["git_commit"] = git_commit()
    return out


def result_path(benchmark: str, device: str) -> Path:
    """benchmarks/results/<benchmark>_<device slug>.json: one file per benchmark and device name."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return ROOT / "benchmarks" / "results" / f"{benchmark}_{slug}.json"
