"""The ComfyUI node pack's pure parts (no ComfyUI needed): settings vs the presets, the attention override, the
static shift in ComfyUI's parametrisation, the LDM -> diffusers VAE conversion, the model-file lookup, install."""

from __future__ import annotations

import math
import runpy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from comfyui_env import BUILTIN_WIDGETS, our_widgets, read_workflow, to_api_prompt

from urae_lite.cli import main
from urae_lite.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from urae_lite.comfyui.install import MARKER, install, uninstall, workflow_files
from urae_lite.comfyui.patches import OVERRIDE_KEY, ProportionalAttention, find_model_file, with_proportional_attention
from urae_lite.comfyui.settings import (
    PRESET_CHOICES,
    attention_multiplier,
    flux_sampling_mu,
    hires_settings,
    preset_generation,
    rope_theta,
)
from urae_lite.comfyui.vae_convert import diffusers_vae_config, ldm_to_autoencoder
from urae_lite.errors import UraeError
from urae_lite.hires import attention_scale, set_ntk
from urae_lite.presets import load_preset
from urae_lite.timeshift import static_shift

WORKFLOWS = {"urae_2k.json": ("2k", "LoraLoaderModelOnly"), "urae_4k.json": ("4k", "Urae4KAdapter")}


# ---- workflows = `urae-lite generate --preset` -----------------------------------------------------------------------
def _by_class(prompt: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for node in prompt.values():
        out.setdefault(node["class_type"], []).append(node["inputs"])
    return out


def _upstream(prompt: dict, node_id: str, name: str) -> tuple[str, dict]:
    origin = prompt[node_id]["inputs"][name][0]
    return origin, prompt[origin]


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_settings_match_the_preset(name):
    preset, adapter_node = WORKFLOWS[name]
    prompt = to_api_prompt(read_workflow(name), {**BUILTIN_WIDGETS, **our_widgets()})
    nodes = _by_class(prompt)
    (hires,) = nodes["UraeHighResolution"]
    variant = hires["preset"].split()[0]
    g = load_preset(preset, variant)
    assert hires["preset"] == f"{variant} {preset}"
    s = hires_settings(
        hires["preset"],
        hires["ntk"],
        hires["shift"],
        hires["ntk_rope"],
        hires["proportional_attention"],
        hires["static_shift"],
    )
    assert (s.ntk, s.proportional_attention, s.shift) == (g.ntk, g.proportional_attention, g.shift)
    (latent,) = nodes["EmptySD3LatentImage"]
    assert (latent["width"], latent["height"], latent["batch_size"]) == (g.width, g.height, 1)
    (sampler,) = nodes["KSampler"]
    # Euler on the 'simple' schedule is diffusers' FlowMatchEuler on linspace(1, 1/N, N) (test_comfyui_glue);
    # cfg 1 = one pass, FLUX.1-dev's guidance is the distilled input below
    assert (sampler["steps"], sampler["sampler_name"], sampler["scheduler"]) == (g.steps, "euler", "simple")
    assert (sampler["cfg"], sampler["denoise"]) == (1.0, 1.0)
    (guidance,) = nodes["FluxGuidance"]
    assert guidance["guidance"] == g.guidance
    # the wiring: loader -> adapter -> URAE high-resolution -> KSampler -> URAE decode -> SaveImage
    ks_id = next(i for i, n in prompt.items() if n["class_type"] == "KSampler")
    hires_id, hires_node = _upstream(prompt, ks_id, "model")
    assert hires_node["class_type"] == "UraeHighResolution"
    adapter_id, adapter = _upstream(prompt, hires_id, "model")
    assert adapter["class_type"] == adapter_node
    assert _upstream(prompt, adapter_id, "model")[1]["class_type"] == "UNETLoader"
    assert _upstream(prompt, ks_id, "positive")[1]["class_type"] == "FluxGuidance"
    dec_id = next(i for i, n in prompt.items() if n["class_type"] == "UraeTiledVAEDecode")
    assert _upstream(prompt, dec_id, "samples")[0] == ks_id
    save = next(n for n in prompt.values() if n["class_type"] == "SaveImage")
    assert save["inputs"]["images"][0] == dec_id


def test_node_conventions():
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    for cls in NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "URAE" and callable(getattr(cls, cls.FUNCTION))
        for name, spec in cls.INPUT_TYPES()["required"].items():
            assert spec[1].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"


# ---- settings -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", [c for c in PRESET_CHOICES if c != "custom"])
def test_hires_settings_follow_the_preset(choice):
    variant, preset = choice.split()
    g = load_preset(preset, variant)
    assert preset_generation(choice) == g
    s = hires_settings(choice)
    assert (s.ntk, s.proportional_attention, s.shift) == (g.ntk, g.proportional_attention, g.shift)
    assert hires_settings(choice, ntk=2.0, shift=5.0).ntk == 2.0
    assert hires_settings(choice, ntk=2.0, shift=5.0).shift == 5.0
    off = hires_settings(choice, rope=False, proportional_attention=False, static_shift=False)
    assert (off.ntk, off.theta, off.proportional_attention, off.shift) == (None, None, False, None)


def test_hires_settings_errors():
    with pytest.raises(UraeError, match="custom"):
        hires_settings("custom")
    assert hires_settings("custom", ntk=4.0, shift=2.0).theta == rope_theta(4.0)
    with pytest.raises(UraeError, match="unknown URAE preset"):
        hires_settings("dev 8k")


def test_rope_theta_is_what_set_ntk_sets():
    holder = SimpleNamespace(pos_embed=SimpleNamespace(theta=None))
    for ntk in (1.0, 10.0, 2.5):
        set_ntk(holder, ntk)
        assert rope_theta(ntk) == holder.pos_embed.theta


def test_static_shift_in_comfyui_parametrisation():
    """ModelSamplingFlux computes σ = e^μ / (e^μ + (1/t − 1)) (comfy/model_sampling.py flux_time_shift with σ=1);
    with μ = ln(s) that must be URAE's static shift. float64: the two forms differ by a few ulp."""
    for s in (1.0, 3.0, 0.5, 7.25):
        mu = flux_sampling_mu(s)
        for t in torch.linspace(1e-4, 1, 97, dtype=torch.float64).tolist():
            comfy_sigma = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
            assert comfy_sigma == pytest.approx(static_shift(t, s), rel=1e-13, abs=1e-15)
    with pytest.raises(UraeError):
        flux_sampling_mu(0.0)


# ---- proportional attention ------------------------------------------------------------------------------------------
def _sdpa(q, k, v, heads, mask=None, skip_reshape=False, **_):
    """ComfyUI's attention function contract: plain 1/√d softmax scale."""
    if not skip_reshape:
        b, n, _ = q.shape
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out if skip_reshape else out.transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])


