"""The URAE nodes inside a real ComfyUI (skipped unless URAE_LITE_COMFYUI=/path/to/ComfyUI; runs on the CPU).

The tiny FLUX is written as a BFL single file and loaded by `comfy.sd.load_diffusion_model`. ComfyUI's detection
reads depths and in/out widths from the weights but fixes FLUX.1's hidden size, heads, text width and RoPE axes;
the `tiny_widths` fixture puts the tiny model's values there (nothing else of ComfyUI is replaced).
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from comfyui_env import BUILTIN_WIDGETS, comfyui_root, detect_tiny_flux, read_workflow, to_api_prompt, widget_names

U32 = 2.0**-24  # fp32 unit roundoff


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_flux, tiny_config):
    """ComfyUI imported on the CPU, with our nodes registered through the installed shim and model folders holding
    the tiny FLUX, synthetic URAE adapters and placeholder text encoders / VAE (names only, for validation)."""
    root = comfyui_root()
    import comfy.cli_args

    comfy.cli_args.args.fp32_vae = True
    import comfy.model_detection
    import folder_paths
    import nodes
    from bfl_files import write_bfl_file
    from synthetic_adapters import write_authors_2k, write_authors_4k

    from urae_lite.comfyui.install import NODE_FOLDER, SHIM

    base = tmp_path_factory.mktemp("comfyui")
    shim = base / "custom_nodes" / NODE_FOLDER / "__init__.py"
    shim.parent.mkdir(parents=True)
    shim.write_text(SHIM)  # what `urae-lite comfyui install` writes
    folders = {f: base / "models" / f for f in ("diffusion_models", "loras", "vae", "text_encoders")}
    for name, folder in folders.items():
        folder.mkdir(parents=True)
        folder_paths.add_model_folder_path(name, str(folder), is_default=True)
    unet = write_bfl_file(tiny_flux, folders["diffusion_models"] / "flux1-dev.safetensors")
    (folders["diffusion_models"] / "placeholder.safetensors").write_bytes(b"")  # unreadable: skipped by the lookup
    write_authors_2k(folders["loras"] / "urae_2k_adapter.safetensors", tiny_config)
    write_authors_4k(folders["loras"] / "urae_4k_adapter.safetensors", tiny_config)
    for folder, name in (("vae", "ae"), ("text_encoders", "clip_l"), ("text_encoders", "t5xxl_fp16")):
        (folders[folder] / f"{name}.safetensors").write_bytes(b"")
    folder_paths.filename_list_cache.clear()

    async def register():
        for extra in ("nodes_flux.py", "nodes_sd3.py"):  # FluxGuidance, EmptySD3LatentImage
            assert await nodes.load_custom_node(str(root / "comfy_extras" / extra), module_parent="comfy_extras")
        assert await nodes.load_custom_node(str(shim.parent))

    asyncio.run(register())
    with pytest.MonkeyPatch.context() as mp:
        detect_tiny_flux(mp, tiny_config)
        yield {"root": root, "unet": unet, "loras": folders["loras"], "nodes": nodes.NODE_CLASS_MAPPINGS}


@pytest.fixture(scope="module")
def flux(env):
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(env["unet"]), model_options={"dtype": torch.float32})


def _hires(env, model, preset="dev 2k", **switches):
    node = env["nodes"]["UraeHighResolution"]()
    args = {"ntk_rope": True, "proportional_attention": True, "static_shift": True, **switches}
    return node.patch(model, preset, 0.0, 0.0, **args)[0]


# ---- one transformer forward ---------------------------------------------------------------------------------------
def _inputs(config, h=12, w=16, text=7):
    g = torch.Generator().manual_seed(0)
    return {
        "latent": torch.randn(1, 16, 2 * h, 2 * w, generator=g),  # ComfyUI's (B, 16, H/8, W/8)
        "context": torch.randn(1, text, config["joint_attention_dim"], generator=g),
        "pooled": torch.randn(1, config["pooled_projection_dim"], generator=g),
        "sigma": torch.tensor([0.7]),
        "guidance": torch.tensor([3.5]),
    }


def _comfy_forward(model, x):
    import comfy.model_management as mm

    mm.load_models_gpu([model])  # applies the clone's object patches (RoPE embedder) to the shared module
    options = model.model_options.get("transformer_options", {}).copy()  # what the sampler passes each step
    out = model.model.diffusion_model(
        x["latent"], x["sigma"], x["context"], y=x["pooled"], guidance=x["guidance"], transformer_options=options
    )
    return out.detach()


def _ours_forward(tiny_flux, x, dtype, settings):
    """urae_lite's diffusers path: FluxTransformer2DModel + hires.set_ntk / set_proportional_attention."""
    from diffusers import FluxTransformer2DModel

    from urae_lite.hires import set_ntk, set_proportional_attention

    model = FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer").to(dtype).eval()
    set_ntk(model, settings.ntk)
    set_proportional_attention(model, settings.proportional_attention)
    b, c, hh, ww = x["latent"].shape
    h, w = hh // 2, ww // 2
    packed = x["latent"].view(b, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * 4)
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    with torch.no_grad():
        out = model(
            hidden_states=packed.to(dtype),
            encoder_hidden_states=x["context"].to(dtype),
            pooled_projections=x["pooled"].to(dtype),
            timestep=x["sigma"].to(dtype),
            img_ids=ids.reshape(h * w, 3),
            txt_ids=torch.zeros(x["context"].shape[1], 3),
            guidance=x["guidance"].to(dtype),
        ).sample
    return out.view(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)


