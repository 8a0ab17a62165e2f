"""What a generation returns, and the PNG it is saved as: the image carries everything needed to make it again."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .memory import MemorySettings
from .presets import GenerationSettings
from .report import RunReport
from .safetensors_io import publish, temp_file_beside


@dataclass
class GenerationResult:
    image: Image.Image
    prompt: str
    seed: int
    settings: GenerationSettings
    model: str
    memory: MemorySettings  # how it fitted the card: the base and T5 formats decide the numbers, the rest is exact
    adapters: list[dict[str, str]]  # [{"path": ..., "sha256": first 16 hex digits}, ...] as the user gave them
    report: RunReport = field(default_factory=RunReport)

    def metadata(self) -> dict[str, str]:
        """PNG text chunks: one key per item (readable in any viewer) and `urae_lite` with all of it as JSON."""
        from .version import __version__

        items = {
            "prompt": self.prompt,
            "seed": self.seed,
            "model": self.model,
            "quant": self.memory.quant,
            "adapters": self.adapters,
            "settings": self.settings.as_dict(),
            "memory": self.memory.as_dict(),
        }
        text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in items.items()}
        text["software"] = f"urae-lite {__version__}"
        text["urae_lite"] = json.dumps(items)
        return text

    def save(self, path: str | os.PathLike) -> Path:
        """Write the PNG (with metadata) beside `path` first, then rename: no half-written images."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = PngInfo()
        for key, value in self.metadata().items():
            info.add_itxt(key, value)
        fd, tmp = temp_file_beside(path)
        os.close(fd)
        try:
            self.image.save(tmp, format="PNG", pnginfo=info)
            publish(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path