@pytest.mark.parametrize("skip_reshape", [True, False])
@pytest.mark.parametrize("n_tokens", [37, 700])
def test_attention_override_scale(skip_reshape, n_tokens):
    g = torch.Generator().manual_seed(0)
    b, heads, d = 1, 2, 8
    q, k, v = (torch.randn(b, heads, n_tokens, d, generator=g, dtype=torch.float64) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, scale=attention_scale(n_tokens, d))
    args = (q, k, v) if skip_reshape else tuple(t.transpose(1, 2).reshape(b, n_tokens, heads * d) for t in (q, k, v))
    got = ProportionalAttention()(_sdpa, *args, heads, skip_reshape=skip_reshape, transformer_options={})
    if not skip_reshape:
        got = got.view(b, n_tokens, heads, d).transpose(1, 2)
    # float64: q·m·(1/√d) vs q·(m/√d) differ by a few ulp of the logits
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert attention_multiplier(4608) == 1.0


def test_attention_override_chains_and_installs_once():
    seen = []

    def previous(func, q, *args, **kw):
        seen.append(q)
        return func(q, *args, **kw)

    opts = with_proportional_attention({OVERRIDE_KEY: previous, "other": 1})
    assert opts["other"] == 1 and opts[OVERRIDE_KEY].previous is previous
    assert with_proportional_attention(opts) is opts  # a second node does not scale twice
    q = torch.ones(1, 1, 10, 4, dtype=torch.float64)
    opts[OVERRIDE_KEY](_sdpa, q, q, q, 1, skip_reshape=True)
    assert torch.equal(seen[0], q * attention_multiplier(10))


# ---- VAE: ComfyUI's LDM layout -> diffusers AutoencoderKL ------------------------------------------------------------
def _diffusers_to_ldm(sd: dict, n_levels: int) -> dict:
    """Test-side inverse (the LDM names spelled out, independent of diffusers' converter)."""
    out = {}
    res = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, t in sd.items():
        part, rest = key.split(".", 1)
        name = None
        if rest.startswith(("down_blocks.", "up_blocks.")):
            kind, level, sub, *tail = rest.split(".")
            level = int(level) if kind == "down_blocks" else n_levels - 1 - int(level)
            lvl = f"{'down' if kind == 'down_blocks' else 'up'}.{level}"
            if sub == "resnets":
                index, module, param = tail
                name = f"{lvl}.block.{index}.{res[module]}.{param}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                name = f"{lvl}.{'downsample' if kind == 'down_blocks' else 'upsample'}.conv.{tail[-1]}"
        elif rest.startswith("mid_block.resnets."):
            _, _, index, module, param = rest.split(".")
            name = f"mid.block_{int(index) + 1}.{res[module]}.{param}"
        elif rest.startswith("mid_block.attentions.0."):
            module, param = rest.removeprefix("mid_block.attentions.0.").rsplit(".", 1)
            name = f"mid.attn_1.{attn[module]}.{param}"
            t = t[..., None, None] if t.ndim == 2 else t  # LDM attention projections are 1x1 convolutions
        else:
            name = rest.replace("conv_norm_out", "norm_out")
        out[f"{part}.{name}"] = t
    return out


