"""Glue test against a real ComfyUI: our kohya export applied with ComfyUI's own LoRA path on a BFL single file.

ComfyUI is not on the package index; set URAE_LITE_COMFYUI=/path/to/ComfyUI (a checkout, with its requirements in
this environment) to run it (tests/comfyui_env.py).
"""

from __future__ import annotations

import logging

import pytest
import torch
from bfl_files import write_bfl_file
from comfyui_env import comfyui_root, detect_tiny_flux
from safetensors.torch import load_file
from test_export import U_FP32, _bfl_rows, _mixed_scales_lora, _reference

from urae_lite.cli import main


@pytest.fixture
def comfy(monkeypatch, tiny_config):
    """ComfyUI's modules, on the CPU, with its FLUX detection given the tiny widths (skips without ComfyUI)."""
    comfyui_root()
    detect_tiny_flux(monkeypatch, tiny_config)
    import comfy.sd
    import comfy.utils

    return comfy


def test_kohya_export_in_comfyui_is_w_plus_scaled_ba(tmp_path, tiny_flux, tiny_config, comfy, caplog):
    """UNETLoader + LoraLoaderModelOnly's code path (load_diffusion_model, load_lora_for_models, patch_model) on the
    mixed-scale adapter: every patched weight is W + scale·B·A of the adapter's own factors, and no key is left out."""
    src = _mixed_scales_lora(tmp_path / "mixed.safetensors", tiny_config)
    lora_file = tmp_path / "kohya.safetensors"
    assert main(["export", str(src), "--format", "kohya", "--out", str(lora_file)]) == 0
    unet = write_bfl_file(tiny_flux, tmp_path / "tiny_bfl.safetensors")

    model = comfy.sd.load_diffusion_model(str(unet), model_options={"dtype": torch.float32})
    lora = comfy.utils.load_torch_file(str(lora_file), safe_load=True)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    unloaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert unloaded == []
    patched.patch_model()
    weights = patched.model.diffusion_model.state_dict()

    from urae_lite.adapter_io import read_adapter

    base, stored = load_file(str(unet)), load_file(str(lora_file))
    hidden = tiny_config["num_attention_heads"] * tiny_config["attention_head_dim"]
    expected, mag = {}, {}
    for name, f in read_adapter(src).modules.items():
        key, start, _ = _bfl_rows(name, hidden)
        weight = next(k for k in base if k.removesuffix(".weight").replace(".", "_") == key.removeprefix("lora_unet_"))
        ref, m = _reference(f)
        expected.setdefault(weight, base[weight].double().clone())[start : start + len(ref)] += ref
        mag.setdefault(weight, torch.zeros_like(expected[weight]))[start : start + len(ref)] += m
    groups = {k.rsplit(".", 2)[0] for k in stored if k.endswith("lora_down.weight")}
    assert len(groups) == len(expected)  # one kohya entry per patched weight, each applied once
    for weight, exp in expected.items():
        rank = stored[f"lora_unet_{weight.removesuffix('.weight').replace('.', '_')}.lora_down.weight"].shape[0]
        got = weights[weight]
        assert got.dtype == torch.float32
        # ComfyUI: lora_diff = up·down in fp32 (≤ rank·u32·Σ|s·b·a| for up to rank products, the factors cast exactly),
        # times alpha/rank (exact: a power of two or 0.75, 1.5; one rounding of the product), weight += (one rounding,
        # ≤ u32·|W + Δ|); the file's fp32 groups add one rounding of s·B; second-order terms stay below one more u32.
        # Rows without a LoRA (single block 0's to_v) get up·down = 0 exactly: their weight stays bit for bit.
        bound = U_FP32 * exp.abs() + (rank + 4) * U_FP32 * mag[weight]
        assert ((got.double() - exp).abs() <= bound).all(), (weight, (got.double() - exp).abs().max().item())
        assert (got.double() - base[weight].double()).abs().max() > 1e3 * bound.max(), weight  # the LoRA is there
