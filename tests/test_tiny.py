"""The offline FLUX stand-ins: the tiny pipeline folder and random full-size transformer checkpoints.

Everything here runs on CPU with no network and no downloaded weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flux_reference import PIXEL_TOL, reference_image, static_sigmas, unpack_with_transposed_patches

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from urae_lite import tiny  # noqa: E402
from urae_lite.tiny import (  # noqa: E402
    MARKER_NAME,
    build_tiny_flux,
    flux_dev_config,
    iter_random_transformer_tensors,
    tiny_flux_path,
    tiny_transformer_config,
    write_random_transformer,
)

PROMPT = 'A "golden-hour" photo of a café in Zürich, 4K — très détaillé!? 🐈 (cat) #1; naïve'


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def tiny_dev_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "dev", seed=0, variant="dev")


@pytest.fixture(scope="session")
def tiny_schnell_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "schnell", seed=0, variant="schnell")


def _load_pipeline(folder: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder)  # diffusers upcasts the bf16 transformer to fp32 by default
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_dev_pipe(tiny_dev_folder: Path):
    return _load_pipeline(tiny_dev_folder)


def _generate(pipe, size: int, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipe(PROMPT, height=size, width=size, num_inference_steps=2, output_type="np", generator=generator, **kwargs)
    return np.asarray(out.images)


def _assert_plausible_image(image: np.ndarray, size: int) -> None:
    assert image.shape == (1, size, size, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.01, "image is (nearly) constant"


def _reference(folder: Path, size: int, **settings) -> np.ndarray:
    """`_generate`'s image from the float64 sampler written from FLUX's definition (tests/flux_reference.py)."""
    return reference_image(folder, PROMPT, width=size, height=size, steps=2, seed=0, **settings)[1]


def _reference_error(image: np.ndarray, reference: np.ndarray) -> float:
    """max |image − reference| in [0, 1] units: fp32 against float64 rounding only, ≤ PIXEL_TOL by the analysis in
    tests/flux_reference.py (the same weights, noise, schedule and layout on both sides)."""
    assert image.shape == (1, *reference.shape)
    return float(np.abs(image[0] - reference).max())


def _weight_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


# ------------------------------------------------------------------------------------------------ tiny pipeline


@pytest.fixture(scope="module")
def dev_reference_256(tiny_dev_folder: Path) -> np.ndarray:
    return _reference(tiny_dev_folder, 256, guidance=3.5, max_sequence_length=512)  # FluxPipeline's defaults


@pytest.mark.parametrize("fault", [None, "layout", "shift"])
def test_tiny_dev_generates_256(tiny_dev_pipe, dev_reference_256, monkeypatch, fault) -> None:
    """The tiny folder through FluxPipeline makes the image FLUX's definition gives; the faulty runs show that a
    wrong latent layout or a wrong schedule (μ of the dynamic shift from the latent pixel count instead of the
    token count) is far outside the bound."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux import pipeline_flux

    if fault == "layout":
        monkeypatch.setattr(FluxPipeline, "_unpack_latents", staticmethod(unpack_with_transposed_patches))
    elif fault == "shift":
        shift = pipeline_flux.calculate_shift
        monkeypatch.setattr(pipeline_flux, "calculate_shift", lambda n, *args, **kw: shift(4 * n, *args, **kw))
    image = _generate(tiny_dev_pipe, 256, guidance_scale=3.5)
    _assert_plausible_image(image, 256)
    error = _reference_error(image, dev_reference_256)
    assert error <= PIXEL_TOL if fault is None else error > 10 * PIXEL_TOL, error


def test_tiny_dev_generates_1024(tiny_dev_pipe, tiny_dev_folder: Path) -> None:
    """At 1024² (4096 image tokens: the dynamic shift's upper end, μ = 1.15)."""
    image = _generate(tiny_dev_pipe, 1024, guidance_scale=3.5)
    _assert_plausible_image(image, 1024)
    reference = _reference(tiny_dev_folder, 1024, guidance=3.5, max_sequence_length=512, vae_dtype=torch.float32)
    assert _reference_error(image, reference) <= PIXEL_TOL


