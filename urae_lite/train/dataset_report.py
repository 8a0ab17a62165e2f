"""What `urae-lite cache` will do with a dataset folder, found without loading a model (`cache --check`).

The survey is the scan the cache itself uses (captions, repeats, sizes from the image headers, buckets), so the
check and the cache cannot disagree; the size estimate comes from the cache's own layout (cache_layout.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .cache_layout import CacheDims
from .data import UPSCALE_WARNING, Bucket, Sample, SkipLog, needs_upscale, scan_dataset, upscale_factor

logger = logging.getLogger("urae_lite.train")
NAMES_SHOWN = 5  # skipped items listed per reason


@dataclass
class DatasetReport:
    folder: Path
    resolution: int
    samples: list[Sample]
    skips: SkipLog
    dims: CacheDims = field(default_factory=CacheDims)

    @property
    def samples_per_epoch(self) -> int:
        return sum(s.repeats for s in self.samples)

    def sources(self) -> Counter:
        return Counter(s.source for s in self.samples)

    def shadowed(self) -> list[Sample]:
        """Images that had more than one caption file (the first in captions.CAPTION_SUFFIXES was used)."""
        return [s for s in self.samples if s.shadowed]

    def histogram(self) -> dict[Bucket, tuple[int, int]]:
        """bucket -> (images, samples per epoch), largest first."""
        images, draws = Counter(), Counter()
        for s in self.samples:
            images[s.bucket] += 1
            draws[s.bucket] += s.repeats
        return {b: (n, draws[b]) for b, n in images.most_common()}

    def upscaled(self) -> dict[str, list[Sample]]:
        """Folder -> its images enlarged by more than UPSCALE_WARNING to fill their bucket, smallest first."""
        out: dict[str, list[Sample]] = {}
        for s in self.samples:
            if upscale_factor(*s.size, s.bucket) > UPSCALE_WARNING:
                out.setdefault(s.folder, []).append(s)
        return {k: sorted(v, key=lambda s: (s.size[0] * s.size[1], s.name)) for k, v in sorted(out.items())}

    def upscale_lines(self) -> list[str]:
        """One warning line per folder (an image class, in kohya's sense): the count and the three smallest."""
        lines = []
        for folder, small in self.upscaled().items():
            shown = ", ".join(
                f"{Path(s.image).name} {s.size[0]}x{s.size[1]}->{s.bucket.width}x{s.bucket.height}" for s in small[:3]
            )
            lines.append(
                f"warning: {folder}: {len(small)} image(s) upscaled more than {UPSCALE_WARNING}x to fill their bucket "
                f"(smallest: {shown}); --skip-small or data.min_side drops such images"
            )
        return lines

    def text_embeddings(self) -> int:
        return sum(len(s.captions) for s in self.samples)

    def estimated_bytes(self) -> tuple[int, int]:
        """(latent, text) tensor bytes of the cache; each file adds at most cache_layout.FILE_OVERHEAD_BOUND."""
        latents = sum(self.dims.latent_bytes(s.bucket) for s in self.samples)
        return latents, self.text_embeddings() * self.dims.text_bytes()

    def lines(self) -> list[str]:
        """The report `urae-lite cache --check` prints."""
        n = len(self.samples)
        out = [f"dataset {self.folder}: {n} image(s), {self.samples_per_epoch} sample(s) per epoch with repeats"]
        out.append("captions: " + ", ".join(f"{c} {src}" for src, c in sorted(self.sources().items())))
        for s in self.shadowed():
            out.append(f"  {s.name}: {s.source} wins over {', '.join(s.shadowed)}")
        repeated = Counter((s.folder, s.repeats) for s in self.samples if s.repeats > 1)
        if repeated:
            out.append("repeats: " + ", ".join(f"{f} x{r} ({c} image(s))" for (f, r), c in sorted(repeated.items())))
        out.append(self.skips.summary())
        for reason, names in sorted(self.skips.names.items()):
            more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
            out.append(f"  {reason}: {', '.join(names[:NAMES_SHOWN])}{more}")
        out.append(f"buckets at resolution {self.resolution} (images, samples per epoch):")
        for b, (images, draws) in self.histogram().items():
            out.append(f"  {b.width:>5}x{b.height:<5} {images:>6} {draws:>7}  " + "#" * max(1, round(40 * images / n)))
        out += self.upscale_lines()
        latents, texts = self.estimated_bytes()
        d = self.dims
        out.append(
            f"estimated cache size: {human_bytes(latents + texts)} (latents {human_bytes(latents)} for {n} image(s), "
            f"text {human_bytes(texts)} for {self.text_embeddings()} caption embedding(s) of T5 "
            f"{d.max_sequence_length}x{d.t5_dim} + CLIP {d.pooled_dim})"
        )
        return out


def survey(
    folder: str | Path,
    resolution: int,
    data=None,
    dims: CacheDims | None = None,
    skip_small: bool = False,
    skips: SkipLog | None = None,
) -> DatasetReport:
    """The dataset as the cache will take it. `skip_small`: images smaller than their bucket are skipped."""
    skips = skips if skips is not None else SkipLog()
    samples = scan_dataset(folder, skips, data, resolution)
    if skip_small:
        kept = []
        for s in samples:
            if needs_upscale(*s.size, s.bucket):
                detail = f"{s.size[0]}x{s.size[1]} < {s.bucket.width}x{s.bucket.height}"
                skips.skip(Path(s.image).relative_to(folder).as_posix(), "smaller than its bucket", detail)
            else:
                kept.append(s)
        samples = kept
    return DatasetReport(Path(folder), resolution, samples, skips, dims or CacheDims())


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
