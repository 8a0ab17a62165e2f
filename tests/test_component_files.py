"""ComfyUI single-file VAE / CLIP-L / T5 (`--vae`, `--clip`, `--t5`): same images and cache as the folder's parts,
one line for a wrong file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bfl_files import write_bfl_file
from safetensors.torch import load_file, save_file
from train_utils import REPO, RESOLUTION, make_dataset, one_thread, recipe_overrides  # noqa: F401

from urae_lite.cli import main
from urae_lite.component_files import ComponentFiles, load_file_component
from urae_lite.text_encoders import load_component
from urae_lite.train.cache import build_cache

FP8 = torch.float8_e4m3fn


# ---- test-side writers (independent of the library's mapping) ----------------------------------------------------
def _vae_to_ldm(sd: dict[str, torch.Tensor], up_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> Black Forest Labs' / LDM `ae.safetensors` keys (attention as 1x1 convs)."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, t in sd.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", new)
        new = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", new)
        new = re.sub(r"up_blocks\.(\d+)\.", lambda m: f"up.{up_blocks - 1 - int(m.group(1))}.", new)
        new = new.replace(".resnets.", ".block.").replace(".upsamplers.0.", ".upsample.")
        new = re.sub(r"mid_block\.block\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            head, _, rest = new.partition(".mid_block.attentions.0.")
            module, _, param = rest.rpartition(".")
            new = f"{head}.mid.attn_1.{attn[module]}.{param}"
            t = t[:, :, None, None] if t.ndim == 2 else t
        out[new] = t
    assert len(out) == len(sd)
    return out


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _component_state(root: Path, sub: str) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((root / sub).glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def base(tiny_flux, tmp_path_factory) -> Path:
    """The tiny folder with T5 weights rounded through fp16, so a t5xxl_fp16 file holds exactly its values."""
    root = tmp_path_factory.mktemp("base") / "flux-dev"
    shutil.copytree(tiny_flux, root)
    for f in (root / "text_encoder_2").glob("*.safetensors"):
        save_file({k: v.half().float() for k, v in load_file(f).items()}, str(f), metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def comfy(base, tmp_path_factory) -> dict[str, Path]:
    """ComfyUI's files made from `base`: transformer, ae, clip_l (two layouts), t5xxl fp16 / fp8 / scaled fp8."""
    folder = tmp_path_factory.mktemp("comfy")
    ups = len(json.loads((base / "vae" / "config.json").read_text())["up_block_types"])
    clip = {k.removeprefix("text_model."): v for k, v in _component_state(base, "text_encoder").items()}
    t5 = _component_state(base, "text_encoder_2")
    t5 = {
        "shared.weight": t5.get("shared.weight", t5.get("encoder.embed_tokens.weight")),
        **{k: v for k, v in t5.items() if k.startswith("encoder.") and k != "encoder.embed_tokens.weight"},
    }
    scaled = {"scaled_fp8": torch.zeros(0, dtype=FP8)}
    for k, v in t5.items():
        if v.ndim == 2 and k != "shared.weight":
            scale = v.abs().max() / 448
            scaled[k], scaled[k.removesuffix("weight") + "scale_weight"] = (v / scale).to(FP8), scale.reshape(())
        else:
            scaled[k] = v
    projection = torch.randn(clip["embeddings.token_embedding.weight"].shape[1], 32)
    return {
        "transformer": write_bfl_file(base, folder / "flux1-dev.safetensors"),
        "vae": _save(folder / "ae.safetensors", _vae_to_ldm(_component_state(base, "vae"), ups)),
        "clip": _save(
            folder / "clip_l.safetensors",
            {**{f"text_model.{k}": v for k, v in clip.items()}, "text_projection.weight": projection},
        ),
        "clip_plain": _save(folder / "clip_l_plain.safetensors", clip),
        "t5": _save(folder / "t5xxl_fp16.safetensors", {k: v.half() for k, v in t5.items()}),
        "t5_fp8": _save(
            folder / "t5xxl_fp8_e4m3fn.safetensors", {k: v.to(FP8) if v.ndim == 2 else v.half() for k, v in t5.items()}
        ),
        "t5_scaled": _save(folder / "t5xxl_fp8_e4m3fn_scaled.safetensors", scaled),
    }


# ---- loading -----------------------------------------------------------------------------------------------------
def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "component,file",
    [("vae", "vae"), ("text_encoder", "clip"), ("text_encoder", "clip_plain"), ("text_encoder_2", "t5")],
)
def test_file_loads_the_folders_weights_exactly(base, comfy, component, file):
    if component == "vae":
        from diffusers import AutoencoderKL

        folder = AutoencoderKL.from_pretrained(base / "vae", dtype=torch.float32)
    else:
        folder = load_component(base, component, dtype=torch.float32)
    loaded = load_file_component(component, comfy[file], base, torch.float32)
    assert type(loaded) is type(folder)
    ours, theirs = _state(loaded), _state(folder)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert all(not t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))


