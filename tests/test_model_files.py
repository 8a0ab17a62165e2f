"""Model files are resolved once per command into one `ModelFiles`: each layout's format, transformer, config and
pipeline folder; one resolution per generate / cache / plan / train; one-line errors for missing or odd paths."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from bfl_files import write_bfl_file
from train_utils import REPO, RESOLUTION, make_dataset, one_thread, recipe_overrides  # noqa: F401

from urae_lite import model_files
from urae_lite.cli import main
from urae_lite.errors import UraeError
from urae_lite.loader import LoadSpec, load_transformer
from urae_lite.model_files import as_model_files, resolve_files
from urae_lite.prepare import prepare

WIDTHS = (
    "in_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
)


@pytest.fixture(scope="module")
def prepared(tiny_flux, tmp_path_factory):
    return prepare(tiny_flux, tmp_path_factory.mktemp("prepared") / "q", quant="bf16", progress=False)


@pytest.fixture(scope="module")
def bfl_file(tiny_flux, tmp_path_factory):
    return write_bfl_file(tiny_flux, tmp_path_factory.mktemp("comfy") / "flux1-dev.safetensors")


def _counted(monkeypatch, owner, name: str) -> list:
    """Record the first argument of every call to `owner.name` (still calling it)."""
    calls, real = [], getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(str(args[0]) if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


# ---- what each layout resolves to --------------------------------------------------------------------------------
def test_each_layout_resolves_to_its_format_transformer_and_pipeline(tiny_flux, tiny_config, prepared, bfl_file):
    folder_config = json.loads((tiny_flux / "transformer" / "config.json").read_text())
    pipeline = resolve_files(tiny_flux)
    assert (pipeline.format, pipeline.transformer, pipeline.pipeline) == (
        "diffusers",
        tiny_flux / "transformer",
        tiny_flux,
    )
    assert pipeline.config == folder_config and pipeline.variant == "dev" and pipeline.model == str(tiny_flux)
    assert pipeline.full_precision == tiny_flux / "transformer"
    # the transformer/ subfolder on its own: the pipeline around it still gives the text encoders and VAE
    sub = resolve_files(tiny_flux / "transformer")
    assert (sub.format, sub.transformer, sub.pipeline_root()) == ("diffusers", tiny_flux / "transformer", tiny_flux)
    # a prepared folder: its quantized tensors, the pipeline and full-precision weights it was made from
    q = resolve_files(prepared)
    assert (q.format, q.transformer, q.pipeline_root()) == ("prepared", prepared, tiny_flux)
    assert q.config == folder_config and q.marker["quant"] == "bf16"
    assert q.full_precision == tiny_flux / "transformer"
    # one transformer file: widths from its tensor shapes, RoPE axes and everything else from the base pipeline
    single = resolve_files(bfl_file, tiny_flux)
    assert (single.format, single.transformer, single.pipeline_root()) == ("single_file", bfl_file, tiny_flux)
    assert {k: single.config[k] for k in WIDTHS} == {k: tiny_config[k] for k in WIDTHS}
    assert tuple(single.config["axes_dims_rope"]) == tuple(tiny_config["axes_dims_rope"])
    assert single.base_pipeline == str(tiny_flux) and single.full_precision == bfl_file
    # the readers see the same diffusers-named tensors (the prepared one: quantized, bf16 = the values)
    want = pipeline.reader().get("transformer_blocks.0.attn.to_q.weight")
    for files in (sub, single, q):
        assert torch.equal(files.reader().get("transformer_blocks.0.attn.to_q.weight"), want), files.format


def test_a_recipe_transformer_keeps_the_recipe_model_for_the_pipeline(tiny_flux, prepared):
    """`transformer: PREPARED` in a recipe: the weights come from it, the rest (and the cache's name) from `model`."""
    files = resolve_files(tiny_flux, transformer=prepared)
    assert (files.model, files.format, files.transformer, files.pipeline_root()) == (
        str(tiny_flux),
        "prepared",
        prepared,
        tiny_flux,
    )
    assert files.base_pipeline is None


def test_a_single_file_without_its_pipeline_resolves_and_says_what_is_missing(bfl_file, tmp_path, monkeypatch):
    """Its weights are readable (`convert` needs nothing else); the config and the text encoders need
    --base-pipeline, each said in one line when asked for."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    files = resolve_files(bfl_file)
    assert files.format == "single_file" and files.variant == "dev" and files.pipeline is None
    assert files.reader().keys()
    for ask in (lambda: files.config, files.pipeline_root):
        with pytest.raises(UraeError, match="--base-pipeline") as e:
            ask()
        assert "\n" not in str(e.value)


def _not_safetensors(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"x")
    return tmp_path / "model.ckpt"


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _bad_marker(tmp_path, prepared):
    shutil.copytree(prepared, tmp_path / "q")
    (tmp_path / "q" / "urae_lite_quant.json").write_text("{not json")
    return tmp_path / "q"


@pytest.mark.parametrize(
    "make,expect",
    [
        (lambda tmp, prepared: tmp / "nope", "model not found: .*nope"),
        (lambda tmp, prepared: tmp / "flux1-dev.safetensors", "model file not found"),
        (lambda tmp, prepared: _not_safetensors(tmp), "is a file but not .safetensors"),
        (lambda tmp, prepared: _empty(tmp), "no transformer/config.json"),
        (lambda tmp, prepared: _bad_marker(tmp, prepared), "cannot read .*urae_lite_quant.json.*prepare"),
    ],
)
def test_missing_or_odd_paths_are_one_line(tmp_path, prepared, make, expect):
    with pytest.raises(UraeError, match=expect) as e:
        resolve_files(make(tmp_path, prepared))
    assert "\n" not in str(e.value)


def test_a_transformer_without_a_pipeline_says_what_to_pass(tiny_flux, tmp_path):
    shutil.copytree(tiny_flux / "transformer", tmp_path / "alone" / "transformer")
    files = resolve_files(tmp_path / "alone")
    assert files.format == "diffusers" and files.config["num_layers"] == 2
    with pytest.raises(UraeError, match="holds a transformer only.*--model, or as --base-pipeline") as e:
        files.pipeline_root()
    assert "\n" not in str(e.value)
    with pytest.raises(UraeError, match="no model_index.json"):
        resolve_files(tmp_path / "alone", base_pipeline=tmp_path / "alone")


def test_a_resolved_value_is_not_resolved_again(tiny_flux, monkeypatch):
    files = resolve_files(tiny_flux)
    calls = _counted(monkeypatch, model_files, "resolve_model")
    assert as_model_files(files) is files and calls == []
    with pytest.raises(UraeError, match="already names"):
        as_model_files(files, base_pipeline=tiny_flux)


# ---- once per command ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_flux):
    from urae_lite.train.cache import build_cache

    folder = make_dataset(tmp_path_factory.mktemp("mf") / "data", sizes=[(64, 64), (96, 48)])
    build_cache(folder, str(tiny_flux), RESOLUTION, max_sequence_length=32, progress=False)
    return folder


@pytest.mark.parametrize("command", ["generate", "generate-file", "cache", "plan"])
def test_each_command_resolves_the_model_once(command, tiny_flux, bfl_file, data, tmp_path, monkeypatch, capsys):
    """One fetch / path resolution, one config read and one base-pipeline lookup per command, however many parts
    (planner, adapters, transformer, text encoders, cache identity) use them."""
    resolved = _counted(monkeypatch, model_files, "resolve_model")
    configs = _counted(monkeypatch, model_files, "load_config")
    bases = _counted(monkeypatch, model_files, "base_pipeline_root")
    model = str(bfl_file if command == "generate-file" else tiny_flux)
    generate = [
        "generate",
        "a fox",
        "--model",
        model,
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "x.png"),
        "--vram",
        "48",
        "--ram",
        "20",
    ]
    argv = {
        "generate": generate,
        "generate-file": [*generate, "--base-pipeline", str(tiny_flux)],
        "cache": [
            "cache",
            str(data),
            "--model",
            model,
            "--resolution",
            str(RESOLUTION),
            "--max-sequence-length",
            "32",
            "--out",
            str(tmp_path / "cache"),
        ],
        "plan": ["plan", "--model", model, "--resolution", "256"],
    }[command]
    assert main(argv) == 0, capsys.readouterr().err
    assert resolved == [model]
    if command == "generate-file":
        assert configs == [] and bases == [str(tiny_flux)]
    else:
        assert configs == [str(tiny_flux / "transformer")] and bases == []


def test_train_resolves_the_recipe_once(tiny_flux, prepared, data, tmp_path, monkeypatch, capsys):
    """With --vram too (the planner reads the transformer's config), and with the recipe's own `transformer`."""
    resolved = _counted(monkeypatch, model_files, "resolve_model")
    pipelines = _counted(monkeypatch, model_files, "_pipeline_folder")
    overrides = recipe_overrides(
        tiny_flux,
        data,
        tmp_path / "out",
        **{
            "memory.quant": "bf16",
            "training.precision": "fp32",
            "training.steps": 1,
            "transformer": prepared,
            "memory.checkpointing": "off",
        },
    )
    code = main(["train", str(REPO / "recipes" / "train_2k_lora.yaml"), *overrides, "--vram", "48", "--ram", "20"])
    assert code == 0, capsys.readouterr().err
    assert resolved == [str(prepared)] and pipelines == [str(tiny_flux)]
    assert (tmp_path / "out" / "adapter.safetensors").is_file()


# ---- the load spec ---------------------------------------------------------------------------------------------------
def test_the_quant_format_is_checked_once_per_load(tiny_flux, monkeypatch):
    """The name is checked where it enters (MemorySettings); the loader and every layer get the format object."""
    from urae_lite import memory
    from urae_lite.quant import QuantFormat, weight

    with pytest.raises(UraeError, match="unknown quantization 'int2'"):
        LoadSpec("int2")
    checks = _counted(monkeypatch, memory.MemorySettings, "__post_init__")
    asked = []
    real = weight.get_format
    monkeypatch.setattr(weight, "get_format", lambda q: asked.append(q) or real(q))
    model = load_transformer(tiny_flux, "bf16", progress=False)
    assert len(checks) == 1 and asked and all(isinstance(q, QuantFormat) for q in asked)
    assert model.get_submodule("transformer_blocks.0.attn.to_q").base.quant.name == "bf16"
    spec = LoadSpec("nf4", "cpu", adapters=["a.safetensors"])
    assert spec.device == torch.device("cpu") and spec.adapters == ("a.safetensors",)
