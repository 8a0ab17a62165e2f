"""`urae-lite generate` / `load_pipeline` on the tiny FLUX (CPU, small images): URAE's three inference changes
against their formulas, parity with plain diffusers, every adapter kind, the 4K conversion cache, offload modes,
coarse-to-fine, PNG metadata, bad input, and the demo."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from flux_reference import (
    PIXEL_TOL,
    folder_transformer_state,
    latent_tolerance,
    merge_lora_file,
    reference_image,
    static_sigmas,
    unpack_with_transposed_patches,
)
from PIL import Image
from safetensors.torch import load_file, save_file

import urae_lite
from urae_lite import adapter_cache
from urae_lite.adapted_linear import AdaptedLinear
from urae_lite.adapter_io import LoraFactors, read_adapter, save_adapter
from urae_lite.cli import main
from urae_lite.errors import UraeError
from urae_lite.hires import ProportionalAttnProcessor, attention_scale, set_ntk
from urae_lite.loader import empty_transformer, fused_like_authors
from urae_lite.minor import minor_components
from urae_lite.model_files import resolve_files
from urae_lite.pipeline import UraePipeline
from urae_lite.presets import GenerationSettings, load_preset, preset_memory
from urae_lite.refine import coarse_size
from urae_lite.targets import adapter_target_names

CPU = dict(device="cpu", dtype=torch.float32, progress=False)
SMALL = dict(width=64, height=64, steps=2)


def _lora_factors(
    names: list[str], shapes: dict[str, tuple[int, int]], rank: int, seed: int, scale: float = 1.0
) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: LoraFactors(
            torch.randn(rank, shapes[n][1], generator=g) * 0.1,
            torch.randn(shapes[n][0], rank, generator=g) * 0.1,
            scale,
        )
        for n in names
    }


@pytest.fixture(scope="module")
def shapes(tiny_config) -> dict[str, tuple[int, int]]:
    """(out, in) of every block linear of the tiny transformer."""
    model = empty_transformer(tiny_config)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


@pytest.fixture(scope="module")
def authors_targets(tiny_config) -> list[str]:
    return adapter_target_names(empty_transformer(tiny_config))


@pytest.fixture(scope="module")
def our_lora(tmp_path_factory, shapes, authors_targets):
    """Our LoRA format (diffusers keys, alpha where scale != 1) on the authors' targets."""
    path = tmp_path_factory.mktemp("lora") / "ours.safetensors"
    return save_adapter(_lora_factors(authors_targets, shapes, rank=4, seed=1, scale=0.5), path)


@pytest.fixture(scope="module")
def pipe(tiny_flux, our_lora) -> UraePipeline:
    return urae_lite.load_pipeline(tiny_flux, memory={"quant": "nf4"}, adapters=[our_lora], **CPU, **SMALL)


# ---- the three inference changes ------------------------------------------------------------------------------
def test_attention_multipliers_match_the_paper():
    for n, mult in ((512 + 4096, 1.000), (512 + 16384, 1.0743), (512 + 65536, 1.1470)):
        assert round(attention_scale(n, 128) * math.sqrt(128), 4) == mult


def test_sdpa_sees_the_proportional_scale(pipe, monkeypatch):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        query = kwargs["query"] if "query" in kwargs else args[0]  # native backend: (B, heads, N, D)
        if query.shape[1] == cfg.num_attention_heads and query.shape[3] == cfg.attention_head_dim:  # not CLIP/T5/VAE
            seen.append((query.shape[2], kwargs.get("scale")))
        return sdpa(*args, **kwargs)

    cfg = pipe.transformer.config
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    pipe("a cat", seed=0, max_sequence_length=32)
    n = 32 + (64 // 16) ** 2  # text + image tokens
    assert len(seen) == 2 * (cfg.num_layers + cfg.num_single_layers)  # every block, every step
    assert all(
        tokens == n and scale == pytest.approx(math.sqrt(math.log(n) / math.log(4608)) / 4) for tokens, scale in seen
    )  # head_dim 16
    seen.clear()
    pipe("a cat", seed=0, max_sequence_length=32, proportional_attention=False)
    assert seen and all(scale is None for _, scale in seen)


def test_processor_equals_diffusers_when_the_multiplier_is_one(pipe, tiny_config, make_inputs):
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in make_inputs(tiny_config).items()}
    n = inputs["encoder_hidden_states"].shape[1] + inputs["hidden_states"].shape[1]
    model = pipe.transformer
    with torch.no_grad():
        model.set_attn_processor(FluxAttnProcessor())
        stock = model(**inputs).sample
        model.set_attn_processor(ProportionalAttnProcessor(base_tokens=n))
        ours = model(**inputs).sample
        model.set_attn_processor(ProportionalAttnProcessor())
        scaled = model(**inputs).sample
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scaled, stock, atol=1e-3)