def test_forward_with_the_node_equals_ours(env, flux, tiny_flux, tiny_config):
    from urae_lite.comfyui.settings import attention_multiplier, hires_settings

    x = _inputs(tiny_config)
    n_tokens = x["context"].shape[1] + x["latent"].shape[2] * x["latent"].shape[3] // 4
    assert abs(attention_multiplier(n_tokens) - 1) > 0.1  # 199 tokens: the proportional scale is 0.79 here
    settings = hires_settings("dev 2k")
    ref = _ours_forward(tiny_flux, x, torch.float64, settings).float()
    ours32 = _ours_forward(tiny_flux, x, torch.float32, settings)
    node = _comfy_forward(_hires(env, flux), x)
    plain = _comfy_forward(flux, x)
    # Bound: both fp32 forwards compute the float64 reference's function in another summation order (fused vs split
    # q/k/v, RoPE and time-embedding formulas, attention backend). fp32 roundings are independent across a sum, so a
    # dot product of n <= 128 terms (the MLP width) carries ~sqrt(n)·u ~ 7e-7 relative error; the tiny model chains
    # ~24 such products (4 blocks), ~sqrt(24)·7e-7 ~ 3.4e-6 of the output's scale; 1e-5·max|ref| leaves 3x for the
    # norms and softmax. A missing setting moves the output by a large multiple of that (checked at 20x).
    bound = 1e-5 * ref.abs().max().item()
    assert (ours32 - ref).abs().max().item() <= bound  # our own fp32 path meets the bound
    assert (node - ref).abs().max().item() <= bound
    assert (plain - ref).abs().max().item() > 20 * bound  # without the node: ComfyUI's θ = 1e4 and 1/√d
    for one in ("ntk_rope", "proportional_attention"):  # and each setting matters alone
        partial = _comfy_forward(_hires(env, flux, **{one: False}), x)
        assert (partial - ref).abs().max().item() > 20 * bound, one
    assert flux.get_model_object("diffusion_model.pe_embedder").theta == 10000  # the input MODEL is untouched
    assert "optimized_attention_override" not in flux.model_options.get("transformer_options", {})


# ---- sigmas -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["dev 2k", "dev 4k", "schnell 4k"])
def test_sampler_sigmas_are_the_static_shift_schedule(env, flux, preset):
    import comfy.samplers

    from urae_lite.comfyui.settings import preset_generation
    from urae_lite.timeshift import shifted_sigmas

    g = preset_generation(preset)
    patched = _hires(env, flux, preset)
    for steps in sorted({g.steps, 4, 28, 50}):
        sampler = comfy.samplers.KSampler(patched, steps, "cpu", sampler="euler", scheduler="simple", denoise=1.0)
        want = torch.tensor(shifted_sigmas(steps, g.shift), dtype=torch.float64)
        # the node's model sampling tabulates σ(t) at t = k/SIGMA_TABLE (277200, urae_lite/comfyui/settings.py) in
        # fp32 and the 'simple' scheduler picks t = 1 − i/N from it, exactly since these N divide 277200:
        # a few fp32 roundings of values <= 1
        torch.testing.assert_close(sampler.sigmas.double(), want, rtol=0, atol=8 * U32)
    plain = comfy.samplers.KSampler(flux, 28, "cpu", sampler="euler", scheduler="simple", denoise=1.0).sigmas
    assert (plain.double() - torch.tensor(shifted_sigmas(28, 3.0), dtype=torch.float64)).abs().max() > 1e-3


# ---- exact tiled VAE decode ---------------------------------------------------------------------------------------
def test_tiled_decode_node(env):
    import comfy.sd
    from diffusers import AutoencoderKL

    from urae_lite.flux_configs import FLUX_VAE_CONFIG
    from urae_lite.vae_tiling import decode

    torch.manual_seed(0)  # ComfyUI's VAE class builds FLUX's VAE widths, so the VAE here has them (random weights)
    vae_ref = AutoencoderKL(**FLUX_VAE_CONFIG).eval()
    vae = comfy.sd.VAE(sd=vae_ref.state_dict())  # ComfyUI converts diffusers -> LDM itself
    assert vae.vae_dtype == torch.float32
    latent = torch.randn(1, 16, 16, 2, generator=torch.Generator().manual_seed(1))  # 128 x 16 px: 2 strips of 64
    node = env["nodes"]["UraeTiledVAEDecode"]()
    tiled = node.decode({"samples": latent}, vae, 1)[0]  # 1 MiB: the exact strip decode
    auto = node.decode({"samples": latent}, vae, 0)[0]  # auto: the free memory (plain decode here)
    assert node.autoencoder(vae) is node.autoencoder(vae)  # converted once per VAE object
    plain = vae.decode(latent)  # ComfyUI's VAEDecode
    ours = torch.clamp((decode(vae_ref, latent, mode="on") + 1) / 2, 0, 1).movedim(1, -1)
    assert tiled.shape == plain.shape == (1, 128, 16, 3)
    # same code (vae_tiling) and same weights: only the LDM -> diffusers conversion could differ, and it is exact
    assert torch.equal(tiled, ours)
    # vs a plain decode: fp32 summation order only (strip-shaped convolutions, per-strip GroupNorm sums), ~1e-6
    # of values in [0, 1]; 1e-4 as for urae_lite's own tiled-decode tests
    assert (tiled - plain).abs().max().item() < 1e-4
    assert (auto - plain).abs().max().item() < 1e-4


