"""Offline stand-ins for FLUX.1: a tiny complete pipeline folder and random full-size checkpoints.

Tests and benchmarks never download weights. Two tools cover what they need:

* ``build_tiny_flux`` writes a complete FLUX.1-dev/-schnell folder in diffusers layout (transformer, VAE,
  CLIP and T5 encoders, both tokenizers, scheduler) with the real architecture *shapes of interfaces*
  (16 latent channels, 8x VAE, 2x2 packing, guidance input) but tiny widths, so a 1024² generation
  runs in seconds on a laptop CPU. ``--model tiny`` on the CLI resolves to ``tiny_flux_path()``.
* ``write_random_transformer`` / ``iter_random_transformer_tensors`` produce random weights for any
  ``FluxTransformer2DModel`` config, including the full 11.9 B FLUX.1-dev one, one tensor at a time:
  memory and speed do not depend on weight values, so benchmarks can measure the real architecture.

Everything is deterministic from a seed, and folders are written atomically (built beside the target,
then renamed), so an interrupted build never leaves a half-written model that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .console import library_bars_off

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

__all__ = [
    "FORMAT_VERSION",
    "MARKER_NAME",
    "VARIANTS",
    "build_tiny_flux",
    "flux_dev_config",
    "iter_random_transformer_tensors",
    "tiny_flux_path",
    "tiny_transformer_config",
    "write_random_transformer",
]

#: Bump when the tiny model's contents change, so cached folders are rebuilt instead of reused.
FORMAT_VERSION = 2
#: Written last into a tiny folder; its presence (with matching fields) means the folder is complete.
MARKER_NAME = "urae_tiny.json"
VARIANTS = ("dev", "schnell")

# Tiny widths. The text widths feed the transformer's joint_attention_dim / pooled_projection_dim.
_T5_D_MODEL = 64  # a multiple of the NF4 block, so `--t5-quant nf4` quantizes the tiny T5 too
_CLIP_HIDDEN = 32
_CLIP_MAX_POSITIONS = 77
_T5_MAX_LENGTH = 512
_T5_EXTRA_IDS = 100

_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

# Words given whole-word tokens in both tokenizers, so prompts do not all fall apart into single characters.
_COMMON_WORDS = """
a an the of and or in on at to with by for from as is are was be this that it its into over under
photo photograph picture image painting drawing illustration render portrait landscape close up view
high resolution detailed sharp realistic cinematic lighting light dark bright sun sunset sunrise night
sky cloud clouds mountain mountains river lake sea ocean beach forest tree trees flower flowers garden
city street building house room window door road bridge snow rain water fire stone wood glass metal
cat dog bird horse fish person man woman child people face eyes hair hand hands smile
red orange yellow green blue purple pink black white gray brown gold silver colorful
big small large tiny old young new beautiful quiet calm soft warm cold golden hour style art
""".split()


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


def _check_variant(variant: str) -> None:
    """Fail early with the accepted names: a typo here would silently build the wrong model family."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown FLUX variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def tiny_transformer_config(variant: str = "dev") -> dict:
    """A FLUX-shaped transformer config (diffusers kwargs) with hidden size 32.

    Keeps every interface of the real model (64 packed latent channels, double + single blocks, 3-axis
    RoPE summing to the head dim, text widths of the tiny encoders, guidance input for dev) so code paths
    exercised on it are the ones used on FLUX.1; only the widths and depths shrink.
    """
    _check_variant(variant)
    return {
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": _T5_D_MODEL,
        "pooled_projection_dim": _CLIP_HIDDEN,
        "guidance_embeds": variant == "dev",
        "axes_dims_rope": (4, 6, 6),
    }


def flux_dev_config(variant: str = "dev") -> dict:
    """The full-size FLUX.1 transformer config: 11.90 B parameters, 504 Linear layers.

    Schnell has the same shapes but no guidance embedder (it is timestep-distilled, not guidance-distilled).
    """
    _check_variant(variant)
    return {
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": None,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": variant == "dev",
        "axes_dims_rope": (16, 56, 56),
    }


def _scheduler_config(variant: str) -> dict:
    """FlowMatchEuler settings copied from the official FLUX.1 repositories' scheduler_config.json."""
    _check_variant(variant)
    dev = variant == "dev"
    return {
        "num_train_timesteps": 1000,
        "shift": 3.0 if dev else 1.0,
        "use_dynamic_shifting": dev,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }


