"""Resume state (training checkpoints): everything `--resume` needs to continue as if never stopped, written atomically.

A checkpoint is a folder `checkpoints/step-00000500/`:
    trainable.safetensors   fp32 master factors by parameter name
    adapter.safetensors     the adapter so far, in the final format (usable while training goes on)
    optimizer.pt            optimizer + LR schedule state
    rng-<rank>.pt           each process's global RNG states (torch CPU/CUDA, Python, NumPy)
    state.json              step, seed, world size, data order (item names), config
It is assembled in a hidden `.step-00000500.partial` folder and renamed into place when complete, so a run
killed mid-write leaves the previous checkpoints untouched and is never resumed from a half folder.
Sample order and per-sample noise are functions of (seed, sample index) (see flow.py), so the step number plus
the item list fix the data order exactly.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import UraeError
from ..safetensors_io import load_file_checked, write_json

STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def partial_dir(output_dir: str | Path, step: int) -> Path:
    """The staging folder every process writes its part into before the main process publishes it."""
    return checkpoint_root(output_dir) / f".{step_name(step)}.partial"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rng(staging: Path, rank: int) -> None:
    torch.save(rng_state(), staging / f"rng-{rank}.pt")


def publish(staging: Path, output_dir: str | Path, step: int, optimizer_state: dict, state: dict, keep: int) -> Path:
    """Write the main process's files into `staging`, rename it into place, delete all but the last `keep`."""
    torch.save(optimizer_state, staging / "optimizer.pt")
    write_json(staging / "state.json", state)
    final = checkpoint_root(output_dir) / step_name(step)
    if final.exists():  # a re-run of the same step (resumed from an older checkpoint): replace it
        shutil.rmtree(final)
    staging.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Completed checkpoints, oldest first (partial folders are hidden and never listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_checkpoint(output_dir: str | Path, resume: str) -> Path:
    """`auto`/`latest` -> the newest checkpoint of the run; anything else is a checkpoint folder path."""
    if resume in ("auto", "latest"):
        found = list_checkpoints(output_dir)
        if not found:
            raise UraeError(f"--resume: no checkpoint in {checkpoint_root(output_dir)}; start without --resume")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UraeError(f"--resume {resume}: not a checkpoint folder (no state.json)")
    return path


def load_checkpoint(path: Path, rank: int) -> dict:
    """{'state', 'trainable', 'optimizer', 'rng'} from a checkpoint folder (rng: this rank's, if saved)."""
    try:
        state = json.loads((path / "state.json").read_text())
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError) as e:
        raise UraeError(f"checkpoint {path} is unreadable ({e}); resume from an older one with --resume PATH") from e
    trainable, _ = load_file_checked(path / "trainable.safetensors")
    rng_file = path / f"rng-{rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    return {"state": state, "trainable": trainable, "optimizer": optimizer, "rng": rng}
