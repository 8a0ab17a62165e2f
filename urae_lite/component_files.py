"""Single-file VAE and text encoders (ComfyUI's `ae.safetensors`, `clip_l.safetensors`, `t5xxl_*.safetensors`).

ComfyUI users hold FLUX's parts as loose files; a diffusers folder (`--base-pipeline`, or `--model`) still supplies
the configs, tokenizers and scheduler. Each file is loaded into the class that folder declares, built from its
config with no weights (meta device) and filled tensor by tensor, so host memory holds the model once:

* VAE: Black Forest Labs' / LDM keys (`encoder.down.0.block.0.conv1.weight`) through diffusers' own LDM -> diffusers
  conversion; a file already in diffusers keys is taken as is.
* CLIP-L: transformers keys, with or without the `text_model.` prefix (`text_projection`, `logit_scale` dropped).
* T5: transformers keys (`encoder.block.N...`, `shared.weight`); fp8 weights are dequantized to the compute dtype,
  times their `scale_weight` in ComfyUI's "scaled" fp8 files.

A file that is another component, does not fit the folder's widths, or is truncated ends in one UraeError line.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .console import library_bars_off
from .errors import UraeError
from .safetensors_io import CheckpointReader
from .text_encoders import declared_class, load_component

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
MARKERS = ("scaled_fp8",)  # ComfyUI's scaled-fp8 marker tensor
# tensors some files carry that the diffusers pipeline's classes do not have
DROPPED = (
    "text_projection.weight",
    "text_projection",
    "logit_scale",
    "embeddings.position_ids",
    "text_model.embeddings.position_ids",
)
T5_TIED = ("shared.weight", "encoder.embed_tokens.weight")  # the same embedding under two names


@dataclass(frozen=True)
class Kind:
    """What one option takes: the pipeline component it replaces and how the user knows the file."""

    option: str
    component: str
    label: str
    example: str
    anchor: str  # a tensor name suffix every file of this kind has; its prefix is the file's own prefix


KINDS = {
    "vae": Kind("--vae", "vae", "the FLUX VAE", "ae.safetensors", "encoder.conv_in.weight"),
    "clip": Kind(
        "--clip", "text_encoder", "a CLIP-L text encoder", "clip_l.safetensors", "embeddings.token_embedding.weight"
    ),
    "t5": Kind(
        "--t5",
        "text_encoder_2",
        "a T5 encoder",
        "t5xxl_fp16.safetensors",
        "encoder.block.0.layer.0.SelfAttention.q.weight",
    ),
}


@dataclass(frozen=True)
class ComponentFiles:
    """Single files that replace the base pipeline's VAE / CLIP / T5 weights (None: the folder's own)."""

    vae: str | os.PathLike | None = None
    clip: str | os.PathLike | None = None
    t5: str | os.PathLike | None = None

    def given(self) -> dict[str, Path]:
        """Pipeline component name -> file, for the files given."""
        return {KINDS[k].component: Path(p).expanduser() for k, p in vars(self).items() if p is not None}

    def file_for(self, component: str) -> Path | None:
        return self.given().get(component)

    def __bool__(self) -> bool:
        return bool(self.given())


NO_FILES = ComponentFiles()


# ---- reading a file ----------------------------------------------------------------------------------------------
def _open(path: Path, kind: Kind) -> CheckpointReader:
    if not path.is_file():
        raise UraeError(f"{kind.option} file not found: {path} ({kind.option} takes {kind.example})")
    return CheckpointReader(path)  # a truncated or foreign file fails here, in one line


def _describe(names: list[str]) -> str:
    """What a file holds, judged by its tensor names, for the 'wrong file' message."""

    def has(*parts: str) -> bool:
        return any(p in n for n in names for p in parts)

    if has("lora"):
        return "a LoRA (it goes in --adapter)"
    if has("double_blocks.", "transformer_blocks.", "model.diffusion_model."):
        return "a FLUX transformer (it goes in --model)"
    if has("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks."):
        return "a VAE (it goes in --vae)"
    if has("embeddings.token_embedding.weight"):
        return "a CLIP text encoder (it goes in --clip)"
    if has("encoder.block.", "SelfAttention"):
        return "a T5 encoder (it goes in --t5)"
    return "not a FLUX component"


def _prefix(path: Path, names: list[str], kind: Kind) -> str:
    """The file's own prefix before the component's names ('' for plain files), or the 'wrong file' line."""
    hits = sorted((n for n in names if n.endswith(kind.anchor)), key=len)
    if not hits:
        raise UraeError(
            f"{path} is {_describe(names)}, not {kind.label}: {kind.option} takes a file like {kind.example}"
        )
    return hits[0][: -len(kind.anchor)]


def _dequantized(
    reader: CheckpointReader, name: str, t: torch.Tensor, scales: set[str], dtype: torch.dtype
) -> torch.Tensor:
    """fp8 -> dtype (times the tensor's scale in a scaled-fp8 file); other tensors just cast."""
    if t.dtype in FP8:
        scale = name.rpartition(".")[0] + ".scale_weight"
        t = t.float() * reader.get(scale).float() if scale in scales else t
    return t.to(dtype)


def _tensors(reader: CheckpointReader, prefix: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name without the prefix, tensor in dtype), one at a time; fp8 scales and markers are consumed here."""
    keys = reader.keys()
    names = [n for n in keys if n.startswith(prefix)]
    scales = {n for n in names if n.endswith(".scale_weight")}
    wanted = [n for n in names if not n.endswith(SCALE_SUFFIXES) and n.removeprefix(prefix) not in MARKERS]
    for name, t in reader.iter_tensors(wanted):
        yield name.removeprefix(prefix), _dequantized(reader, name, t, scales, dtype)


def _header_tensors(path: Path, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Like `_tensors`, but meta tensors of the header's shapes: checks a 10 GB file without reading it."""
    from .safetensors_io import open_safetensors

    with open_safetensors(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    for name, shape in shapes.items():
        short = name.removeprefix(prefix)
        if name.startswith(prefix) and not name.endswith(SCALE_SUFFIXES) and short not in MARKERS:
            yield short, torch.empty(shape, device="meta")


# ---- filling a skeleton ------------------------------------------------------------------------------------------
def _skeleton(root: Path, kind: Kind) -> nn.Module:
    """The declared class from the folder's config, parameters on the meta device (buffers real, e.g. CLIP's
    position ids, which no file carries)."""
    from accelerate import init_empty_weights

    cls = declared_class(root, kind.component)
    folder = root / kind.component
    if not (folder / "config.json").is_file():
        raise UraeError(
            f"{folder} has no config.json: {kind.option} needs the base pipeline's {kind.component} "
            f"config (its widths) even when the weights come from a file"
        )
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "from_config") and hasattr(cls, "load_config"):  # diffusers
            return cls.from_config(cls.load_config(folder))
        from transformers import AutoConfig

        return cls(AutoConfig.from_pretrained(folder))


def _check_fit(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, root: Path, kind: Kind) -> None:
    """Names and shapes against the skeleton built from the base config; any gap or misfit is one line."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    base = f"the base pipeline's {kind.component} ({type(model).__name__}, {root / kind.component})"
    for name, t in tensors.items():
        if name in expected and tuple(t.shape) != expected[name]:
            raise UraeError(
                f"{path} does not match {base}: its {name} is {tuple(t.shape)}, the base config "
                f"expects {expected[name]}; pass the file of the same model as the base pipeline"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UraeError(
            f"{path} has {len(extra)} tensors that {base} does not (first: {extra[0]}): a larger "
            f"model than the base pipeline's? pass the file of the same model"
        )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UraeError(
            f"{path} lacks {len(missing)} tensors of {base} (first: {missing[0]}): an incomplete "
            f"download, or a smaller model than the base pipeline's"
        )


def _fill(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, root: Path, kind: Kind) -> nn.Module:
    """Assign the tensors (already named and cast) into the skeleton, after `_check_fit`."""
    _check_fit(model, tensors, path, root, kind)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _renamed(tensors: Iterator[tuple[str, torch.Tensor]], model: nn.Module, kind: Kind) -> dict[str, torch.Tensor]:
    """Prefix-free file names -> the class's own names (its prefix, e.g. CLIPTextModel's `text_model.`); drops what
    the class does not have."""
    own = _prefix(Path(type(model).__name__), list(model.state_dict()), kind)
    out = {}
    for name, t in tensors:
        if name in DROPPED or name.startswith(("decoder.", "lm_head.")):  # T5 files may hold the whole T5
            continue
        out[own + name] = t
    if kind.component == "text_encoder_2":
        present = [k for k in T5_TIED if k in out]
        for k in T5_TIED:
            if present and k not in out:
                out[k] = out[present[0]]
    return out


# ---- the three components ----------------------------------------------------------------------------------------
def _named(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], kind: Kind) -> dict[str, torch.Tensor]:
    """The file's (prefix-free) tensors under the skeleton's names: diffusers' LDM -> diffusers conversion for a
    BFL/LDM VAE (a diffusers-keyed one is taken as is), the class's own prefix for the text encoders."""
    if kind.component != "vae":
        return _renamed(tensors, model, kind)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    tensors = dict(tensors)
    if not any(k.startswith("encoder.down_blocks.") for k in tensors):
        tensors = convert_ldm_vae_checkpoint(tensors, dict(model.config))
    return {k: v.contiguous() for k, v in tensors.items()}  # the 1x1-conv attention weights become views