def _vae_config() -> dict:
    """FLUX's AutoencoderKL interface (16 latents, 8x down, same scaling/shift) at 8/16 channels.

    VAE decoding at full resolution dominates a tiny generation's time, so the widths are minimal.
    """
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 8, 16, 16],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": 4,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "force_upcast": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


# ----------------------------------------------------------------------------------------------------------
# Random transformer weights, one tensor at a time
# ----------------------------------------------------------------------------------------------------------


def _meta_transformer(config: dict) -> FluxTransformer2DModel:
    """Instantiate the transformer without allocating weights, to read names and shapes for any size."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends only on (seed, name): tensors can be made in any order or alone."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _random_tensor(
    name: str, shape: torch.Size, seed: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Random values of a plausible scale: unit-gain matrices, norm scales near 1, small biases.

    Scale matters because activations must stay finite through 57 blocks, and quantisers see realistic ranges.
    """
    generator = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
    values = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    if len(shape) >= 2:
        values.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
    elif "norm" in name and name.endswith("weight"):
        values.mul_(0.02).add_(1.0)
    else:
        values.mul_(0.02)
    return values.to(dtype)


def iter_random_transformer_tensors(
    config: dict,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(state_dict_name, tensor)`` for a random FluxTransformer2DModel, one tensor at a time.

    Lets benchmarks stream full-size FLUX weights into a loader with no disk and never more than one
    tensor alive here. Values depend on (seed, name, device): the CPU and CUDA generators differ.
    """
    device = torch.device(device)
    for name, meta in _meta_transformer(config).state_dict().items():
        yield name, _random_tensor(name, meta.shape, seed, dtype, device)


def _shard_name(index: int, total: int) -> str:
    """diffusers' shard file name, e.g. ``diffusion_pytorch_model-00001-of-00003.safetensors``."""
    return f"diffusion_pytorch_model-{index:05d}-of-{total:05d}.safetensors"


def _write_shards(folder: Path, tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Stream tensors into safetensors shards, holding at most one shard (plus one tensor) in memory.

    The shard count is known only at the end, so shards are written under provisional names and renamed.
    """
    from safetensors.torch import save_file

    provisional: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    total_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        path = folder / f"shard-{len(provisional):05d}.tmp"
        save_file(pending, str(path), metadata={"format": "pt"})
        provisional.append((path, list(pending)))
        pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.nbytes
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        pending_bytes += size
        total_bytes += size
    if pending or not provisional:
        flush()

    if len(provisional) == 1:
        provisional[0][0].rename(folder / _WEIGHTS_NAME)
        return
    weight_map: dict[str, str] = {}
    for index, (path, names) in enumerate(provisional, start=1):
        final = _shard_name(index, len(provisional))
        path.rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    index_json = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / _INDEX_NAME).write_text(json.dumps(index_json, indent=2, sort_keys=True) + "\n")


def write_random_transformer(
    path: str | os.PathLike,
    config: dict,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2**30,
) -> Path:
    """Write a random-weight FluxTransformer2DModel folder (config.json + safetensors) in diffusers layout.

    Never materialises the model: tensors are generated and flushed shard by shard, so the full 22 GiB
    FLUX.1-dev checkpoint can be written on a machine with a few GiB of RAM, and the result is exactly
    what ``FluxTransformer2DModel.from_pretrained`` and our streaming loader expect from a real download.
    An existing folder at ``path`` is replaced atomically.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    target = Path(path)
    with _atomic_folder(target) as staging:
        _meta_transformer(config).save_config(staging)
        _write_shards(staging, iter_random_transformer_tensors(config, seed=seed, dtype=dtype), max_shard_bytes)
    return target


# ----------------------------------------------------------------------------------------------------------
# Atomic folder writes
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success swap it in, on failure delete it.

    Staging on the same filesystem makes the final rename atomic, so readers see the old folder or the
    complete new one, never a partial one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        _make_readable(staging)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """Give the staged tree ordinary permissions (folders 0755, files 0644).

    ``mkdtemp`` creates 0700 folders and some savers write 0600 files; a shared model cache must not keep those.
    """
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging``; an old folder is moved aside first (rename cannot overwrite one)."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old / "folder")
    try:
        os.replace(staging, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.replace(old / "folder", target)  # put the previous folder back rather than lose it
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers, built offline
# ----------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace each left-to-right occurrence of ``pair`` in ``symbols`` by its concatenation."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _train_bpe_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """Plain BPE training on a tiny word list: repeatedly merge the most frequent adjacent pair.

    Hand-chained merges interfere (``t o</w>`` from "to" would split "photo"); trained merges replay exactly,
    so every listed word becomes one token. Ties break on the pair itself, keeping the result deterministic.
    """
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in words:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        words = [_merge_pair(symbols, best) for symbols in words]


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary layout: 256 byte symbols, the same with ``</w>``, merge results, then specials.

    Every byte is in the base alphabet, so any UTF-8 prompt tokenizes without unknowns; merges trained on
    the common words give real whole-word tokens.
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [f"{symbol}</w>" for symbol in alphabet]
    merges = _train_bpe_merges([[*word[:-1], f"{word[-1]}</w>"] for word in _COMMON_WORDS])
    tokens += dict.fromkeys(left + right for left, right in merges)  # two merges may spell the same token
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def _write_clip_tokenizer(folder: Path) -> int:
    """Write CLIP tokenizer files (vocab.json, merges.txt and tokenizer.json); return the vocab size.

    vocab.json + merges.txt serve the slow/legacy loaders, tokenizer.json the fast one; both come from
    the same vocabulary, with CLIP's normaliser, pre-tokeniser and ``<|startoftext|> ... <|endoftext|>`` framing.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
            fuse_unk=False, unk_token=eos)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(split, behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False, add_prefix_space=False
    )
    tokenizer.add_special_tokens([bos, eos])
    tokenizer.save(str(folder / "tokenizer.json"))

    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": _CLIP_MAX_POSITIONS,
        "bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": eos,
        "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
    })
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": eos}
    _write_json(folder / "special_tokens_map.json", specials)
    return len(vocab)


