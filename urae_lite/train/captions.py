"""Where an image's caption comes from, and what is done to its text before it is embedded.

The one owner of the caption vocabulary: the caption files beside an image (the authors' `name.json`, kohya's /
ai-toolkit's / OneTrainer's `name.txt`, `name.caption`) in their order of precedence, the caption columns, the
trigger-word prefix and the shuffled comma-separated parts. A plain-text caption fills the `prompt` column, so a
`.txt` caption and a `.json` `prompt` with the same text give the same cache files.

Shuffled captions are embedded ahead of time: the cache holds `data.shuffle_variants` shuffled copies of each
caption, stored under the keys `column~v`; training draws one of them per sample (`choose_caption`) from the
sample's own generator, so resuming stays bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

CAPTION_COLUMNS = ("prompt", "generated_prompt")
# Caption files beside `name.png`, highest precedence first: the authors' JSON wins over a plain-text caption.
CAPTION_SUFFIXES = (".json", ".txt", ".caption")
PLAIN_COLUMN = "prompt"  # the column a plain-text caption (or data.default_caption) fills
DEFAULT_SOURCE = "default caption"  # an image without a caption file, given data.default_caption
VARIANT_MARK = "~"  # cache key of a shuffled copy: `column~v`


@dataclass(frozen=True)
class CaptionSettings:
    """The data.* keys that change the text that is embedded (recorded in the cache's manifest)."""

    caption_prefix: str | None = None
    default_caption: str | None = None
    shuffle_caption_parts: bool = False
    keep_parts: int = 0
    shuffle_variants: int = 4

    @classmethod
    def of(cls, data) -> CaptionSettings:
        """From a DataConfig (or anything with the same attributes)."""
        return cls(*(getattr(data, f) for f in cls.__dataclass_fields__))

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class FoundCaption:
    source: str  # the caption file's suffix (".json", ".txt", ".caption") or DEFAULT_SOURCE
    columns: dict[str, str]  # column -> text as written (before prefix and shuffle)
    shadowed: tuple[str, ...] = ()  # caption files beside it that lost to `source`


def read_json_caption(path: Path, columns: tuple[str, ...] = CAPTION_COLUMNS) -> dict[str, str]:
    """The non-empty caption columns of `name.json`; raises ValueError with the reason otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable caption file {path.name}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"caption file {path.name} is not a JSON object")
    captions = {c: data[c].strip() for c in columns if isinstance(data.get(c), str) and data[c].strip()}
    if not captions:
        raise ValueError(f"caption file {path.name} has none of {', '.join(columns)}")
    return captions


def read_text_caption(path: Path) -> dict[str, str]:
    """A plain-text caption (whitespace and line breaks folded to single spaces), in the `prompt` column."""
    try:
        text = " ".join(path.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable caption file {path.name}: {e}") from None
    if not text:
        raise ValueError(f"caption file {path.name} is empty")
    return {PLAIN_COLUMN: text}


def find_caption(image: Path, default: str | None = None, columns: tuple[str, ...] = CAPTION_COLUMNS) -> FoundCaption:
    """The caption of `image` from the highest-precedence caption file beside it, else `default`.

    Raises ValueError (the skip reason) when there is none, or when the winning file is unusable: a broken
    `.json` is reported rather than silently replaced by a `.txt` the user may not know about."""
    present = [s for s in CAPTION_SUFFIXES if image.with_suffix(s).is_file()]
    if present:
        winner = image.with_suffix(present[0])
        found = read_json_caption(winner, columns) if present[0] == ".json" else read_text_caption(winner)
        return FoundCaption(present[0], found, tuple(present[1:]))
    if default is not None and default.strip():
        return FoundCaption(DEFAULT_SOURCE, {PLAIN_COLUMN: default.strip()})
    raise ValueError("no caption file (" + ", ".join(f"{image.stem}{s}" for s in CAPTION_SUFFIXES) + ")")


# ---- the text that is embedded -------------------------------------------------------------------------------------
def split_parts(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def shuffle_parts(text: str, keep: int, key: str) -> str:
    """`text`'s comma-separated parts with all but the first `keep` permuted; the permutation is a function of `key`
    alone (no global random state), so the cache is the same on every machine and every run."""
    parts = split_parts(text)
    head, tail = parts[:keep], parts[keep:]
    seed = int.from_bytes(hashlib.sha256(f"urae_lite.shuffle:{key}".encode()).digest()[:8], "little")
    random.Random(seed).shuffle(tail)
    return ", ".join(head + tail)


def with_prefix(text: str, prefix: str | None) -> str:
    """The trigger word(s) as the caption's first comma-separated part."""
    return f"{prefix.strip()}, {text}" if prefix and prefix.strip() else text


def shuffled_count(text: str, settings: CaptionSettings) -> int:
    """How many embeddings a caption needs: one, or `shuffle_variants` when it has two parts or more to shuffle."""
    if settings.shuffle_caption_parts and len(split_parts(text)) - settings.keep_parts >= 2:
        return settings.shuffle_variants
    return 1


def caption_texts(name: str, columns: dict[str, str], settings: CaptionSettings) -> dict[str, str]:
    """Cache key -> the text to embed, for one image's caption columns: prefixed, and shuffled into variants.

    The prefix is added after shuffling, so the trigger word always stays first (kohya's `keep_tokens` habit)."""
    out = {}
    for column, text in columns.items():
        n = shuffled_count(text, settings)
        if n == 1:
            out[column] = with_prefix(text, settings.caption_prefix)
            continue
        for v in range(n):
            shuffled = shuffle_parts(text, settings.keep_parts, f"{name}:{column}:{v}")
            out[f"{column}{VARIANT_MARK}{v}"] = with_prefix(shuffled, settings.caption_prefix)
    return out


def column_of(key: str) -> str:
    """The caption column of a cache key (`generated_prompt~3` -> `generated_prompt`)."""
    return key.split(VARIANT_MARK, 1)[0]


def choose_caption(available: list[str], mix: dict[str, float], u: float) -> str:
    """Pick a cache key with probability ∝ its column's weight among those this item has, shared equally among the
    column's shuffled variants; `u` is uniform [0, 1)."""
    counts: dict[str, int] = {}
    for key in available:
        counts[column_of(key)] = counts.get(column_of(key), 0) + 1
    weighted = [(k, mix.get(column_of(k), 0.0) / counts[column_of(k)]) for k in available]
    weighted = [(k, w) for k, w in weighted if w > 0]
    if not weighted:
        return available[0]
    total = sum(w for _, w in weighted)
    edge = 0.0
    for key, weight in weighted:
        edge += weight / total
        if u < edge:
            return key
    return weighted[-1][0]