def test_fp8_t5_dequantized_to_the_compute_dtype(base, comfy):
    fp16 = _state(load_file_component("text_encoder_2", comfy["t5"], base, torch.float32))
    plain = _state(load_file_component("text_encoder_2", comfy["t5_fp8"], base, torch.float32))
    scaled = _state(load_file_component("text_encoder_2", comfy["t5_scaled"], base, torch.float32))
    raw = load_file(comfy["t5_scaled"])
    name = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert plain[name].dtype == scaled[name].dtype == torch.float32
    assert torch.equal(plain[name], fp16[name].to(FP8).float())
    assert torch.equal(scaled[name], raw[name].float() * raw[name.removesuffix("weight") + "scale_weight"].float())
    assert (scaled[name] - fp16[name]).abs().max() < 0.1 * fp16[name].abs().max()


# ---- generate ----------------------------------------------------------------------------------------------------
GEN = "--width 64 --height 64 --steps 1 --device cpu --quant bf16 --max-sequence-length 16".split()


def _generate(tmp_path, name, *args) -> np.ndarray:
    from PIL import Image

    out = tmp_path / f"{name}.png"
    assert main(["generate", "a red fox", "--out", str(out), *GEN, *args]) == 0
    return np.asarray(Image.open(out)).astype(np.int16)


def test_generate_with_component_files_equals_folder(tmp_path, base, comfy):
    folder = _generate(tmp_path, "folder", "--model", str(base))
    files = ["--vae", str(comfy["vae"]), "--clip", str(comfy["clip"])]
    single = _generate(
        tmp_path,
        "files",
        "--model",
        str(comfy["transformer"]),
        "--base-pipeline",
        str(base),
        *files,
        "--t5",
        str(comfy["t5"]),
    )
    assert np.array_equal(folder, single)


@pytest.fixture(scope="module")
def fp8_base(base, tmp_path_factory) -> Path:
    """`base` with the T5 matrices rounded through float8_e4m3fn once: exactly the values of `comfy["t5_fp8"]`
    (made from `base`: 2-D tensors cast to e4m3, the rest to fp16, which `base` already holds exactly)."""
    root = tmp_path_factory.mktemp("fp8-base") / "flux-dev"
    shutil.copytree(base, root)
    for f in (root / "text_encoder_2").glob("*.safetensors"):
        rounded = {k: v.to(FP8).float() if v.ndim == 2 else v for k, v in load_file(f).items()}
        save_file(rounded, str(f), metadata={"format": "pt"})
    return root


def test_generate_with_fp8_t5_equals_the_fp8_rounded_folder(tmp_path, base, comfy, fp8_base):
    """`--t5 t5xxl_fp8_e4m3fn` generates exactly what its values do: the file's e4m3 matrices widen to the compute
    dtype exactly, so T5 holds the same fp32 weights as the folder whose T5 was rounded through e4m3, and the same
    weights run the same code on the same machine: equal pixels, no tolerance."""
    files = ["--vae", str(comfy["vae"]), "--clip", str(comfy["clip"])]
    fp8 = _generate(tmp_path, "fp8", "--model", str(base), *files, "--t5", str(comfy["t5_fp8"]))
    assert np.array_equal(fp8, _generate(tmp_path, "rounded", "--model", str(fp8_base)))
    assert not np.array_equal(fp8, _generate(tmp_path, "folder", "--model", str(base)))  # the file was used


def test_t5_file_in_nf4_equals_folder_in_nf4(tmp_path, base, comfy):
    """`--t5-quant nf4` quantizes a --t5 file as it does the folder's T5 (transformers' bitsandbytes path)."""
    nf4 = ["--t5-quant", "nf4"]
    folder = _generate(tmp_path, "folder", "--model", str(base), *nf4)
    assert np.array_equal(folder, _generate(tmp_path, "file", "--model", str(base), *nf4, "--t5", str(comfy["t5"])))
    fp8 = _generate(tmp_path, "fp8", "--model", str(base), *nf4, "--t5", str(comfy["t5_fp8"]))
    assert not np.array_equal(folder, fp8)  # the file is what gets quantized