def _read(
    component: str, path: str | os.PathLike, root: Path, dtype: torch.dtype
) -> tuple[nn.Module, dict[str, torch.Tensor], Path, Kind]:
    """(empty skeleton, the file's tensors under its names in dtype, path, kind): the common part of loading."""
    kind = _kind(component)
    path = Path(path).expanduser()
    reader = _open(path, kind)
    prefix = _prefix(path, reader.keys(), kind)
    model = _skeleton(root, kind)
    return model, _named(model, _tensors(reader, prefix, dtype), kind), path, kind


def load_file_component(component: str, path: str | os.PathLike, root: Path, dtype: torch.dtype) -> nn.Module:
    """`vae` / `text_encoder` / `text_encoder_2`: the base pipeline's class with the file's weights in `dtype`."""
    model, tensors, path, kind = _read(component, path, root, dtype)
    return _fill(model, tensors, path, root, kind)


def load_t5_file_nf4(path: str | os.PathLike, root: Path, dtype: torch.dtype) -> nn.Module:
    """A T5 file with NF4 linears (`--t5-quant nf4`): checked and renamed as for bf16, then quantized by
    transformers' bitsandbytes path, which takes a state dict in place of a folder's weights."""
    from transformers import AutoConfig

    from .text_encoders import nf4_config

    model, tensors, path, kind = _read("text_encoder_2", path, root, dtype)
    _check_fit(model, tensors, path, root, kind)
    cls = declared_class(root, kind.component)
    with library_bars_off():
        return cls.from_pretrained(
            None,
            config=AutoConfig.from_pretrained(root / kind.component),
            state_dict=tensors,
            quantization_config=nf4_config(model, dtype),
            dtype=dtype,
        ).eval()


