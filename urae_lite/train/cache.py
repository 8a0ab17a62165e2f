"""`urae-lite cache`: T5 + pooled CLIP per caption column and the VAE posterior per image, computed once.

At 2K/4K the text encoders and the VAE cannot share a 24 GB card with the transformer, so training reads
these files instead. Layout of a cache folder (default `DATA/.urae_cache/<resolution>`):

    manifest.json                   identity (model fingerprint, resolution, format) + the finished item list
                                    (bucket, caption keys, repeats, caption source) + the data.* caption settings
    latents/<name>.safetensors      `mean`, `std` (16, H/8, W/8) of the VAE posterior at the item's bucket
    text/<name>.<key>.safetensors   `t5` (L, 4096), `pooled` (768); key: a caption column or a shuffled `column~v`

`<name>` is the image's path under the dataset folder without its suffix (cache_layout.py owns the layout).

Every file is written atomically and carries what it was made from (image size + mtime, caption hash), so an
interrupted run resumes where it stopped and an edited image or caption is recomputed. A cache made for another
model or resolution is refused, with the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from tqdm.auto import tqdm

from ..component_files import ComponentFiles, check_fits, file_identity
from ..destinations import check_output_dir
from ..errors import UraeError
from ..model_files import ModelFiles, as_model_files
from ..presets import check_side
from ..safetensors_io import atomic_save_file, load_file_checked, write_json
from ..vae_tiling import VAE_TILING_MODES
from .cache_layout import CACHE_DTYPE, DEFAULT_MAX_SEQUENCE_LENGTH, CacheDims, check_shapes, latent_path, text_path
from .captions import CAPTION_COLUMNS, CaptionSettings, column_of
from .config import DataConfig
from .data import Bucket, Sample, SkipLog, fit_to_bucket
from .dataset_report import survey
from .encoders import clip_pooled, free_device_memory, iter_t5, load_vae

logger = logging.getLogger("urae_lite.train")

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FINGERPRINTED = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
VOLATILE_KEYS = ("_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash")


def default_cache_dir(data_dir: str | Path, resolution: int) -> Path:
    return Path(data_dir) / ".urae_cache" / str(resolution)


def model_fingerprint(root: Path, files: ComponentFiles | None = None) -> str:
    """Identity of what the cache depends on: the VAE, encoders and tokenizers (configs + file sizes).

    Path-independent on purpose: the same model in another folder (or FLUX.1-schnell, which shares dev's
    encoders and VAE) can use the cache; a different VAE or encoder cannot. A component given as a single file
    counts as that file (size + header), with the folder's config.
    """
    digest = hashlib.sha256()
    given = files.given() if files is not None else {}
    for sub in FINGERPRINTED:
        folder = root / sub
        if sub in given:  # the weights are the file; the folder still gives the config
            digest.update(f"{sub}=file:{file_identity(given[sub])}\n".encode())
            paths = [folder / "config.json"] if (folder / "config.json").is_file() else []
        elif not folder.is_dir():
            raise UraeError(f"{root} has no {sub}/ folder: --model must be a full diffusers FLUX pipeline folder")
        else:
            paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        for path in paths:
            digest.update(_file_line(root, path).encode())
    return digest.hexdigest()[:16]


def _file_line(root: Path, path: Path) -> str:
    """A small JSON file by content (volatile keys dropped), anything else by size."""
    rel = path.relative_to(root).as_posix()
    if path.suffix == ".json" and path.stat().st_size < 2**20:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in VOLATILE_KEYS}
        return f"{rel}={json.dumps(data, sort_keys=True)}\n"
    return f"{rel}:{path.stat().st_size}\n"


def rebuild_command(
    data_dir: str | Path,
    model: ModelFiles,
    resolution: int,
    cache: str | Path | None = None,
    data=None,
    max_sequence_length: int | None = None,
) -> str:
    """The `urae-lite cache` command that (re)builds this cache with these settings: the data.* keys and T5
    length that differ from the defaults included, so running it gives a cache the training accepts."""
    defaults = recorded_settings(None)
    keys = "".join(
        " " + shlex.quote(f"data.{k}={yaml_value(v)}") for k, v in recorded_settings(data).items() if v != defaults[k]
    )
    extra = f" --out {cache}" if cache is not None and Path(cache) != default_cache_dir(data_dir, resolution) else ""
    if max_sequence_length not in (None, DEFAULT_MAX_SEQUENCE_LENGTH):
        extra += f" --max-sequence-length {max_sequence_length}"
    extra += f" --base-pipeline {model.base_pipeline}" if model.base_pipeline else ""
    extra += "".join(f" --{k} {v}" for k, v in vars(model.component_files).items() if v is not None)
    return f"urae-lite cache {data_dir}{keys} --model {model.model} --resolution {resolution}{extra} --overwrite"


def recorded_settings(data) -> dict:
    """The data.* keys that change what a cache holds (caption texts, repeats, which images): the manifest records
    them, and training refuses a cache made with others."""
    data = data if data is not None else DataConfig()
    captions = CaptionSettings.of(data).as_dict()
    if not data.shuffle_caption_parts:  # then these change nothing
        captions.update(keep_parts=0, shuffle_variants=DataConfig.shuffle_variants)
    return {**captions, "folder_repeats": data.folder_repeats, "min_side": data.min_side}


def yaml_value(value) -> str:
    """`value` as a `key=value` override spells it."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _identity(model: str, fingerprint: str, resolution: int, max_sequence_length: int) -> dict:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "model": model,
        "fingerprint": fingerprint,
        "resolution": resolution,
        "max_sequence_length": max_sequence_length,
    }


