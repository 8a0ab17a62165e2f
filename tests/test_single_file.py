"""Single-file FLUX transformers (ComfyUI / Forge, BFL layout): streamed like a folder, clear errors otherwise."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from bfl_files import transformer_state, write_bfl_file
from safetensors.torch import save_file

from urae_lite.cli import main
from urae_lite.errors import UraeError
from urae_lite.loader import load_transformer
from urae_lite.model_files import resolve_files
from urae_lite.single_file import SingleFileReader

FP8_PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def bfl_file(tiny_flux, tmp_path_factory):
    return write_bfl_file(tiny_flux, tmp_path_factory.mktemp("comfy") / "flux1-dev.safetensors")


@pytest.fixture(scope="module")
def fp8_file(tiny_flux, tmp_path_factory):
    return write_bfl_file(
        tiny_flux,
        tmp_path_factory.mktemp("comfy") / "flux1-dev-fp8.safetensors",
        dtype=torch.float8_e4m3fn,
        prefix=FP8_PREFIX,
    )


def _diffusers_converter_for(hidden: int):
    """diffusers' own BFL -> diffusers converter, with its hard-coded FLUX.1 width (3072) set to the tiny one."""
    from diffusers.loaders import single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    namespace = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {hidden}"), namespace)  # noqa: S102 -- diffusers' own source, one constant changed
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def test_streamed_tensors_equal_folder_and_diffusers_converter(tiny_flux, bfl_file, tiny_config):
    from safetensors.torch import load_file

    ours = dict(SingleFileReader(bfl_file).iter_tensors())
    folder = transformer_state(tiny_flux)
    assert set(ours) == set(folder)
    assert all(torch.equal(ours[k], folder[k]) for k in folder)
    hidden = tiny_config["num_attention_heads"] * tiny_config["attention_head_dim"]
    theirs = _diffusers_converter_for(hidden)(load_file(str(bfl_file)))
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_config_and_variant_from_weights(tiny_flux, bfl_file, fp8_file, tiny_config):
    for path in (bfl_file, fp8_file):
        files = resolve_files(path, tiny_flux)
        config, reader = files.config, files.reader()
        assert reader.variant == "dev"
        assert {k: config[k] for k in tiny_config if k != "axes_dims_rope"} == {
            k: v for k, v in tiny_config.items() if k != "axes_dims_rope"
        }
        assert tuple(config["axes_dims_rope"]) == tuple(tiny_config["axes_dims_rope"])


def test_fp8_file_dequantized_per_tensor(fp8_file, tiny_flux):
    folder = transformer_state(tiny_flux)
    for name, t in SingleFileReader(fp8_file).iter_tensors():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, folder[name].to(torch.float8_e4m3fn).to(torch.bfloat16))


@pytest.mark.parametrize("quant", ["bf16", "nf4"])
def test_load_transformer_from_file_equals_folder(tiny_flux, bfl_file, tiny_config, make_inputs, quant):
    inputs = make_inputs(tiny_config)
    with torch.no_grad():
        a = load_transformer(tiny_flux, quant, progress=False)(**inputs).sample
        b = load_transformer(bfl_file, quant, progress=False, base_pipeline=tiny_flux)(**inputs).sample
    assert torch.equal(a, b)


def _write(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "kind,expect", [("sd", "Stable Diffusion checkpoint"), ("vae", "VAE"), ("truncated", "truncated")]
)
def test_bad_files_one_clear_line(tmp_path, bfl_file, tiny_flux, kind, expect):
    if kind == "sd":
        path = _write(
            tmp_path / "v1-5.safetensors",
            {
                "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
                "first_stage_model.decoder.conv_in.weight": torch.zeros(2),
            },
        )
    elif kind == "vae":
        path = _write(
            tmp_path / "ae.safetensors",
            {"decoder.conv_in.weight": torch.zeros(2), "encoder.conv_in.weight": torch.zeros(2)},
        )
    else:
        data = bfl_file.read_bytes()
        path = tmp_path / "flux1-dev.safetensors"
        path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UraeError, match=expect) as e:
        load_transformer(path, "bf16", progress=False, base_pipeline=tiny_flux)
    assert "\n" not in str(e.value)


def test_width_mismatch_with_base_pipeline(tmp_path, tiny_flux):
    from bfl_files import diffusers_to_bfl

    from urae_lite.tiny import build_tiny_flux

    state = diffusers_to_bfl(transformer_state(tiny_flux))
    state = {k: v for k, v in state.items() if not k.startswith("single_blocks.1.")}  # one single block fewer
    path = _write(tmp_path / "flux1-dev.safetensors", state)
    with pytest.raises(UraeError, match="does not match --base-pipeline") as e:
        load_transformer(path, "bf16", progress=False, base_pipeline=tiny_flux)
    assert "num_single_layers" in str(e.value) and "\n" not in str(e.value)
    del build_tiny_flux