# ---- 4K adapter ---------------------------------------------------------------------------------------------------
def test_4k_adapter_node_patches_convert_plus_lora(env, flux, tiny_flux):
    import comfy.model_management as mm
    from bfl_files import diffusers_to_bfl, transformer_state

    from urae_lite.adapter_cache import converted_4k
    from urae_lite.adapter_io import read_adapter
    from urae_lite.model_files import resolve_files

    node = env["nodes"]["Urae4KAdapter"]()
    patched = node.apply(flux, "urae_2k_adapter.safetensors", "urae_4k_adapter.safetensors", 1.0)[0]
    assert node.model_file(flux) == env["unet"]
    lora2k, lora4k = (read_adapter(env["loras"] / f"urae_{s}_adapter.safetensors") for s in ("2k", "4k"))
    cached = converted_4k(resolve_files(env["unet"]), lora2k, lora4k, progress=False)  # the CLI's cache entry
    assert cached.parent == env["loras"] and cached.name.endswith(".converted.safetensors")
    factors = read_adapter(cached).modules
    # reference in float64: W + scale·B·A per diffusers module, laid out by the test's own BFL writer
    state = {k: v.double() for k, v in transformer_state(tiny_flux).items()}
    magnitude = {k: v.abs() for k, v in state.items()}
    for name, f in factors.items():
        A, B = f.A.double(), f.B.double() * f.scale
        state[f"{name}.weight"] = state[f"{name}.weight"] + B @ A
        magnitude[f"{name}.weight"] = magnitude[f"{name}.weight"] + B.abs() @ A.abs()
    want, scale = diffusers_to_bfl(state), diffusers_to_bfl(magnitude)
    rank = max(f.rank for f in factors.values())
    mm.load_models_gpu([patched], force_full_load=True)
    got = {k: v.detach().double() for k, v in patched.model.diffusion_model.state_dict().items()}
    assert set(got) == set(want)
    for key, w in want.items():
        # ComfyUI adds up @ down in fp32 to the fp32 weight: <= rank products and one add, each u-relative to
        # |W| + |B||A| (the bf16 factors are exact in fp32 and float64)
        bound = (rank + 2) * U32 * scale[key]
        assert ((got[key] - w).abs() <= bound).all(), key
    mm.load_models_gpu([flux], force_full_load=True)
    base = dict(flux.model.diffusion_model.state_dict())
    assert not torch.equal(
        base["double_blocks.0.img_attn.qkv.weight"].double(), got["double_blocks.0.img_attn.qkv.weight"]
    )


def test_4k_adapter_without_the_model_file(env, flux):
    import comfy.sd

    from urae_lite.errors import UraeError

    sd = {k: v.clone() for k, v in flux.model.diffusion_model.state_dict().items()}
    sd["img_in.weight"] += 1  # a model no file in ComfyUI's folders holds
    other = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
    with pytest.raises(UraeError, match=r"urae-lite convert .* LoraLoaderModelOnly"):
        env["nodes"]["Urae4KAdapter"]().apply(other, "urae_2k_adapter.safetensors", "urae_4k_adapter.safetensors", 1)


# ---- workflows ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["urae_2k.json", "urae_4k.json"])
def test_workflows_pass_comfyui_validation(env, name):
    import execution

    classes = env["nodes"]
    for node, names in BUILTIN_WIDGETS.items():  # the pure tests' table is ComfyUI's widget order
        assert widget_names(classes[node].INPUT_TYPES()) == names, node
    workflow = read_workflow(name)
    widgets = {n["type"]: widget_names(classes[n["type"]].INPUT_TYPES()) for n in workflow["nodes"]}
    prompt = to_api_prompt(workflow, widgets)
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("urae-test", prompt, None))
    assert valid, (error, node_errors)
    assert node_errors == {} and outputs == ["12"]


def test_install_into_a_comfyui_copy(env, tmp_path):
    """`install` accepts a real ComfyUI folder layout (a copy of its top level; the checkout is not written)."""
    from urae_lite.comfyui.install import install, uninstall

    copy = tmp_path / "ComfyUI"
    copy.mkdir()
    for part in ("custom_nodes", "comfy"):
        (copy / part).mkdir()
    shutil.copy(env["root"] / "nodes.py", copy / "nodes.py")
    written = install(copy)
    assert copy / "custom_nodes" / "urae_lite" / "__init__.py" in written
    assert len(uninstall(copy)) == 3