def test_ntk_sets_the_rope_base(pipe):
    pipe("a cat", seed=0, max_sequence_length=32, ntk=10.0)
    pos = pipe.transformer.pos_embed
    assert pos.theta == 100000.0
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(5.0), torch.arange(7.0), indexing="ij"), -1)
    ids = ids.reshape(-1, 3)
    cos, sin = pos(ids)
    expected = []
    for axis, dim in enumerate(pos.axes_dim):  # angle = position / theta^(2i/dim), each frequency twice
        freqs = 1.0 / 100000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        expected.append((ids[:, axis, None].double() * freqs).repeat_interleave(2, dim=1))
    angles = torch.cat(expected, 1)
    torch.testing.assert_close(cos.double(), angles.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), angles.sin(), atol=1e-6, rtol=0)
    set_ntk(pipe.transformer, 1.0)
    assert pos.theta == 10000.0


@pytest.mark.parametrize("shift,steps", [(3.0, 4), (1.7, 3)])
def test_static_time_shift_schedule(pipe, shift, steps):
    pipe("a cat", seed=0, max_sequence_length=32, shift=shift, steps=steps)
    sched = pipe.flux.scheduler
    assert sched.config.use_dynamic_shifting is False
    sigma = np.linspace(1.0, 1.0 / steps, steps)
    expected = shift * sigma / (1 + (shift - 1) * sigma)
    np.testing.assert_allclose(sched.sigmas[:-1].numpy(), expected, rtol=0, atol=1e-6)
    pipe("a cat", seed=0, max_sequence_length=32, shift=None, steps=steps)
    assert pipe.flux.scheduler.config.use_dynamic_shifting is True  # the model's own scheduler again


def test_matches_plain_diffusers_with_urae_switched_off(tiny_flux):
    """ntk 1, stock attention, the scheduler's own (dynamic) shift, bf16 base: the same image as FluxPipeline.

    Measured: identical pixels. Tolerance 1/255 (one 8-bit level) for BLAS summation-order differences between
    our base linear (matmul, then bias) and nn.Linear (fused addmm)."""
    settings = dict(
        width=128,
        height=96,
        steps=3,
        guidance=3.5,
        ntk=1.0,
        proportional_attention=False,
        shift=None,
        max_sequence_length=64,
    )
    ours = urae_lite.load_pipeline(tiny_flux, memory={"quant": "bf16", "vae_tiling": "off"}, **CPU, **settings)(
        "a red fox in the snow", seed=3
    ).image
    ref = FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(
        "a red fox in the snow",
        width=128,
        height=96,
        num_inference_steps=3,
        guidance_scale=3.5,
        max_sequence_length=64,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
    assert ours.size == theirs.size == (128, 96) and diff.max() <= 1


# ---- adapters -------------------------------------------------------------------------------------------------
def _authors_files(folder, shapes, targets, rank=4):
    """Synthetic authors' 2K (peft keys, bf16, no alpha) and 4K (processor keys, no prefix) files."""
    two = _lora_factors(targets, shapes, rank, seed=2)
    four = _lora_factors(targets, shapes, rank, seed=3)
    sd2 = {}
    for n, f in two.items():
        sd2[f"transformer.{n}.lora_A.weight"] = f.A.bfloat16()
        sd2[f"transformer.{n}.lora_B.weight"] = f.B.bfloat16()
    sd4 = {}
    for n, f in four.items():
        block, proj = n.split(".attn.")
        proj = "out" if proj == "to_out.0" else proj[3:]
        sd4[f"{block}.attn.processor.to_{proj}_a.weight"] = f.A.bfloat16()
        sd4[f"{block}.attn.processor.to_{proj}_b.weight"] = f.B.bfloat16()
    save_file(sd2, folder / "urae_2k_adapter.safetensors")
    save_file(sd4, folder / "urae_4k_adapter.safetensors")
    return folder / "urae_2k_adapter.safetensors", folder / "urae_4k_adapter.safetensors"


def _kohya_file(path, rank=4, alpha=2.0):
    """kohya/sd-scripts keys (BFL layout, fused img qkv): diffusers' converter splits them into to_q/k/v."""
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(rank, 32, generator=g), torch.randn(96, rank, generator=g) * 0.1
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(alpha),
        },
        path,
    )
    return path, (alpha / rank) * up[:32] @ down  # the to_q update