def _wrong_width_clip(base: Path, folder: Path) -> Path:
    """A CLIP text model 16 wide where the base pipeline's is 32 (as CLIP-G is to CLIP-L)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig.from_pretrained(base / "text_encoder", hidden_size=16, projection_dim=16))
    return _save(folder / "clip_g.safetensors", model.state_dict())


@pytest.mark.parametrize(
    "option,which,expect",
    [
        ("--vae", "transformer", "is a FLUX transformer .* not the FLUX VAE"),
        ("--clip", "vae", "is a VAE .* not a CLIP-L text encoder"),
        ("--t5", "clip", "is a CLIP text encoder .* not a T5 encoder"),
        ("--clip", "wide", "does not match the base pipeline's text_encoder .*expects"),
        ("--t5", "truncated", "truncated"),
        ("--vae", "missing", "--vae file not found"),
    ],
)
def test_bad_component_file_is_one_line(tmp_path, base, comfy, capsys, option, which, expect):
    if which == "wide":
        path = _wrong_width_clip(base, tmp_path)
    elif which == "truncated":
        data = comfy["t5"].read_bytes()
        path = tmp_path / "t5xxl_fp16.safetensors"
        path.write_bytes(data[: len(data) // 2])
    elif which == "missing":
        path = tmp_path / "ae.safetensors"
    else:
        path = comfy[which]
    code = main(["generate", "a cat", "--model", str(base), "--out", str(tmp_path / "x.png"), *GEN, option, str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(expect, err), err


# ---- cache and train ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory, base):
    folder = make_dataset(tmp_path_factory.mktemp("data") / "train", sizes=[(96, 96), (120, 90), (48, 192)])
    build_cache(folder, str(base), RESOLUTION, max_sequence_length=32, progress=False)
    return folder


def test_cache_with_component_files_equals_folder(data, base, comfy, tmp_path):
    files = tmp_path / "files"
    assert (
        main(
            [
                "cache",
                str(data),
                "--model",
                str(comfy["transformer"]),
                "--base-pipeline",
                str(base),
                "--resolution",
                str(RESOLUTION),
                "--max-sequence-length",
                "32",
                "--out",
                str(files),
                "--vae",
                str(comfy["vae"]),
                "--clip",
                str(comfy["clip"]),
                "--t5",
                str(comfy["t5"]),
            ]
        )
        == 0
    )
    folder = data / ".urae_cache" / str(RESOLUTION)
    ours = sorted(p.relative_to(files) for p in files.rglob("*.safetensors"))
    assert ours == sorted(p.relative_to(folder) for p in folder.rglob("*.safetensors")) and ours
    for rel in ours:
        a, b = load_file(files / rel), load_file(folder / rel)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), rel
    # the cache is tied to the files: without them (the folder's own weights) it is another model's cache
    fingerprints = [json.loads((c / "manifest.json").read_text())["fingerprint"] for c in (files, folder)]
    assert fingerprints[0] != fingerprints[1]
    fp8 = build_cache(
        data,
        str(base),
        RESOLUTION,
        out=tmp_path / "fp8",
        max_sequence_length=32,
        progress=False,
        files=ComponentFiles(t5=comfy["t5_fp8"]),
    )[0]
    text = sorted(p.relative_to(fp8) for p in (fp8 / "text").glob("*.safetensors"))
    assert all(not torch.equal(load_file(fp8 / r)["t5"], load_file(folder / r)["t5"]) for r in text)  # file used
    assert all(torch.equal(load_file(fp8 / r)["pooled"], load_file(folder / r)["pooled"]) for r in text)


def _first_loss(out: Path) -> float:
    return json.loads((out / "log.jsonl").read_text().splitlines()[0])["loss"]


def test_train_from_single_files_equals_folder(data, base, comfy, tmp_path):
    """`urae-lite train` on a ComfyUI transformer file (+ the VAE / CLIP / T5 files the cache was made with)."""
    fast = {"memory.quant": "bf16", "training.precision": "fp32", "training.steps": 2}
    recipe = str(REPO / "recipes" / "train_2k_lora.yaml")
    files = {"vae": comfy["vae"], "clip": comfy["clip"], "t5": comfy["t5"]}
    build_cache(
        data,
        str(comfy["transformer"]),
        RESOLUTION,
        out=tmp_path / "cache",
        max_sequence_length=32,
        progress=False,
        base_pipeline=str(base),
        files=ComponentFiles(**files),
    )
    runs = {
        "folder": {},
        "file": {"model": comfy["transformer"], "base_pipeline": base},
        "files": {
            "model": comfy["transformer"],
            "base_pipeline": base,
            "data.cache": tmp_path / "cache",
            **files,
            "validation.every": 2,
            "validation.prompts": "[a red fox]",
            "validation.steps": 2,
        },
    }
    for name, extra in runs.items():
        overrides = recipe_overrides(base, data, tmp_path / name, **fast) + [f"{k}={v}" for k, v in extra.items()]
        assert main(["train", recipe, *overrides]) == 0
        log = (tmp_path / name / "log.jsonl").read_text().splitlines()
        assert len(log) == 2
    assert _first_loss(tmp_path / "file") == _first_loss(tmp_path / "folder") == _first_loss(tmp_path / "files")
    assert (tmp_path / "files" / "validation" / "step-00000002" / "00.png").is_file()  # encoders + VAE from files


def test_component_files_value():
    files = ComponentFiles(vae="ae.safetensors", t5="t5xxl_fp16.safetensors")
    assert set(files.given()) == {"vae", "text_encoder_2"} and files and not ComponentFiles()