def test_vae_conversion_is_exact(tiny_flux):
    from diffusers import AutoencoderKL

    from urae_lite.tiny.configs import tiny_vae_config

    vae = AutoencoderKL.from_pretrained(tiny_flux / "vae").eval()
    cfg = tiny_vae_config()
    ldm = _diffusers_to_ldm(vae.state_dict(), len(cfg["block_out_channels"]))
    derived = diffusers_vae_config(ldm, cfg["norm_num_groups"])
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "use_post_quant_conv"):
        assert list(derived[key]) == list(cfg[key]) if isinstance(cfg[key], list) else derived[key] == cfg[key]
    ae = ldm_to_autoencoder(ldm, cfg["norm_num_groups"])
    want, got = vae.state_dict(), ae.state_dict()
    assert set(got) == set(want)
    for key, t in want.items():
        assert torch.equal(got[key], t), key
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ae.decode(z).sample, vae.decode(z).sample)  # same module, same weights: same numbers
    with pytest.raises(UraeError, match="VAEDecode"):
        diffusers_vae_config({k: v for k, v in ldm.items() if not k.startswith("encoder.conv_in")}, 4)
    with pytest.raises(UraeError, match="VAEDecode"):
        ldm_to_autoencoder({**ldm, "decoder.extra.weight": torch.zeros(1)}, cfg["norm_num_groups"])


# ---- the model's file, found by its tensors --------------------------------------------------------------------------
def test_find_model_file(tiny_flux, tmp_path):
    from bfl_files import diffusers_to_bfl, transformer_state, write_bfl_file

    plain = write_bfl_file(tiny_flux, tmp_path / "flux1-dev.safetensors")
    prefixed = write_bfl_file(tiny_flux, tmp_path / "ckpt.safetensors", prefix="model.diffusion_model.")
    fp8 = write_bfl_file(tiny_flux, tmp_path / "fp8.safetensors", dtype=torch.float8_e4m3fn)
    bfl = diffusers_to_bfl(transformer_state(tiny_flux))
    probes = {k: bfl[k] for k in ("img_in.weight", "final_layer.linear.weight")}
    other = {k: v + 1 for k, v in probes.items()}
    assert find_model_file([tmp_path / "missing.safetensors", plain], probes) == plain
    assert find_model_file([prefixed], probes) == prefixed
    assert find_model_file([fp8, plain], probes) == plain  # fp8 weights are not the fp32 model
    fp8_probes = {k: v.to(torch.float8_e4m3fn) for k, v in probes.items()}  # UNETLoader's weight_dtype fp8
    assert find_model_file([fp8], fp8_probes) == fp8
    assert find_model_file([plain, prefixed], other) is None
    assert find_model_file([plain], {}) is None


# ---- install / uninstall ---------------------------------------------------------------------------------------------
def _fake_comfyui(root):
    (root / "comfy").mkdir(parents=True)
    (root / "custom_nodes").mkdir()
    (root / "nodes.py").write_text("")
    return root


def test_install_and_uninstall(tmp_path, capsys):
    root = _fake_comfyui(tmp_path / "ComfyUI")
    assert main(["comfyui", "install", str(root)]) == 0
    shim = root / "custom_nodes" / "urae_lite" / "__init__.py"
    assert shim.read_text().startswith(MARKER)
    exported = runpy.run_path(str(shim))  # what ComfyUI's loader executes
    assert exported["NODE_CLASS_MAPPINGS"] is NODE_CLASS_MAPPINGS
    assert exported["NODE_DISPLAY_NAME_MAPPINGS"] is NODE_DISPLAY_NAME_MAPPINGS
    flows = root / "user" / "default" / "workflows"
    assert {p.name: p.read_text() for p in flows.iterdir()} == workflow_files() and len(workflow_files()) == 2
    install(root)  # again: idempotent
    (flows / "urae_2k.json").write_text("{}")  # the user's edit is kept on uninstall
    assert main(["comfyui", "uninstall", str(root)]) == 0
    assert not shim.parent.exists() and sorted(p.name for p in flows.iterdir()) == ["urae_2k.json"]
    capsys.readouterr()
    assert main(["comfyui", "uninstall", str(root)]) == 2
    assert "nothing of urae-lite is installed" in capsys.readouterr().err
    (flows / "urae_2k.json").unlink()
    install(root)
    uninstall(root)  # the folders install made are gone once empty; ComfyUI's own stay
    assert sorted(p.name for p in root.iterdir()) == ["comfy", "custom_nodes", "nodes.py"]


def test_install_errors(tmp_path, capsys):
    assert main(["comfyui", "install", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a ComfyUI folder" in err and err.count("\n") == 1
    root = _fake_comfyui(tmp_path / "ComfyUI")
    foreign = root / "custom_nodes" / "urae_lite"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("# someone else's\n")
    with pytest.raises(UraeError, match="not written by urae-lite"):
        install(root)
    with pytest.raises(UraeError, match="not written by urae-lite"):
        uninstall(root)
    assert (foreign / "__init__.py").read_text() == "# someone else's\n"
