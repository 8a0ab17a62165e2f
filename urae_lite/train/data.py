"""Dataset folders as hobbyists have them, and the aspect-ratio buckets.

Layout: `name.jpg|jpeg|png|webp` anywhere under the folder (read recursively, hidden folders such as the cache
skipped) beside a caption file (urae_lite/train/captions.py: `.json`, `.txt`, `.caption`). A folder named `N_name`
(kohya) repeats its images N times per epoch. Bad items are skipped with a warning and counted, never fatal: one
broken file must not cost a night of caching.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UraeError
from .captions import CAPTION_COLUMNS, CaptionSettings, caption_texts, choose_caption, find_caption

__all__ = ["CAPTION_COLUMNS", "choose_caption"]  # re-exported: config.py and samples.py read them here

logger = logging.getLogger("urae_lite.train")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
REPEATS_FOLDER = re.compile(r"^([1-9][0-9]*)_(.+)$")  # kohya: `10_cat` = the images inside, 10 times per epoch
# Upscaling an image by more than this to fill its bucket is reported (at 2K/4K the common silent quality loss).
UPSCALE_WARNING = 1.25
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


def upscale_factor(width: int, height: int, bucket: Bucket) -> float:
    """How much `fit_to_bucket` enlarges the image (1.0 or less: no upscaling)."""
    return max(bucket.width / width, bucket.height / height)


# ---- scanning the folder ------------------------------------------------------------------------------------------
@dataclass
class SkipLog:
    """Skipped (and kept-but-suspect) items by reason; each logged as it happens, the counts at the end."""

    reasons: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    names: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason -> skipped items
    quiet: bool = False  # `cache --check` lists the skips in its report instead

    def skip(self, name: str, reason: str, detail: str = "") -> None:
        self.reasons[reason] += 1
        self.names[reason].append(name)
        if not self.quiet:
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
    name: str  # path under the dataset folder without the suffix: the cache's file name
    image: Path
    captions: dict[str, str]  # cache key -> the text to embed (prefixed; shuffled variants under `column~v`)
    source: str = ".json"  # the caption file's suffix, or captions.DEFAULT_SOURCE
    shadowed: tuple[str, ...] = ()  # caption files that lost to `source`
    repeats: int = 1
    size: tuple[int, int] | None = None  # upright (width, height), read from the header
    bucket: Bucket | None = None

    @property
    def folder(self) -> str:
        """The folder (relative, "." for the top) the image is in: its class in kohya's sense."""
        return Path(self.name).parent.as_posix()


def image_size(path: Path) -> tuple[int, int]:
    """Upright (width, height) from the file's header, without decoding the pixels; ValueError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(str(e) or type(e).__name__) from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # EXIF: stored sideways


def folder_repeats(relative: Path) -> int:
    """N of the innermost `N_name` folder the image is in (under the dataset folder), else 1."""
    for part in reversed(relative.parent.parts):
        match = REPEATS_FOLDER.match(part)
        if match:
            return int(match.group(1))
    return 1


def iter_images(folder: Path):
    """Image files under `folder`, recursively and in a fixed order; hidden folders (the cache) are skipped."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if path.suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                yield path


def scan_dataset(folder: str | Path, skips: SkipLog, data=None, resolution: int | None = None) -> list[Sample]:
    """Images with a usable caption, with their repeats; items without one are skipped and counted.

    `data`: the recipe's DataConfig (captions, repeats, data.min_side); default: its defaults. With `resolution`,
    each image's size is read from its header and its bucket chosen (unreadable images are skipped here)."""
    from .config import DataConfig

    folder, data = Path(folder), data if data is not None else DataConfig()
    if not folder.is_dir():
        raise UraeError(f"dataset folder not found: {folder}")
    settings = CaptionSettings.of(data)
    buckets = make_buckets(resolution) if resolution else None
    samples: dict[str, Sample] = {}
    for path in iter_images(folder):
        relative = path.relative_to(folder)
        name = relative.with_suffix("").as_posix()
        if name in samples:
            skips.skip(relative.as_posix(), "duplicate name", f"{samples[name].image.name} has the same name")
            continue
        try:
            found = find_caption(path, data.default_caption)
        except ValueError as e:
            skips.skip(relative.as_posix(), "without caption", str(e))
            continue
        repeats = folder_repeats(relative) if data.folder_repeats else 1
        sample = Sample(name, path, caption_texts(name, found.columns, settings), found.source, found.shadowed, repeats)
        if buckets is not None:
            try:
                sample.size = image_size(path)
            except ValueError as e:
                skips.skip(relative.as_posix(), "corrupt image", str(e))
                continue
            if data.min_side and min(sample.size) < data.min_side:
                skips.skip(relative.as_posix(), "smaller than data.min_side", "x".join(map(str, sample.size)))
                continue
            sample.bucket = nearest_bucket(*sample.size, buckets)
        samples[name] = sample
    if not samples:
        raise UraeError(
            f"empty dataset: {folder} has no {'/'.join(IMAGE_SUFFIXES)} image with a caption "
            f"(name.json, name.txt or name.caption, or set data.default_caption) ({skips.summary()})"
        )
    return list(samples.values())