def test_every_adapter_kind_loads_and_the_4k_conversion_is_cached(
    tiny_flux, tmp_path, shapes, authors_targets, our_lora, monkeypatch
):
    two, four = _authors_files(tmp_path, shapes, authors_targets)
    kohya, kohya_q = _kohya_file(tmp_path / "style_kohya.safetensors")
    p = urae_lite.load_pipeline(
        tiny_flux, memory={"quant": "nf4"}, adapters=[our_lora, two, four, kohya], **CPU, **SMALL
    )
    cached = list(tmp_path.glob("urae_4k_adapter.*.converted.safetensors"))
    assert len(cached) == 1

    q = p.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    assert list(q.slices) == ["adapter0", "adapter1", "adapter2"]  # ours, 2K+4K converted, kohya
    assert [s.rank for s in q.slices.values()] == [4, 3 * 4, 4]
    ours = read_adapter(our_lora).modules["transformer_blocks.0.attn.to_q"]
    assert ours.scale == q.slices["adapter0"].scale == 0.5
    torch.testing.assert_close(q.slices["adapter0"].delta(), ours.delta(), rtol=0, atol=1e-6)
    torch.testing.assert_close(q.slices["adapter2"].delta(), kohya_q, rtol=0, atol=1e-5)

    # the converted slice is B2·A2 − B0·A0 + B'·A' (the authors' effective weight minus W0), B0·A0 from the SVD
    w0 = load_file(str(tiny_flux / "transformer" / "diffusion_pytorch_model.safetensors"))[
        "transformer_blocks.0.attn.to_q.weight"
    ]
    sd2, sd4 = load_file(str(two)), load_file(str(four))
    A2 = sd2["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].float()
    B2 = sd2["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].float()
    A4 = sd4["transformer_blocks.0.attn.processor.to_q_a.weight"].float()
    B4 = sd4["transformer_blocks.0.attn.processor.to_q_b.weight"].float()
    B0, A0 = minor_components(fused_like_authors(w0.float() + B2 @ A2, w0.dtype), 4)
    expected = B2 @ A2 - B0 @ A0 + B4 @ A4
    got = q.slices["adapter1"].delta()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2  # bf16 storage of the converted factors
    assert p("a cat", seed=0).image.size == (64, 64)

    # second use: the cached file is found by content and nothing is converted again
    mtime = cached[0].stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the 4K adapter was converted again")

    monkeypatch.setattr(adapter_cache, "convert_urae_4k", no_conversion)
    again = adapter_cache.resolve_adapters(resolve_files(tiny_flux), [two, four], progress=False)
    assert len(again) == 1 and again[0].path == str(cached[0]) and cached[0].stat().st_mtime_ns == mtime


def test_conversion_cache_key_follows_the_contents(tiny_flux, tmp_path, shapes, authors_targets):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    two, four = map(read_adapter, _authors_files(tmp_path / "a", shapes, authors_targets))
    other_two, _ = map(read_adapter, _authors_files(tmp_path / "b", shapes, authors_targets, rank=2))
    base = resolve_files(tiny_flux).full_precision
    key = adapter_cache.cache_key(base, two, four)
    assert adapter_cache.cache_key(base, two, four) == key != adapter_cache.cache_key(base, other_two, four)


def test_4k_adapter_needs_its_2k_adapter_first(tiny_flux, tmp_path, shapes, authors_targets):
    _, four = _authors_files(tmp_path, shapes, authors_targets)
    with pytest.raises(UraeError, match="2K adapter"):
        adapter_cache.resolve_adapters(resolve_files(tiny_flux), [four], progress=False)


# ---- offload, refine, output ----------------------------------------------------------------------------------
def test_offload_modes_give_the_same_image_on_cpu(tiny_flux, our_lora, pipe):
    """The hooks of each mode run with our AdaptedLinear (execution device = CPU here); CUDA-only parts (streams,
    memory savings) are in test_offload_modes_on_cuda."""
    ref = np.asarray(pipe("a cat", seed=5).image)
    for mode in ("model", "group", "sequential"):
        p = urae_lite.load_pipeline(
            tiny_flux, memory={"quant": "nf4", "offload": mode}, adapters=[our_lora], **CPU, **SMALL
        )
        assert np.array_equal(np.asarray(p("a cat", seed=5).image), ref), mode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="group offloading streams and GPU memory need CUDA")
def test_offload_modes_on_cuda(tiny_flux, our_lora):
    images, peaks = {}, {}
    for mode in ("none", "model", "group", "sequential"):
        p = urae_lite.load_pipeline(
            tiny_flux,
            memory={"quant": "nf4", "offload": mode},
            adapters=[our_lora],
            device="cuda",
            progress=False,
            width=256,
            height=256,
            steps=2,
        )
        torch.cuda.reset_peak_memory_stats()
        images[mode] = np.asarray(p("a cat", seed=5).image, dtype=np.int16)
        peaks[mode] = torch.cuda.max_memory_allocated()
        if mode != "none":  # nothing of the transformer stays on the GPU between calls
            assert all(t.device.type in ("cpu", "meta") for t in p.transformer.state_dict().values()), mode
        del p
    for mode in ("model", "group", "sequential"):
        assert np.abs(images[mode] - images["none"]).max() <= 2, mode
    assert peaks["sequential"] <= peaks["none"]


def test_refine_from_makes_the_target_size_with_a_plain_base_coarse_pass(pipe):
    q = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    slices_seen = []
    handle = q.register_forward_pre_hook(lambda m, args: slices_seen.append((args[0].shape[1], len(m.slices))))
    try:
        result = pipe("a cat", seed=0, width=128, height=96, refine_from=64, strength=0.5, steps=4)
    finally:
        handle.remove()
    assert result.image.size == (128, 96)
    cw, ch = coarse_size(128, 96, 64)
    coarse = [n for tokens, n in slices_seen if tokens == cw * ch // 256]
    fine = [n for tokens, n in slices_seen if tokens == 128 * 96 // 256]
    assert coarse and set(coarse) == {0}  # base model only
    assert len(fine) == 2 and set(fine) == {1}  # strength 0.5 of 4 steps, with the adapter
    assert coarse_size(2048, 2048, 1024) == (1024, 1024) and coarse_size(4096, 2048, 1024) == (1456, 720)


def test_png_carries_prompt_seed_model_adapters_and_settings(pipe, tmp_path, our_lora):
    result = pipe("a red fox", seed=7, ntk=4.0)
    path = result.save(tmp_path / "out" / "fox.png")
    image = Image.open(path)
    assert image.size == (64, 64)
    text = image.text
    assert text["prompt"] == "a red fox" and text["seed"] == "7" and text["quant"] == "nf4"
    assert text["model"] == str(pipe.model)
    assert json.loads(text["adapters"])[0]["path"] == str(our_lora)
    settings = json.loads(text["settings"])
    assert settings["ntk"] == 4.0 and settings["width"] == 64 and settings["shift"] == 3.0
    assert json.loads(text["urae_lite"])["settings"] == settings
    assert GenerationSettings(**settings) == result.settings  # enough to make the image again


# ---- presets and bad input ------------------------------------------------------------------------------------
def test_presets_hold_the_authors_defaults():
    dev2, dev4 = load_preset("2k", "dev"), load_preset("4k", "dev")
    assert (dev2.width, dev2.steps, dev2.guidance, dev2.shift, dev2.ntk, dev2.max_sequence_length) == (
        2048,
        28,
        3.5,
        3.0,
        10.0,
        512,
    )
    assert dev2.proportional_attention and (dev4.width, dev4.height) == (4096, 4096)
    assert preset_memory("4k", "dev").vae_tiling == "on" and preset_memory("2k", "dev").vae_tiling == "auto"
    s2, s4 = load_preset("2k", "schnell"), load_preset("4k", "schnell")
    assert (s2.steps, s2.shift, s2.max_sequence_length, s4.width) == (4, 1.0, 256, 4096)


def test_presets_take_key_value_overrides_like_recipes(tmp_path):
    """One config system: `key=value` with YAML values, coerced to the field types; a typo names the known keys."""
    s = load_preset("4k", "dev", ["steps=12", "ntk=5", "shift=null", "proportional_attention=false"])
    assert (s.steps, s.ntk, s.shift, s.proportional_attention, s.width) == (12, 5.0, None, False, 4096)
    assert isinstance(s.ntk, float)
    with pytest.raises(UraeError, match="unknown setting 'stepz' .*known in this section: .*steps"):
        load_preset("2k", "dev", ["stepz=3"])
    with pytest.raises(UraeError, match="not key=value"):
        load_preset("2k", "dev", ["steps"])
    custom = tmp_path / "mine.yaml"
    custom.write_text("width: 128\nheight: 64\nsteps: 3\nprofiles:\n  8: {quant: nf4}\n")
    assert load_preset(custom, "dev", ["height=96"]).height == 96  # profiles are not settings
    with pytest.raises(UraeError, match="steps must be a number"):
        load_preset(custom, "dev", ["steps=many"])


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main(["generate", "a cat", *map(str, argv)])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "argv,message",
    [
        (("--width", 1000, "--height", 64), "width 1000 is not a positive multiple of 16: use 992 or 1008"),
        (("--width", 64, "--height", 70), "height 70 is not a positive multiple of 16: use 64 or 80"),
        (("--preset", "8k"), "unknown preset '8k'"),
        (("--width", 64, "--height", 64, "--refine-from", 128), "is not smaller than the target"),
        (("--offload", "none", "--vae-tiling", "on", "--strength", 1.5), "strength must be in (0, 1]"),
    ],
)
def test_bad_settings_exit_2_with_one_line(capsys, tiny_flux, argv, message):
    code, err = _cli(capsys, "--model", tiny_flux, "--device", "cpu", *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("urae-lite: error:") and message in err[0]


def test_missing_model_and_mismatched_adapter_exit_2(capsys, tiny_flux, tmp_path):
    code, err = _cli(capsys, "--model", tmp_path / "no_such_model", "--device", "cpu")
    assert code == 2 and len(err) == 1 and "model not found" in err[0]
    wrong = save_adapter(
        {"transformer_blocks.0.attn.to_q": LoraFactors(torch.zeros(4, 48), torch.zeros(48, 4))},
        tmp_path / "sdxl_like.safetensors",
    )
    code, err = _cli(capsys, "--model", tiny_flux, "--device", "cpu", "--adapter", wrong, "--width", 64, "--height", 64)
    assert code == 2 and len(err) == 1 and "does not match the base" in err[0]


def test_cuda_out_of_memory_is_caught_with_advice(capsys, tiny_flux, tmp_path, monkeypatch):
    """A stage that keeps running out of memory: the run re-plans (lighter exact settings, said on stdout), and once
    nothing lighter is left it stops with one line of advice (what would change the image: the base format, the
    size), no traceback, no image."""

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(UraePipeline, "denoise", oom)
    code, err = _cli(
        capsys,
        "--model",
        tiny_flux,
        "--device",
        "cpu",
        "--offload",
        "none",
        "--quant",
        "bf16",
        "--width",
        64,
        "--height",
        64,
        "--out",
        tmp_path / "x.png",
    )
    errors = [line for line in err if "error" in line.lower()]  # earlier stderr lines are the loading progress bars
    assert code == 2 and errors == [err[-1]] and not any("Traceback" in line for line in err)
    assert "out of memory in stage 'denoise'" in err[-1] and "--quant nf4" in err[-1]
    tips = err[-1].split("try:")[1]
    assert "--offload" not in tips and "--token-chunks" not in tips  # those were tried: the re-plan before
    assert not (tmp_path / "x.png").exists()


def test_cli_generate_writes_the_png_and_report(capsys, tiny_flux, tmp_path, our_lora):
    out = tmp_path / "cli.png"
    code = main(
        [
            "generate",
            "a cat",
            "steps=1",
            "ntk=4",
            "--model",
            str(tiny_flux),
            "--device",
            "cpu",
            "--adapter",
            str(our_lora),
            "--width",
            "64",
            "--height",
            "48",
            "--steps",
            "2",
            "--shift",
            "model",
            "--seed",
            "3",
            "--no-proportional-attention",
            "--out",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0 and Image.open(out).size == (64, 48)
    settings = json.loads(Image.open(out).text["settings"])
    assert settings["shift"] is None and settings["proportional_attention"] is False
    assert settings["steps"] == 2 and settings["ntk"] == 4.0  # key=value overrides the preset, options win
    assert "denoise" in stdout and "peak rss" in stdout


# ---- against a float64 reference sampler (tests/flux_reference.py) -------------------------------------------
HIRES = dict(
    width=128,  # not square: rows and columns cannot be confused
    height=96,
    steps=2,
    guidance=3.5,
    shift=3.0,
    ntk=10.0,
    proportional_attention=True,  # 64 + 48 tokens: multiplier 0.75
    max_sequence_length=64,
)
HIRES_MEMORY = {"vae_tiling": "on", "vae_strip_rows": 4}


def _effective_state(transformer) -> dict[str, torch.Tensor]:
    """The weights our transformer computes with, as a plain diffusers state dict in float64: each adapted linear's
    dequantized base plus Σ scale·B·A of its slices."""
    adapted = {n: m for n, m in transformer.named_modules() if isinstance(m, AdaptedLinear)}
    inside = tuple(f"{n}." for n in adapted)  # their state is the quantized buffers and the slices: rebuilt below
    state = {k: v.double() for k, v in transformer.state_dict().items() if not k.startswith(inside)}
    for name, m in adapted.items():
        w = m.base.dequantize().double()
        for s in m.slices.values():
            w += s.scale * s.B.double() @ s.A.double()
        state[f"{name}.weight"] = w
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.double()
    return state


def _generate_with_latents(pipe: UraePipeline, monkeypatch, prompt: str, seed: int):
    """One `pipe(prompt, seed)` call; returns its packed latents (spied on `denoise`) and its pixels, float64."""
    seen = []
    denoise = UraePipeline.denoise

    def spy(self, *args, **kwargs):
        seen.append(denoise(self, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(UraePipeline, "denoise", spy)
    image = pipe(prompt, seed=seed).image
    (latents,) = seen
    return latents.double(), np.asarray(image, dtype=np.float64) / 255


def _reference_errors(latents, image, reference) -> tuple[float, float]:
    """(max |latents − reference| relative to max |reference|, max |pixel − reference| in [0, 1] units less the
    PNG's rounding to 1/255: the pixel is round(255·value), so at most 0.5/255 from its value)."""
    ref_latents, ref_image = reference
    assert latents.shape == ref_latents.shape and image.shape == ref_image.shape
    latent_error = ((latents - ref_latents).abs().max() / ref_latents.abs().max()).item()
    return latent_error, float(np.abs(image - ref_image).max() - 0.5 / 255)


@pytest.fixture(scope="module")
def hires(tiny_flux, tmp_path_factory, shapes, authors_targets):
    """A bf16 base with a strong LoRA (factors std 0.3, scale 0.5: the update is about half the weights' size), and
    the reference: the folder's weights with that file's LoRA merged in float64, URAE's settings from formulas."""
    strong = {
        n: LoraFactors(f.A * 3, f.B * 3, f.scale) for n, f in _lora_factors(authors_targets, shapes, 4, 6, 0.5).items()
    }
    lora = save_adapter(strong, tmp_path_factory.mktemp("strong") / "strong.safetensors")
    pipe = urae_lite.load_pipeline(tiny_flux, memory={"quant": "bf16", **HIRES_MEMORY}, adapters=[lora], **CPU, **HIRES)
    reference = reference_image(
        tiny_flux,
        "a red fox",
        width=128,
        height=96,
        steps=2,
        seed=3,
        guidance=3.5,
        max_sequence_length=64,
        sigmas=static_sigmas(2, 3.0),
        ntk=10.0,
        proportional_attention=True,
        transformer_state=merge_lora_file(folder_transformer_state(tiny_flux), lora),
    )
    return pipe, reference


def _inject(fault: str, monkeypatch) -> None:
    import urae_lite.pipeline as pipeline_module

    if fault == "layout":  # the decoder reads each 2x2 latent patch transposed
        monkeypatch.setattr(FluxPipeline, "_unpack_latents", staticmethod(unpack_with_transposed_patches))
    elif fault == "shift":  # the static shift s−1 for s
        real = pipeline_module.static_shift_scheduler
        monkeypatch.setattr(pipeline_module, "static_shift_scheduler", lambda sched, s: real(sched, s - 1))
    elif fault == "no_adapter":  # the adapter slices are not applied
        monkeypatch.setattr(AdaptedLinear, "branch", lambda self, dtype=None: None)
    elif fault == "ntk":  # RoPE base left at 10000
        monkeypatch.setattr(pipeline_module, "set_ntk", lambda transformer, factor: set_ntk(transformer, 1.0))
    elif fault == "attention":  # the stock softmax scale
        real_attention = pipeline_module.set_proportional_attention
        monkeypatch.setattr(
            pipeline_module, "set_proportional_attention", lambda transformer, on: real_attention(transformer, False)
        )


@pytest.mark.parametrize("fault", [None, "layout", "shift", "no_adapter", "ntk", "attention"])
def test_hires_generation_matches_a_float64_reference(hires, monkeypatch, fault):
    """URAE's generation (bf16 base + LoRA, static shift, NTK RoPE, proportional attention, tiled VAE) is FLUX's
    definition evaluated in float64 (tests/flux_reference.py) up to fp32 rounding, in latents and in pixels; each
    injected fault lands far outside those bounds."""
    pipe, reference = hires
    if fault is not None:
        _inject(fault, monkeypatch)
    latents, image = _generate_with_latents(pipe, monkeypatch, "a red fox", 3)
    assert image.shape == (96, 128, 3)
    latent_error, pixel_error = _reference_errors(latents, image, reference)
    tolerance = latent_tolerance(HIRES["steps"], 64 + (128 // 16) * (96 // 16))
    if fault is None:
        assert latent_error <= tolerance and pixel_error <= PIXEL_TOL, (latent_error, pixel_error)
    else:
        assert latent_error > 10 * tolerance or pixel_error > 10 * PIXEL_TOL, (latent_error, pixel_error)


def test_demo_runs_at_high_resolution(tmp_path, capsys, monkeypatch):
    """The README's main command on the tiny model (1024² here to keep the suite fast; the default is 2048²), and
    its image against the float64 reference sampler on the weights the demo computes with (its NF4 base
    dequantized, its adapter merged). The demo's minor-component adapter starts as (B0, A0) beside the frozen
    (−B0, A0), a zero update by design, so dropping it changes nothing here: the LoRA of
    test_hires_generation_matches_a_float64_reference shows that fault; layout and shift faults show here too."""
    import urae_lite.pipeline as pipeline_module
    from urae_lite.demo import DEMO_PROMPT, run_demo
    from urae_lite.tiny import tiny_flux_path

    pipes = []
    load = pipeline_module.load_pipeline

    def keep(*args, **kwargs):
        pipes.append(load(*args, **kwargs))
        return pipes[-1]

    monkeypatch.setattr(pipeline_module, "load_pipeline", keep)
    latents = []
    denoise = UraePipeline.denoise
    monkeypatch.setattr(
        UraePipeline, "denoise", lambda self, *a, **k: latents.append(denoise(self, *a, **k)) or latents[-1]
    )
    path = run_demo(out=tmp_path / "demo.png", size=1024, progress=False)  # the demo's own 2 steps
    image = Image.open(path)
    assert image.size == (1024, 1024)
    settings = json.loads(image.text["settings"])
    assert (
        json.loads(image.text["memory"])["vae_tiling"] == "on"
        and settings["ntk"] == 10.0
        and settings["proportional_attention"]
    )
    out = capsys.readouterr().out
    assert "vae decode" in out and "peak rss" in out

    (pipe,) = pipes
    reference = reference_image(  # the 2k dev preset: guidance 3.5, shift 3, 512 T5 tokens (test_presets_hold_...)
        tiny_flux_path("dev"),
        DEMO_PROMPT,
        width=1024,
        height=1024,
        steps=2,
        seed=0,
        guidance=3.5,
        max_sequence_length=512,
        sigmas=static_sigmas(2, 3.0),
        ntk=10.0,
        proportional_attention=True,
        transformer_state=_effective_state(pipe.transformer),
        vae_dtype=torch.float32,
    )
    (packed,) = latents
    latent_error, pixel_error = _reference_errors(packed.double(), np.asarray(image, dtype=np.float64) / 255, reference)
    assert latent_error <= latent_tolerance(2, 512 + 64 * 64) and pixel_error <= PIXEL_TOL, (latent_error, pixel_error)