def _t5_vocab() -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary laid out like T5's: <pad>, </s>, <unk>, pieces, sentinels.

    Pieces are printable ASCII and common accented letters (alone and word-initial) plus the common words
    (word-initial and inside a word, e.g. after a quote), scored so whole words win. Anything else, such as
    emoji, maps to <unk>, as with T5's own vocabulary.
    """
    chars = [c for c in string.printable if not c.isspace()] + list("àáâäçèéêëìíîïñòóôöùúûüßÀÉÖÜ")
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{c}", -7.0) for c in chars] + [(c, -8.0) for c in chars]
    pieces += [(f"▁{word}", -4.0) for word in _COMMON_WORDS if len(word) > 1]
    pieces += [(word, -5.0) for word in _COMMON_WORDS if len(word) > 1]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(_T5_EXTRA_IDS))]
    return pieces


def _write_t5_tokenizer(folder: Path) -> int:
    """Write a T5 tokenizer (tokenizer.json, no sentencepiece model needed); return the vocab size.

    Uses T5's Metaspace pre-tokenisation and ``... </s>`` framing so ``T5TokenizerFast`` loads it directly.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = _t5_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    extra_ids = [f"<extra_id_{i}>" for i in range(_T5_EXTRA_IDS)]
    tokenizer.add_special_tokens(["<pad>", "</s>", "<unk>", *extra_ids])
    tokenizer.save(str(folder / "tokenizer.json"))

    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": _T5_MAX_LENGTH,
        "extra_ids": _T5_EXTRA_IDS,
        "additional_special_tokens": extra_ids,
        "legacy": True,
        "clean_up_tokenization_spaces": True,
        **specials,
    })
    _write_json(folder / "special_tokens_map.json", {**specials, "additional_special_tokens": extra_ids})
    return len(vocab)


