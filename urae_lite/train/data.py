"""Dataset folder (the authors' layout), aspect-ratio buckets and caption choice.

Layout: `name.jpg|jpeg|png|webp` beside `name.json` holding `prompt` and/or `generated_prompt`. Bad items are
skipped with a warning and counted, never fatal: one broken file must not cost a night of caching.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UraeError

logger = logging.getLogger("urae_lite.train")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_COLUMNS = ("prompt", "generated_prompt")
# Aspect ratios (width:height) of the buckets: the authors' 1:1, 4:3, 2:1, 4:1 and their transposes.
BUCKET_RATIOS = ((1, 1), (4, 3), (3, 4), (2, 1), (1, 2), (4, 1), (1, 4))
# Bucket sides are multiples of 16: the VAE downsamples 8x and FLUX packs 2x2 latent patches into one token.
BUCKET_MULTIPLE = 16


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    @property
    def log_ratio(self) -> float:
        return math.log(self.width / self.height)


def make_buckets(resolution: int, ratios: tuple[tuple[int, int], ...] = BUCKET_RATIOS) -> list[Bucket]:
    """One bucket per aspect ratio with area ≈ resolution², sides rounded to multiples of 16."""
    out = []
    for w, h in ratios:
        width = max(BUCKET_MULTIPLE, round(resolution * math.sqrt(w / h) / BUCKET_MULTIPLE) * BUCKET_MULTIPLE)
        height = max(BUCKET_MULTIPLE, round(resolution * math.sqrt(h / w) / BUCKET_MULTIPLE) * BUCKET_MULTIPLE)
        out.append(Bucket(width, height))
    return out


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest in log space (crop loses the least of the image)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(b.log_ratio - ratio))


def fit_to_bucket(image, bucket: Bucket):
    """Resize so the image covers the bucket (aspect kept), then crop the centre to exactly the bucket."""
    from PIL import Image

    scale = max(bucket.width / image.width, bucket.height / image.height)
    size = (max(bucket.width, round(image.width * scale)), max(bucket.height, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - bucket.width) // 2, (size[1] - bucket.height) // 2
    return resized.crop((left, top, left + bucket.width, top + bucket.height))


def needs_upscale(width: int, height: int, bucket: Bucket) -> bool:
    return width < bucket.width or height < bucket.height


def choose_caption(available: list[str], mix: dict[str, float], u: float) -> str:
    """Pick a caption column with probability ∝ its weight among those this item has; `u` is uniform [0, 1)."""
    weighted = [(c, mix.get(c, 0.0)) for c in available if mix.get(c, 0.0) > 0]
    if not weighted:
        return available[0]
    total = sum(w for _, w in weighted)
    edge = 0.0
    for column, weight in weighted:
        edge += weight / total
        if u < edge:
            return column
    return weighted[-1][0]


# ---- scanning the folder ------------------------------------------------------------------------------------------
@dataclass
class SkipLog:
    """Skipped (and kept-but-suspect) items by reason; each logged as it happens, the counts at the end."""

    reasons: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)

    def skip(self, name: str, reason: str, detail: str = "") -> None:
        self.reasons[reason] += 1
        logger.warning("skipping %s: %s%s", name, reason, f" ({detail})" if detail else "")

    def warn(self, name: str, reason: str, detail: str = "") -> None:
        self.warnings[reason] += 1
        logger.warning("%s: %s%s", name, reason, f" ({detail})" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        text = (
            f"skipped {self.total} item(s): " + ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()))
            if self.total
            else "no items skipped"
        )
        if self.warnings:
            text += "; kept with a warning: " + ", ".join(f"{n} {r}" for r, n in sorted(self.warnings.items()))
        return text


@dataclass
class Sample:
    name: str
    image: Path
    captions: dict[str, str]


def read_captions(path: Path, columns: tuple[str, ...] = CAPTION_COLUMNS) -> dict[str, str]:
    """The non-empty caption columns of `name.json`; raises ValueError with the reason otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError("no caption file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable caption file: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("caption file is not a JSON object")
    captions = {c: data[c].strip() for c in columns if isinstance(data.get(c), str) and data[c].strip()}
    if not captions:
        raise ValueError(f"caption file has none of {', '.join(columns)}")
    return captions


def scan_dataset(folder: str | Path, skips: SkipLog, columns: tuple[str, ...] = CAPTION_COLUMNS) -> list[Sample]:
    """Images with a usable caption, sorted by name; items without one are skipped and counted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UraeError(f"dataset folder not found: {folder}")
    samples: dict[str, Sample] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in samples:
            skips.skip(path.name, "duplicate name", f"{samples[path.stem].image.name} has the same stem")
            continue
        try:
            captions = read_captions(path.with_suffix(".json"), columns)
        except ValueError as e:
            skips.skip(path.name, "without caption", str(e))
            continue
        samples[path.stem] = Sample(path.stem, path, captions)
    if not samples:
        raise UraeError(
            f"empty dataset: {folder} has no {'/'.join(IMAGE_SUFFIXES)} image with a name.json caption "
            f"({skips.summary()})"
        )
    return list(samples.values())