def test_missing_base_pipeline_is_one_line(bfl_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    code = main(["generate", "a cat", "--model", str(bfl_file), "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--base-pipeline" in err and len(err.splitlines()) == 1


GEN = "--width 64 --height 64 --steps 1 --device cpu --quant bf16 --max-sequence-length 16".split()


def _generate(tmp_path, name, model, *extra) -> np.ndarray:
    from PIL import Image

    out = tmp_path / f"{name}.png"
    assert main(["generate", "a red fox", "--model", str(model), "--out", str(out), *GEN, *extra]) == 0
    return np.asarray(Image.open(out)).astype(np.int16)


def test_generate_from_file_equals_folder(tmp_path, tiny_flux, bfl_file):
    folder = _generate(tmp_path, "folder", tiny_flux)
    single = _generate(tmp_path, "bfl", bfl_file, "--base-pipeline", str(tiny_flux))
    assert np.array_equal(folder, single)


@pytest.fixture(scope="module")
def fp8_rounded(tiny_flux, tmp_path_factory):
    """The tiny folder with every transformer tensor rounded through float8_e4m3fn once (stored back in bf16), and
    the fp8 single file made from it: the file holds exactly the folder's values (e4m3 -> bf16 -> e4m3 is the
    identity, every e4m3 value being a bf16 value)."""
    import shutil

    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("fp8-rounded") / "flux-dev"
    shutil.copytree(tiny_flux, root)
    for f in (root / "transformer").glob("*.safetensors"):
        rounded = {k: v.to(torch.float8_e4m3fn).to(v.dtype) for k, v in load_file(f).items()}
        save_file(rounded, str(f), metadata={"format": "pt"})
    file = write_bfl_file(root, root.parent / "flux1-dev-fp8.safetensors", dtype=torch.float8_e4m3fn, prefix=FP8_PREFIX)
    return root, file


def test_generate_from_fp8_file_equals_the_fp8_rounded_folder(tmp_path, tiny_flux, fp8_rounded):
    """An fp8 file generates exactly what its values do in bf16: the reader widens each e4m3 tensor to bf16 (exact)
    and from there the same bf16 weights run the same code on the same machine as the folder's, so the pixels are
    equal, not close (no tolerance)."""
    rounded, fp8_file = fp8_rounded
    # the VAE and text encoders come from the unrounded folder (they are the same), so a reader that took the
    # transformer from --base-pipeline instead of the file would give the unrounded image
    fp8 = _generate(tmp_path, "fp8", fp8_file, "--base-pipeline", str(tiny_flux))
    assert np.array_equal(fp8, _generate(tmp_path, "rounded", rounded))
    assert not np.array_equal(fp8, _generate(tmp_path, "folder", tiny_flux))  # the rounding shows in the image


def test_convert_from_file_equals_folder(tmp_path, tiny_flux, bfl_file, tiny_config):
    """The 4K conversion's SVD sees the same weights from the single file as from the folder."""
    from safetensors.torch import load_file
    from synthetic_adapters import write_authors_2k, write_authors_4k

    a2 = write_authors_2k(tmp_path / "urae_2k_adapter.safetensors", tiny_config)
    a4 = write_authors_4k(tmp_path / "urae_4k_adapter.safetensors", tiny_config)
    outs = []
    for name, model in (("folder", tiny_flux), ("file", bfl_file)):
        out = tmp_path / f"{name}.safetensors"
        assert main(["convert", str(a2), str(a4), "--model", str(model), "--out", str(out)]) == 0
        outs.append(load_file(str(out)))
    assert set(outs[0]) == set(outs[1]) and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_plan_reads_widths_and_variant_from_the_file(tiny_flux, bfl_file, capsys):
    """`plan --model FILE` plans the transformer in the file (here the tiny one), exactly as its folder."""
    import json

    plans = []
    for model in (bfl_file, tiny_flux, None):
        args = ["plan", "--task", "generate", "--resolution", "512", "--json"]
        model_args = ["--model", str(model), "--base-pipeline", str(tiny_flux)] if model else []
        assert main(args + model_args) == 0
        plans.append(json.loads(capsys.readouterr().out))
    from_file, from_folder, full_size = plans
    assert from_file == from_folder and from_file["config"]["variant"] == "dev"
    denoise = from_file["phases"].index("denoising")
    assert from_file["allocated"][denoise] < full_size["allocated"][denoise]  # tiny widths, not FLUX.1's