# ----------------------------------------------------------------------------------------------------------
# The tiny pipeline folder
# ----------------------------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    """Sorted, indented JSON: stable bytes across runs, readable diffs."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _round_up(value: int, multiple: int) -> int:
    """Embedding tables are padded like the real models' (T5: 32100 tokens, 32128 rows)."""
    return -(-value // multiple) * multiple


def _write_text_encoders(root: Path, clip_vocab: int, t5_vocab: int) -> None:
    """Tiny CLIP-L-like and T5-v1.1-like encoders, default-initialised, saved in fp32."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_config = CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=_CLIP_HIDDEN, intermediate_size=64, projection_dim=_CLIP_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=_CLIP_MAX_POSITIONS,
        hidden_act="quick_gelu", bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1,
    )
    with library_bars_off():
        CLIPTextModel(clip_config).save_pretrained(root / "text_encoder")

    t5_config = T5Config(
        vocab_size=_round_up(t5_vocab, 64), d_model=_T5_D_MODEL, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, tie_word_embeddings=False,
    )
    with library_bars_off():
        T5EncoderModel(t5_config).save_pretrained(root / "text_encoder_2")


def _write_transformer(root: Path, variant: str) -> None:
    """The tiny transformer in bf16 (FLUX's checkpoint dtype), default init: output layers are not zero.

    Written by hand (config + one safetensors file, as diffusers would) because ``model.to(bfloat16)``
    before ``save_pretrained`` makes diffusers warn about casting.
    """
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    model = FluxTransformer2DModel(**tiny_transformer_config(variant))
    folder = root / "transformer"
    model.save_config(folder)
    weights = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(folder / _WEIGHTS_NAME), metadata={"format": "pt"})


def _write_vae(root: Path) -> None:
    """The tiny VAE in fp32."""
    from diffusers import AutoencoderKL

    AutoencoderKL(**_vae_config()).save_pretrained(root / "vae", safe_serialization=True)


def _write_scheduler(root: Path, variant: str) -> None:
    """The FLUX.1 scheduler config for the variant (through diffusers, so the file format is its own)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(**_scheduler_config(variant)).save_pretrained(root / "scheduler")


def _model_index() -> dict:
    """model_index.json exactly as in the official FLUX.1 repositories (same classes per component)."""
    import diffusers

    return {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _marker(seed: int, variant: str) -> dict:
    """What identifies a tiny folder's contents; a folder is reused only if its marker equals this."""
    return {"kind": "urae_lite tiny FLUX.1", "format": FORMAT_VERSION, "seed": seed, "variant": variant}


def _is_complete(folder: Path, seed: int, variant: str) -> bool:
    """True if ``folder`` is a finished tiny build of this seed/variant (the marker is written last)."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker == _marker(seed, variant)
        and (folder / "model_index.json").is_file()
        and all((folder / sub).is_dir() for sub in _SUBFOLDERS)
    )


def _write_tiny_flux(root: Path, seed: int, variant: str) -> None:
    """Write every component into ``root``. Weights come from a private RNG state seeded with ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _write_transformer(root, variant)
        _write_vae(root)
        clip_vocab = _write_clip_tokenizer(root / "tokenizer")
        t5_vocab = _write_t5_tokenizer(root / "tokenizer_2")
        _write_text_encoders(root, clip_vocab, t5_vocab)
    _write_scheduler(root, variant)
    _write_json(root / "model_index.json", _model_index())
    _write_json(root / MARKER_NAME, _marker(seed, variant))


def build_tiny_flux(
    path: str | os.PathLike,
    seed: int = 0,
    variant: str = "dev",
    overwrite: bool = False,
) -> Path:
    """Write (or reuse) a complete tiny FLUX.1 folder in diffusers layout, deterministic from ``seed``.

    ``FluxPipeline.from_pretrained(path)`` loads it like the real model. An existing complete folder with
    the same seed/variant/format is reused unless ``overwrite``; anything else at ``path`` is replaced.
    The build happens beside the target and is renamed into place, so concurrent or interrupted builds are safe.
    """
    _check_variant(variant)
    target = Path(path)
    if not overwrite and _is_complete(target, seed, variant):
        return target
    try:
        with _atomic_folder(target) as staging:
            _write_tiny_flux(staging, seed, variant)
    except OSError:
        # Another process may have renamed its identical build into place first; that one is as good.
        if not _is_complete(target, seed, variant):
            raise
    return target


def _cache_root() -> Path:
    """``$URAE_LITE_CACHE``, else ``$XDG_CACHE_HOME/urae_lite`` (default ``~/.cache/urae_lite``)."""
    if env := os.environ.get("URAE_LITE_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "urae_lite"


def tiny_flux_path(variant: str = "dev", seed: int = 0) -> Path:
    """The cached tiny FLUX.1 folder that ``--model tiny`` resolves to, built on first use."""
    _check_variant(variant)
    folder = _cache_root() / f"tiny-flux1-{variant}-seed{seed}-v{FORMAT_VERSION}"
    return build_tiny_flux(folder, seed=seed, variant=variant)