def test_tiny_dev_folder_layout(tiny_dev_folder: Path) -> None:
    index = json.loads((tiny_dev_folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    assert json.loads((tiny_dev_folder / MARKER_NAME).read_text())["seed"] == 0

    from safetensors import safe_open

    with safe_open(tiny_dev_folder / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
        proj_out = f.get_tensor("proj_out.weight")
        norm_out = f.get_tensor("norm_out.linear.weight")
    assert dtypes == {"BF16"}
    assert proj_out.abs().sum() > 0 and norm_out.abs().sum() > 0

    vae = json.loads((tiny_dev_folder / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    assert not vae["use_quant_conv"] and not vae["use_post_quant_conv"]

    scheduler = json.loads((tiny_dev_folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0 and scheduler["use_dynamic_shifting"] is True
    assert (scheduler["base_shift"], scheduler["max_shift"]) == (0.5, 1.15)
    assert (scheduler["base_image_seq_len"], scheduler["max_image_seq_len"]) == (256, 4096)


def test_tiny_transformer_matches_text_encoder_widths(tiny_dev_pipe) -> None:
    config = tiny_dev_pipe.transformer.config
    assert config.joint_attention_dim == tiny_dev_pipe.text_encoder_2.config.d_model
    assert config.pooled_projection_dim == tiny_dev_pipe.text_encoder.config.hidden_size
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert config.guidance_embeds is True


def test_tiny_schnell_has_no_guidance_and_runs(tiny_schnell_folder: Path) -> None:
    pipe = _load_pipeline(tiny_schnell_folder)
    assert pipe.transformer.config.guidance_embeds is False
    assert not hasattr(pipe.transformer.time_text_embed, "guidance_embedder")
    assert pipe.scheduler.config.shift == 1.0 and pipe.scheduler.config.use_dynamic_shifting is False
    image = _generate(pipe, 256, guidance_scale=0.0, max_sequence_length=256)
    _assert_plausible_image(image, 256)
    reference = _reference(
        tiny_schnell_folder, 256, guidance=0.0, max_sequence_length=256, sigmas=static_sigmas(2, 1.0)
    )
    assert _reference_error(image, reference) <= PIXEL_TOL


# ------------------------------------------------------------------------------------------------ tokenizers


def test_clip_tokenizer_handles_arbitrary_prompts(tiny_dev_folder: Path, tiny_dev_pipe) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dev_folder / "tokenizer")
    vocab_size = tiny_dev_pipe.text_encoder.config.vocab_size
    ids = tokenizer(PROMPT).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert all(0 <= i < vocab_size for i in ids)
    assert tokenizer.eos_token_id == tiny_dev_pipe.text_encoder.config.eos_token_id  # pooled output position
    assert len(tokenizer("the photo").input_ids) == 4  # whole-word merges exist
    padded = tokenizer(PROMPT * 5, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77


def test_t5_tokenizer_handles_arbitrary_prompts(tiny_dev_folder: Path, tiny_dev_pipe) -> None:
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(tiny_dev_folder / "tokenizer_2")
    vocab_size = tiny_dev_pipe.text_encoder_2.config.vocab_size
    ids = tokenizer(PROMPT).input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1
    assert all(0 <= i < vocab_size for i in ids)
    assert tokenizer.pad_token_id == 0 and tokenizer.unk_token_id == 2
    assert ids.count(tokenizer.unk_token_id) < len(ids) / 2
    assert tokenizer("the photo").input_ids == [
        tokenizer.convert_tokens_to_ids("▁the"),
        tokenizer.convert_tokens_to_ids("▁photo"),
        1,
    ]
    padded = tokenizer(PROMPT, padding="max_length", max_length=512, truncation=True).input_ids
    assert len(padded) == 512

    saved = json.loads((tiny_dev_folder / "tokenizer_2" / "tokenizer.json").read_text())
    pieces = [piece for piece, _ in saved["model"]["vocab"]]
    assert len(set(pieces)) == len(pieces) == len(tokenizer)


# ------------------------------------------------------------------------------------------------ building


def test_build_is_deterministic_in_the_seed(tiny_dev_folder: Path, tmp_path: Path) -> None:
    again = _weight_bytes(build_tiny_flux(tmp_path / "same", seed=0))
    assert again == _weight_bytes(tiny_dev_folder)
    other = _weight_bytes(build_tiny_flux(tmp_path / "other", seed=1))
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert other[name] != again[name]


def test_build_does_not_disturb_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_flux(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


def test_build_reuses_complete_folder_and_replaces_others(tmp_path: Path) -> None:
    target = build_tiny_flux(tmp_path / "m", seed=0)
    marker = target / MARKER_NAME
    stamp = marker.stat().st_ino
    assert build_tiny_flux(target, seed=0) == target
    assert marker.stat().st_ino == stamp, "a complete folder must be reused"

    build_tiny_flux(target, seed=0, overwrite=True)
    assert marker.stat().st_ino != stamp

    build_tiny_flux(target, seed=0, variant="schnell")
    assert json.loads(marker.read_text())["variant"] == "schnell"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "no staging folders left behind"


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tiny.build, "_write_scheduler", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_tiny_flux(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_tiny_flux_path_uses_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("URAE_LITE_CACHE", str(tmp_path))
    folder = tiny_flux_path("schnell", seed=3)
    assert folder.parent == tmp_path
    assert json.loads((folder / MARKER_NAME).read_text())["variant"] == "schnell"
    assert tiny_flux_path("schnell", seed=3) == folder


@pytest.mark.parametrize(
    "call",
    [
        lambda: tiny_transformer_config("pro"),
        lambda: flux_dev_config("krea"),
        lambda: build_tiny_flux("/nonexistent/never-written", variant="Dev"),
        lambda: tiny_flux_path("kontext"),
    ],
)
def test_unknown_variant_raises(call) -> None:
    with pytest.raises(ValueError, match="unknown FLUX variant"):
        call()


# ------------------------------------------------------------------------------------------------ random checkpoints


def _meta_model(config: dict):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def _small_config() -> dict:
    return {**tiny_transformer_config("dev"), "num_attention_heads": 4, "num_layers": 2, "num_single_layers": 3}


def test_random_transformer_shards_and_loads(tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    config = _small_config()
    max_shard_bytes = 64 * 1024
    folder = write_random_transformer(tmp_path / "t", config, seed=5, max_shard_bytes=max_shard_bytes)

    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and not (folder / "diffusion_pytorch_model.safetensors").exists()
    assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards

    meta = _meta_model(config).state_dict()
    assert set(index["weight_map"]) == set(meta)
    total = 0
    for shard in shards:
        with safe_open(folder / shard, "pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert len(sizes) == 1 or sum(sizes) <= max_shard_bytes
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total

    model = FluxTransformer2DModel.from_pretrained(folder)  # upcast to fp32: exact for bf16 values
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in meta.values())
    loaded = model.state_dict()
    for name, tensor in iter_random_transformer_tensors(config, seed=5):
        assert torch.equal(loaded[name].to(torch.bfloat16), tensor), name


def test_random_transformer_single_shard_and_scale(tmp_path: Path) -> None:
    folder = write_random_transformer(tmp_path / "t", tiny_transformer_config("schnell"), seed=0)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    tensors = dict(iter_random_transformer_tensors(_small_config(), seed=0, dtype=torch.float32))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert 0.5 < tensors["x_embedder.weight"].std() * 64**0.5 < 2.0  # unit gain: std ≈ 1/sqrt(fan_in)
    assert torch.allclose(tensors["transformer_blocks.0.attn.norm_q.weight"], torch.ones(16), atol=0.2)
    other = dict(iter_random_transformer_tensors(_small_config(), seed=1, dtype=torch.float32))
    assert not torch.equal(tensors["proj_out.weight"], other["proj_out.weight"])


def test_random_tensors_are_streamed_one_at_a_time() -> None:
    stream = iter_random_transformer_tensors(flux_dev_config(), seed=0)
    name, tensor = next(stream)  # full-size FLUX: only this one tensor exists
    assert tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu"
    assert name in _meta_model(flux_dev_config()).state_dict()
    stream.close()


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_dev_config_has_spec_size(variant: str) -> None:
    model = _meta_model(flux_dev_config(variant))
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 11.90e9) <= 0.01e9
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == (504 if variant == "dev" else 502)
    assert model.config.guidance_embeds is (variant == "dev")
