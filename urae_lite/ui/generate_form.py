"""The Generate tab's fields as `urae-lite generate`'s argument list (no Gradio here): the page runs the command
with exactly what a user could type, and shows that command."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import UraeError
from ..presets import SIZE_MULTIPLE, check_size
from .paths import Folders

SIZE_MODES = ("preset", "aspect ratio", "width x height")
ASPECTS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9", "9:21")
PRESET = "preset"  # a choice that leaves the setting to the preset (the option is not passed)
SEED_RANGE = 2**31


def decimal(value: float) -> str:
    """A float as typed: short (`3.5`, `10`) and read back as the very same number."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def snap(value: float) -> int:
    """The nearest valid side: a positive multiple of 16 (the two the CLI's size message offers, the nearer one)."""
    return max(SIZE_MULTIPLE, int(round(value / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def aspect_size(long_side: int, aspect: str) -> tuple[int, int]:
    """Width and height with `long_side` pixels on the longer side and the ratio `aspect` (W:H), snapped."""
    w, h = (float(x) for x in aspect.split(":"))
    scale = long_side / max(w, h)
    return snap(w * scale), snap(h * scale)


@dataclass
class GenerateForm:
    """What the Generate tab holds. None or PRESET: left to the preset, as when the option is not typed."""

    prompt: str
    model: str
    preset: str = "2k"
    size_mode: str = "preset"
    aspect: str = "1:1"
    long_side: int = 2048
    width: int | None = None
    height: int | None = None
    seed: int = 0
    randomize: bool = False
    steps: int | None = None
    guidance: float | None = None
    adapters: list[str] = field(default_factory=list)  # file names inside the adapters folder, in load order
    quant: str = PRESET
    advanced: dict[str, object] = field(default_factory=dict)  # option name (without --) -> value; None: not given

    def size(self) -> tuple[int, int] | None:
        if self.size_mode == "aspect ratio":
            if self.long_side < SIZE_MULTIPLE:  # not snapped up to the smallest size: the CLI's size message
                check_size(int(self.long_side), int(self.long_side))
            return aspect_size(int(self.long_side), self.aspect)
        if self.size_mode == "width x height":
            if not self.width or not self.height:
                raise UraeError("width and height are both needed for an explicit size (or choose the preset's size)")
            return int(self.width), int(self.height)
        return None

    def pick_seed(self) -> int:
        return random.randrange(SEED_RANGE) if self.randomize else int(self.seed)

    def argv(
        self, folders: Folders, out: Path, seed: int, vram: str | None = None, ram: str | None = None
    ) -> list[str]:
        """`generate OPTIONS -- PROMPT` as the user would type it (after `--` a prompt starting with `-` is still the
        prompt, not an option); every path inside the page's folders."""
        if not self.prompt or not self.prompt.strip():
            raise UraeError("the prompt is empty: describe the image to generate")
        argv = ["generate", "--model", self.model, "--preset", self.preset, "--seed", str(seed)]
        size = self.size()
        if size:
            argv += ["--width", str(size[0]), "--height", str(size[1])]
        if self.steps is not None:  # 0 too: the command's own check speaks
            argv += ["--steps", str(int(self.steps))]
        if self.guidance is not None:
            argv += ["--guidance", decimal(self.guidance)]
        for name in self.adapters or []:
            argv += ["--adapter", str(folders.inside(name, "adapters"))]
        if self.quant and self.quant != PRESET:
            argv += ["--quant", self.quant]
        for name, value in self.advanced.items():
            if value is None or value == PRESET or value == "":
                continue
            if isinstance(value, bool):
                argv.append(f"--{name}" if value else f"--no-{name}")
            else:
                argv += [f"--{name}", decimal(value) if isinstance(value, float) else str(value)]
        if vram is not None:
            argv += ["--vram", vram] + (["--ram", ram] if ram is not None else [])
        return [*argv, "--out", str(out), "--", self.prompt]


def new_output(folders: Folders, seed: int) -> Path:
    """A fresh PNG name in the outputs folder (time and seed; never an existing file)."""
    stem = f"urae_{time.strftime('%Y%m%d-%H%M%S')}_{seed}"
    path = folders.outputs / f"{stem}.png"
    n = 1
    while path.exists():
        path = folders.outputs / f"{stem}_{n}.png"
        n += 1
    return path


def png_settings(path: str | Path) -> dict:
    """The settings a generated PNG carries (the `urae_lite` text chunk urae_lite.output writes)."""
    try:
        with Image.open(path) as image:
            return json.loads(image.text["urae_lite"])
    except (OSError, KeyError, ValueError, AttributeError) as e:
        raise UraeError(f"{Path(path).name} carries no urae-lite settings ({e}); pick an image this page made") from e


# the Generate tab's fields that `reuse_fields` fills, by the name its endpoint gives them
REUSED = ("prompt", "model", "quant", "size_mode", "width", "height", "seed", "randomize", "steps", "guidance",
          "adapters", "t5_quant", "ntk", "shift", "proportional_attention", "max_sequence_length", "refine_from",
          "strength")  # fmt: skip


def reuse_fields(meta: dict, folders: Folders, models: list[str]) -> dict:
    """The tab's fields that make a PNG's image again, from its metadata: prompt, seed, model, adapters, the base
    and T5 formats and every image setting (the preset's values written out). How the model was placed on the
    card (offload, blocks to swap, token chunks, VAE tiling) is left to the form: it does not change the pixels."""
    s, memory = meta["settings"], meta.get("memory", {})
    adapters = []
    for a in meta.get("adapters", []):
        try:
            adapters.append(str(folders.inside(a["path"], "adapters").relative_to(folders.adapters)))
        except UraeError:  # an adapter outside the folder: not offered
            continue

    def text(value) -> str:
        return "" if value is None else decimal(value) if isinstance(value, float) else str(value)

    return {
        "prompt": meta["prompt"],
        "model": meta["model"] if meta["model"] in models else models[0],
        "quant": memory.get("quant", meta.get("quant", PRESET)),
        "size_mode": "width x height",
        "width": s["width"],
        "height": s["height"],
        "seed": meta["seed"],
        "randomize": False,
        "steps": text(s["steps"]),
        "guidance": text(s["guidance"]),
        "adapters": adapters,
        "t5_quant": memory.get("t5_quant", PRESET),
        "ntk": text(s["ntk"]),
        "shift": "model" if s["shift"] is None else text(s["shift"]),
        "proportional_attention": "on" if s["proportional_attention"] else "off",
        "max_sequence_length": text(s["max_sequence_length"]),
        "refine_from": text(s["refine_from"]),
        "strength": text(s["strength"]) if s["refine_from"] is not None else "",
    }
