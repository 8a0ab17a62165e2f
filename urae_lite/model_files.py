"""Where a model's files are, worked out once per command and passed down as one `ModelFiles` value.

`--model` is `tiny`, a hub id, a diffusers FLUX folder (or its transformer/ subfolder), a folder written by
`urae-lite prepare`, or one transformer .safetensors file (ComfyUI / Forge). `--base-pipeline` names the diffusers
folder whose VAE, text encoders, tokenizers and scheduler go with a transformer that comes without them, and
`--vae` / `--clip` / `--t5` replace single components' weights. `resolve_files` is the one place that turns these
into local paths (fetching a hub id once), tells the transformer's format and reads its config; the loader reads
what a `ModelFiles` names, and `prepare` writes new folders of the `prepared` kind.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .component_files import NO_FILES, ComponentFiles, check_files
from .errors import UraeError
from .safetensors_io import CheckpointReader
from .single_file import SingleFileReader, derive_config

FORMATS = ("diffusers", "prepared", "single_file")  # how the transformer is stored
PREPARED_MARKER = "urae_lite_quant.json"  # in a `prepare`d folder: its quant format, source and shards
TINY = ("tiny", "tiny-dev", "tiny-schnell")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_IDS = {"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell"}
PIPELINE_FILES = ["*.json", "*.txt", "*.model", "vae/*", "text_encoder*/*", "tokenizer*/*", "scheduler/*"]
MODEL_FILES = [*PIPELINE_FILES, "transformer/*"]


@dataclass(frozen=True)
class ModelFiles:
    """One model's files, resolved: what `generate`, `train`, `cache`, `plan --model`, `prepare` and `convert` read.

    `model` is the model as the user named it (reports, cache identity, messages); `format` one of FORMATS;
    `transformer` the transformer folder (config.json + weights, or a prepared folder) or its single file;
    `variant` dev or schnell (from the weights); `transformer_config` its FluxTransformer2DModel config (a single
    file's derived from its tensor shapes), None with `config_error` saying why when it cannot be known (a single
    file's RoPE axes without a base pipeline: only commands that build the model need them); `pipeline` the
    diffusers folder
    (model_index.json) of the VAE, text encoders, tokenizers and scheduler, None when there is none; `marker` a
    prepared folder's PREPARED_MARKER contents.
    """

    model: str
    format: str
    transformer: Path
    variant: str
    transformer_config: dict | None = field(repr=False)
    pipeline: Path | None = None
    base_pipeline: str | None = None
    component_files: ComponentFiles = NO_FILES
    marker: dict | None = field(default=None, repr=False)
    config_error: str | None = field(default=None, repr=False)

    @property
    def config(self) -> dict:
        """The transformer's config, or the UraeError line saying what to pass for it."""
        if self.transformer_config is None:
            raise UraeError(self.config_error or f"{self.transformer} has no transformer config")
        return self.transformer_config

    def pipeline_root(self) -> Path:
        """The pipeline folder, or one line saying what to pass for the text encoders and VAE."""
        if self.pipeline is not None:
            return self.pipeline
        if self.format == "single_file":
            hub = HUB_IDS[self.variant]
            raise UraeError(
                f"{self.model} is a FLUX.1-{self.variant} transformer only: pass --base-pipeline with a "
                f"diffusers FLUX folder or hub id for the VAE and text encoders ({hub} is not in the "
                f"Hugging Face cache)"
            )
        raise UraeError(
            f"{self.transformer} holds a transformer only: the text encoders and VAE come from a diffusers "
            f"FLUX folder (with model_index.json); pass that folder or hub id as --model, or as "
            f"--base-pipeline"
        )

    @property
    def full_precision(self) -> Path:
        """The unquantized transformer weights (folder or single file): a prepared folder's source."""
        if self.format != "prepared":
            return self.transformer
        source = Path((self.marker or {}).get("source", ""))
        if not (source / "config.json").is_file() and not source.is_file():  # prepared from a folder or a file
            raise UraeError(
                f"{self.transformer} is a prepared (quantized) checkpoint and its source {source} is gone; "
                f"a URAE 4K adapter needs the full-precision base once: pass the original model folder"
            )
        return source

    def reader(self) -> CheckpointReader | SingleFileReader:
        """The transformer's tensors under diffusers names, one at a time (a prepared folder's: quantized)."""
        return open_weights(self.transformer)


def open_weights(path: Path) -> CheckpointReader | SingleFileReader:
    """Diffusers-named tensors of a transformer folder or single file."""
    return SingleFileReader(path) if path.is_file() else CheckpointReader(path)


def resolve_files(
    model: str | os.PathLike,
    base_pipeline: str | os.PathLike | None = None,
    component_files: ComponentFiles | None = None,
    transformer: str | os.PathLike | None = None,
) -> ModelFiles:
    """Resolve `model` (+ `--base-pipeline`, `--vae/--clip/--t5`) once: a hub id is fetched here and everything
    after reads local files. `transformer`: a recipe's separate transformer (prepared folder or single file),
    loaded instead of `model`'s own; `model` then supplies the pipeline (unless `base_pipeline` does)."""
    if transformer is not None:
        files = resolve_files(transformer, base_pipeline or model, component_files)
        return replace(files, model=str(model), base_pipeline=None if base_pipeline is None else str(base_pipeline))
    check_files(component_files)  # headers only: a wrong file fails before anything is fetched
    text = str(model)
    given = None if base_pipeline is None else str(base_pipeline)
    common = {"base_pipeline": given, "component_files": component_files or NO_FILES}
    path = resolve_model(model)
    if path.is_file():  # one transformer file: its config from the tensor shapes (+ the base pipeline's RoPE axes)
        reader = SingleFileReader(path)
        root = base_pipeline_root(base_pipeline, reader.variant, text, required=base_pipeline is not None)
        try:
            config, error = derive_config(reader, base_transformer_config(root), str(base_pipeline or root)), None
        except UraeError as e:  # unknown RoPE axes: said when needed (`convert` reads the weights only)
            if base_pipeline is not None:
                raise
            config, error = None, str(e)
        return ModelFiles(text, "single_file", path, reader.variant, config, root, config_error=error, **common)
    folder = transformer_folder(path)
    config = load_config(folder)
    variant = "dev" if config.get("guidance_embeds") else "schnell"
    marker = _read_marker(folder)
    if base_pipeline is not None:
        root = base_pipeline_root(base_pipeline, variant, text)
    else:  # the folder itself, the pipeline around a transformer/ folder, or what a prepared folder came from
        source = (marker or {}).get("source")
        around = [folder.parent] if marker is None else [Path(source).parent, Path(source)] if source else []
        root = next((c for c in [path, *around] if (c / "model_index.json").is_file()), None)
    return ModelFiles(
        text, "diffusers" if marker is None else "prepared", folder, variant, config, root, marker=marker, **common
    )


def as_model_files(
    model: str | os.PathLike | ModelFiles,
    base_pipeline: str | os.PathLike | None = None,
    component_files: ComponentFiles | None = None,
) -> ModelFiles:
    """`model` when already resolved, else `resolve_files(...)`: for entry points that take either."""
    if not isinstance(model, ModelFiles):
        return resolve_files(model, base_pipeline, component_files)
    if base_pipeline is not None or component_files:
        raise UraeError(
            "a resolved ModelFiles already names its base pipeline and component files: pass them to "
            "resolve_files instead"
        )
    return model


# ---- finding the folders -------------------------------------------------------------------------------------------
def resolve_model(model: str | os.PathLike) -> Path:
    """`tiny`, a local diffusers FLUX folder, or a Hugging Face hub id -> local pipeline (or transformer) folder;
    a single transformer .safetensors file (ComfyUI / Forge layout) is returned as is."""
    text = str(model)
    if text in TINY:
        return _tiny(text)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix != ".safetensors":
            raise UraeError(
                f"--model {text} is a file but not .safetensors; pass a FLUX transformer .safetensors "
                f"file or the diffusers folder that holds model_index.json"
            )
        return path
    if text.endswith(".safetensors"):
        raise UraeError(f"model file not found: {text}")
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        return _download(text, MODEL_FILES)
    raise UraeError(
        f"model not found: {text} (a diffusers FLUX folder, a hub id like black-forest-labs/FLUX.1-dev, or 'tiny')"
    )


def transformer_folder(root: Path) -> Path:
    """The folder holding the transformer's config.json and weights (pipeline root or the subfolder itself)."""
    for cand in (root / "transformer", root):
        if (cand / "config.json").is_file() or (cand / PREPARED_MARKER).is_file():
            return cand
    raise UraeError(f"{root} has no transformer/config.json: is it a diffusers FLUX folder?")


def load_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UraeError(f"cannot read {folder / 'config.json'}: {e}") from e


def _read_marker(folder: Path) -> dict | None:
    path = folder / PREPARED_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UraeError(f"cannot read {path}: {e}; run `urae-lite prepare` again") from e
    if not isinstance(marker, dict):
        raise UraeError(f"{path} is not a prepare marker; run `urae-lite prepare` again")
    return marker


def base_pipeline_root(
    base_pipeline: str | os.PathLike | None, variant: str, file: str | os.PathLike, required: bool = True
) -> Path | None:
    """The diffusers folder whose VAE, text encoders and scheduler go with a transformer that has none.

    Default: FLUX.1-dev/-schnell (per the weights) from the local Hugging Face cache, never downloaded implicitly.
    """
    if base_pipeline is None:
        hub = HUB_IDS[variant]
        root = _cached_snapshot(hub)
        if root is None and required:
            raise UraeError(
                f"{file} is a FLUX.1-{variant} transformer only: pass --base-pipeline with a diffusers "
                f"FLUX folder or hub id for the VAE and text encoders ({hub} is not in the Hugging Face "
                f"cache)"
            )
        return root
    root = _pipeline_folder(str(base_pipeline))
    if not (root / "model_index.json").is_file():
        raise UraeError(
            f"--base-pipeline {base_pipeline} has no model_index.json: pass a diffusers FLUX pipeline folder or hub id"
        )
    return root


def base_transformer_config(root: Path | None) -> dict | None:
    path = None if root is None else root / "transformer" / "config.json"
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UraeError(f"cannot read {path}: {e}") from e


def _cached_snapshot(hub: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(hub, allow_patterns=PIPELINE_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 -- not cached (or no hub state at all): the caller says what to pass
        return None
    return root if (root / "model_index.json").is_file() else None


def _pipeline_folder(text: str) -> Path:
    """Local folder, `tiny`, or hub id (fetched without the transformer weights, which come from elsewhere)."""
    if text in TINY:
        return _tiny(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if not HUB_ID.match(text):
        raise UraeError(f"--base-pipeline {text} not found: pass a diffusers FLUX folder or a hub id")
    return _download(text, PIPELINE_FILES)


def _tiny(text: str) -> Path:
    from .tiny import tiny_flux_path

    return tiny_flux_path("schnell" if text == "tiny-schnell" else "dev")


def _download(hub_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as e:  # offline, gated, unknown repo: all mean the same to the user
        raise UraeError(
            f"cannot fetch {hub_id} from the Hugging Face hub ({type(e).__name__}); download it once "
            f"and pass the local folder"
        ) from e