def _read_manifest(cache: Path) -> dict | None:
    try:
        return json.loads((cache / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {}


def _stale_reason(manifest: dict, fingerprint: str, resolution: int, max_sequence_length: int | None) -> str | None:
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        return f"it has format version {manifest.get('format_version')}, this urae-lite writes {CACHE_FORMAT_VERSION}"
    if manifest.get("resolution") != resolution:
        return f"it was made at resolution {manifest.get('resolution')}, not {resolution}"
    if manifest.get("fingerprint") != fingerprint:
        return f"it was made with model {manifest.get('model')}, whose VAE/text encoders differ from this model's"
    if max_sequence_length is not None and manifest.get("max_sequence_length") != max_sequence_length:
        return f"its T5 embeddings have {manifest.get('max_sequence_length')} tokens, not {max_sequence_length}"
    return None


# ---- building ------------------------------------------------------------------------------------------------------
def _source_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _meta(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # missing, truncated or foreign: all mean "compute it again"
        return None


def _caption_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _open_image(path: Path):
    """The decoded RGB image, upright (EXIF orientation applied: cameras store portraits sideways), or
    ValueError for anything PIL cannot read completely."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(str(e) or type(e).__name__) from None


def _image_tensor(image) -> torch.Tensor:
    import numpy as np

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def _encode_images(
    cache: Path,
    samples: list[Sample],
    root: Path,
    dims: CacheDims,
    resolution: int,
    device,
    dtype,
    vae_tiling: str,
    skips: SkipLog,
    progress: bool,
    files: ComponentFiles | None = None,
) -> list[tuple[Sample, Bucket]]:
    """VAE posterior (mean, std) per image at the bucket the survey chose; returns the usable samples."""
    usable, todo = [], []
    for s in samples:
        meta = _meta(latent_path(cache, s.name))
        if meta is not None and meta.get("source") == _source_stamp(s.image):
            usable.append((s, Bucket(int(meta["width"]), int(meta["height"]))))
        else:
            todo.append(s)
    if not todo:
        return usable
    vae = load_vae(root, dtype, files).to(device)
    if vae_tiling == "on" or (vae_tiling == "auto" and resolution > 2048):
        logger.info("VAE encode uses diffusers' blended tiling (close to, not exactly, the untiled encode)")
        vae.enable_tiling()
    for s in tqdm(todo, desc="VAE encode", unit="image", disable=not progress):
        try:
            image = _open_image(s.image)
        except ValueError as e:
            skips.skip(s.image.name, "corrupt image", str(e))
            continue
        bucket = s.bucket
        pixels = _image_tensor(fit_to_bucket(image, bucket)).to(device, dtype)
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
        moments = {"mean": posterior.mean[0].to("cpu", CACHE_DTYPE), "std": posterior.std[0].to("cpu", CACHE_DTYPE)}
        shape = dims.latent_shape(bucket)
        check_shapes(moments, {"mean": shape, "std": shape}, f"VAE latents of {s.name}")
        atomic_save_file(
            moments,
            latent_path(cache, s.name),
            {"source": _source_stamp(s.image), "width": str(bucket.width), "height": str(bucket.height)},
        )
        usable.append((s, bucket))
    del vae
    free_device_memory()
    return usable


def _encode_texts(
    cache: Path,
    samples: list[Sample],
    root: Path,
    dims: CacheDims,
    device,
    dtype,
    progress: bool,
    files: ComponentFiles | None = None,
) -> None:
    """Pooled CLIP for every missing caption first (small, kept in memory), then T5, streamed to disk."""
    todo = [
        (s.name, column, text)
        for s in samples
        for column, text in s.captions.items()
        if (_meta(text_path(cache, s.name, column)) or {}).get("caption") != _caption_hash(text)
    ]
    if not todo:
        return
    texts = [t for _, _, t in todo]
    pooled = clip_pooled(root, texts, device, dtype, files=files)
    t5 = iter_t5(root, texts, device, dtype, dims.max_sequence_length, files=files)
    for (name, column, text), p, e in tqdm(
        zip(todo, pooled, t5), total=len(todo), desc="T5 + CLIP encode", unit="caption", disable=not progress
    ):
        tensors = {"t5": e.to(CACHE_DTYPE), "pooled": p.to(CACHE_DTYPE)}
        check_shapes(tensors, dims.text_shapes(), f"text embeddings of {name}")
        atomic_save_file(
            tensors,
            text_path(cache, name, column),
            {"caption": _caption_hash(text)},
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_cache(
    data_dir: str | Path,
    model: str | ModelFiles,
    resolution: int,
    out: str | Path | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    skip_small: bool = False,
    vae_tiling: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    base_pipeline: str | None = None,
    files: ComponentFiles | None = None,
    data=None,
) -> tuple[Path, SkipLog]:
    """Cache everything training needs from DATA_DIR; resumable, and refuses to mix models or resolutions.

    `files`: single-file VAE / CLIP / T5 used instead of the pipeline folder's (which still gives configs and
    tokenizers). `model` may be a resolved `ModelFiles` instead of the three. `data`: the recipe's DataConfig
    (captions, repeats, data.min_side; default: its defaults), recorded in the manifest."""
    check_side("--resolution", resolution)
    if vae_tiling not in VAE_TILING_MODES:
        raise UraeError(f"--vae-tiling must be one of {', '.join(VAE_TILING_MODES)}")
    device = torch.device(device) if device else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cache = check_output_dir(out if out is not None else default_cache_dir(data_dir, resolution))
    resolved = as_model_files(model, base_pipeline, files)
    root = resolved.pipeline_root()  # a single transformer file: its base pipeline's encoders + VAE
    files = resolved.component_files
    check_fits(files, root)
    identity = _identity(resolved.model, model_fingerprint(root, files), resolution, max_sequence_length)
    manifest = _read_manifest(cache)
    if manifest is not None:
        reason = _stale_reason(manifest, identity["fingerprint"], resolution, max_sequence_length)
        if reason and not overwrite:
            raise UraeError(
                f"cache {cache} cannot be extended: {reason}. Rebuild it with "
                f"`{rebuild_command(data_dir, resolved, resolution, out, data, max_sequence_length)}` or pass "
                f"another --out"
            )
        if reason:
            shutil.rmtree(cache)
    write_json(cache / MANIFEST, {**identity, "complete": False})
    dims = CacheDims.of_model(root, max_sequence_length)
    report = survey(data_dir, resolution, data, dims, skip_small)
    skips = report.skips
    for line in report.upscale_lines():
        logger.warning(line.removeprefix("warning: "))
    upscaled = sum(len(v) for v in report.upscaled().values())
    if upscaled:
        skips.warnings["upscaled"] += upscaled
    try:
        usable = _encode_images(
            cache, report.samples, root, dims, resolution, device, dtype, vae_tiling, skips, progress, files
        )
        _encode_texts(cache, [s for s, _ in usable], root, dims, device, dtype, progress, files)
    except torch.cuda.OutOfMemoryError:
        tiling = "" if vae_tiling == "on" else "--vae-tiling on (VAE), or "
        raise UraeError(
            f"CUDA out of memory while caching at {resolution}: what is done is kept; run again with "
            f"{tiling}--device cpu (slow, but any size fits)"
        ) from None
    items = {
        s.name: {
            "width": b.width,
            "height": b.height,
            "columns": sorted(s.captions),
            "repeats": s.repeats,
            "source": s.source,
        }
        for s, b in usable
    }
    if not items:
        raise UraeError(f"no usable image in {data_dir}: {skips.summary()}")
    settings = recorded_settings(data)
    write_json(
        cache / MANIFEST,
        {
            **identity,
            "complete": True,
            "data": settings,
            "items": items,
            "skipped": dict(skips.reasons),
            "warned": dict(skips.warnings),
        },
    )
    return cache, skips


# ---- reading (training) --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedItem:
    name: str
    bucket: Bucket
    columns: tuple[str, ...]


class CachedDataset:
    """The finished items of a cache that matches the model and resolution being trained."""

    def __init__(self, cache: Path, items: list[CachedItem]):
        self.cache, self.items = cache, items

    def __len__(self) -> int:
        return len(self.items)

    def latent(self, item: CachedItem) -> tuple[torch.Tensor, torch.Tensor]:
        tensors, _ = load_file_checked(latent_path(self.cache, item.name))
        return tensors["mean"], tensors["std"]

    def text(self, item: CachedItem, column: str) -> tuple[torch.Tensor, torch.Tensor]:
        tensors, _ = load_file_checked(text_path(self.cache, item.name, column))
        return tensors["t5"], tensors["pooled"]


def open_cache(
    data_dir: str | Path,
    model: str | ModelFiles,
    resolution: int,
    cache: str | Path | None = None,
    columns: tuple[str, ...] = CAPTION_COLUMNS,
    skips: SkipLog | None = None,
    base_pipeline: str | None = None,
    files: ComponentFiles | None = None,
    data=None,
) -> CachedDataset:
    """The cache for (model, resolution), checked: a stale or unfinished one is refused with the fix.

    Each item appears `repeats` times (kohya's `N_name` folders). `data`: the recipe's DataConfig; when given, a
    cache made with other caption / repeat / size settings is refused (without it, the cache's own are used)."""
    folder = Path(cache) if cache is not None else default_cache_dir(data_dir, resolution)
    resolved = as_model_files(model, base_pipeline, files)
    manifest = _read_manifest(folder)
    length = manifest.get("max_sequence_length") if manifest is not None else None
    fix = rebuild_command(data_dir, resolved, resolution, cache, data, length)
    if manifest is None:
        raise UraeError(f"no cache at {folder}: build it first with `{fix.removesuffix(' --overwrite')}`")
    reason = _stale_reason(
        manifest, model_fingerprint(resolved.pipeline_root(), resolved.component_files), resolution, None
    )
    if reason:
        raise UraeError(f"cache {folder} does not fit this run: {reason}. Rebuild it with `{fix}`")
    if not manifest.get("complete"):
        raise UraeError(f"cache {folder} is unfinished: run `{fix.removesuffix(' --overwrite')}` again to finish it")
    if data is not None:
        made, wanted = manifest.get("data", recorded_settings(None)), recorded_settings(data)
        differ = [k for k in wanted if made.get(k) != wanted[k]]
        if differ:
            k = differ[0]
            raise UraeError(
                f"cache {folder} was made with data.{k}={yaml_value(made.get(k))}, the recipe has "
                f"data.{k}={yaml_value(wanted[k])}: update it with `{fix.removesuffix(' --overwrite')}`"
            )
    skips = skips if skips is not None else SkipLog()
    items = []
    for name, info in sorted(manifest.get("items", {}).items()):
        cols = tuple(
            c for c in info["columns"] if column_of(c) in columns and _meta(text_path(folder, name, c)) is not None
        )
        if _meta(latent_path(folder, name)) is None:
            skips.skip(name, "missing or corrupt cache file", str(latent_path(folder, name)))
        elif not cols:
            skips.skip(name, "missing or corrupt cache file", f"no readable caption embedding for {name}")
        else:
            items += [CachedItem(name, Bucket(info["width"], info["height"]), cols)] * int(info.get("repeats", 1))
    if not items:
        raise UraeError(f"cache {folder} has no usable item ({skips.summary()}); rebuild it with `{fix}`")
    return CachedDataset(folder, items)