def check_fits(files: ComponentFiles | None, root: Path) -> None:
    """Every given file against the base config, from the headers only: a wrong file fails in a second, before
    the transformer takes minutes to load."""
    for component, path in (files or NO_FILES).given().items():
        kind = _kind(component)
        prefix = _prefix(path, _open(path, kind).keys(), kind)
        model = _skeleton(root, kind)
        _check_fit(model, _named(model, _header_tensors(path, prefix), kind), path, root, kind)


def _kind(component: str) -> Kind:
    return next(k for k in KINDS.values() if k.component == component)


def load_model(root: Path, component: str, files: ComponentFiles | None, dtype: torch.dtype) -> nn.Module:
    """`vae` / `text_encoder` / `text_encoder_2`: from its single file when one is given, else from the folder."""
    path = (files or NO_FILES).file_for(component)
    if path is not None:
        return load_file_component(component, path, root, dtype)
    return load_component(root, component, dtype=dtype).eval()


def pipeline_components(
    files: ComponentFiles | None, root: Path, dtype: torch.dtype, t5_nf4: bool = False
) -> dict[str, nn.Module]:
    """Keyword arguments for `FluxPipeline.from_pretrained`: diffusers then skips those folders' weights."""
    out = {}
    for component, path in (files or NO_FILES).given().items():
        if t5_nf4 and component == "text_encoder_2":
            out[component] = load_t5_file_nf4(path, root, dtype)
        else:
            out[component] = load_file_component(component, path, root, dtype)
    return out


def check_files(files: ComponentFiles | None) -> None:
    """Fail before anything slow loads when a given file is missing, unreadable or another component (headers
    only)."""
    for option, path in vars(files or NO_FILES).items():
        if path is not None:
            path = Path(path).expanduser()
            _prefix(path, _open(path, KINDS[option]).keys(), KINDS[option])


# ---- identity (cache fingerprint) --------------------------------------------------------------------------------
def file_identity(path: Path) -> str:
    """Size + hash of the safetensors header (names, dtypes, offsets): path-independent, cheap on 10 GB files."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = f.read(min(length, 2**26))
    except (OSError, struct.error) as e:
        raise UraeError(f"cannot read {path}: {e} (file truncated or corrupt?)") from e
    try:
        header = json.dumps(
            {k: v for k, v in json.loads(header).items() if k != "__metadata__"}, sort_keys=True
        ).encode()
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        pass
    return f"{path.stat().st_size}:{hashlib.sha256(header).hexdigest()[:16]}"


# ---- command line ------------------------------------------------------------------------------------------------
def add_component_options(parser) -> None:
    """--vae / --clip / --t5 for `generate` and `cache` (argparse)."""
    parser.add_argument(
        "--vae",
        metavar="FILE",
        help="single-file FLUX VAE (ComfyUI's ae.safetensors) instead of the pipeline folder's vae/",
    )
    parser.add_argument(
        "--clip",
        metavar="FILE",
        help="single-file CLIP-L text encoder (clip_l.safetensors) instead of the folder's text_encoder/",
    )
    parser.add_argument(
        "--t5",
        metavar="FILE",
        help="single-file T5-XXL encoder (t5xxl_fp16 / t5xxl_fp8_e4m3fn"
        ".safetensors) instead of the folder's text_encoder_2/",
    )


def component_files(args) -> ComponentFiles:
    """The --vae / --clip / --t5 options (or recipe keys) as one value."""
    return ComponentFiles(getattr(args, "vae", None), getattr(args, "clip", None), getattr(args, "t5", None))
