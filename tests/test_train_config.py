"""Recipes: the shipped YAML files load, overrides apply, mistakes are one-line errors."""

from __future__ import annotations

import pytest
from plan_utils import recipe_plan_config
from train_utils import REPO

from urae_lite.errors import UraeError
from urae_lite.quant import QUANT_FORMATS
from urae_lite.train.config import instantiate, load_recipe

RECIPE_2K = REPO / "recipes" / "train_2k_lora.yaml"
RECIPE_4K = REPO / "recipes" / "train_4k_minor.yaml"
REQUIRED = ["data.dir=/data", "output_dir=/out"]


def _planned_peak_gib(cfg) -> float:
    from urae_lite.plan import estimate

    return estimate(recipe_plan_config(cfg)).peak / 2**30


def test_shipped_recipes_hold_the_authors_settings():
    cfg = load_recipe(RECIPE_2K, REQUIRED)
    assert (cfg.adapter.kind, cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.targets) == ("lora", 16, 16.0, "authors")
    assert (cfg.hires.ntk, cfg.hires.proportional_attention) == (1.0, False)
    assert cfg.training.guidance == 1.0 and cfg.training.timesteps == "uniform" and cfg.training.max_grad_norm == 1.0
    assert cfg.data.caption_mix == {"prompt": 0.2, "generated_prompt": 0.8} and cfg.data.resolution == 2048
    assert _planned_peak_gib(cfg) <= 16  # README goal: 2K training within 16 GiB, by the planner's estimate
    assert cfg.optimizer == {
        "_component_": "prodigyopt.Prodigy",
        "lr": 1.0,
        "weight_decay": 1e-4,
        "decouple": True,
        "use_bias_correction": True,
        "safeguard_warmup": True,
    }
    cfg4 = load_recipe(RECIPE_4K, REQUIRED + ["adapter.base_adapters=[/a/2k.safetensors]"])
    assert (cfg4.adapter.kind, cfg4.adapter.rank, cfg4.data.resolution) == ("minor", 16, 4096)
    assert (cfg4.hires.ntk, cfg4.hires.proportional_attention) == (10.0, True)
    assert cfg4.adapter.base_adapters == ["/a/2k.safetensors"] and _planned_peak_gib(cfg4) <= 24


def test_overrides_are_typed_and_checked():
    cfg = load_recipe(
        RECIPE_2K,
        REQUIRED
        + [
            "training.steps=7",
            "optimizer.weight_decay=1e-3",
            "optimizer._component_=bitsandbytes.optim.AdamW8bit",
            "optimizer.lr=1e-4",
            "training.guidance=3.5",
            "adapter.base_adapters=x.safetensors",
            "memory.checkpointing=off",
        ],
    )
    assert cfg.training.steps == 7 and cfg.training.guidance == 3.5 and cfg.memory.checkpointing == "off"
    assert cfg.optimizer["weight_decay"] == 1e-3 and cfg.optimizer["lr"] == 1e-4
    assert cfg.adapter.base_adapters == ["x.safetensors"]
    with pytest.raises(UraeError, match="unknown setting 'training.stepz'"):
        load_recipe(RECIPE_2K, REQUIRED + ["training.stepz=3"])
    with pytest.raises(UraeError, match="training.steps must be a number"):
        load_recipe(RECIPE_2K, REQUIRED + ["training.steps=many"])
    with pytest.raises(UraeError, match="needs data.dir"):
        load_recipe(RECIPE_2K, ["output_dir=/out"])
    with pytest.raises(UraeError, match="needs adapter.base_adapters"):
        load_recipe(RECIPE_4K, REQUIRED)
    with pytest.raises(UraeError, match=f"unknown quantization 'int3': use one of {', '.join(QUANT_FORMATS)}"):
        load_recipe(RECIPE_2K, REQUIRED + ["memory.quant=int3"])
    with pytest.raises(UraeError, match="not key=value"):
        load_recipe(RECIPE_2K, REQUIRED + ["steps"])
    with pytest.raises(UraeError, match="cannot read recipe"):
        load_recipe(REPO / "recipes" / "nope.yaml")


@pytest.mark.parametrize("size", [100, 0, -16])
def test_a_bad_validation_size_stops_train_before_anything_loads(size, capsys, tmp_path):
    """The rule of image sides (urae_lite.presets) checks validation.size with the recipe, not at the first
    validation after training ran: the command ends in one line, nothing made (no output_dir)."""
    from urae_lite.cli import main

    out = tmp_path / "out"
    args = ["train", str(RECIPE_2K), f"data.dir={tmp_path}", f"output_dir={out}", f"validation.size={size}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"validation.size {size} is not a positive multiple of 16" in err
    assert not out.exists()
    assert load_recipe(RECIPE_2K, REQUIRED + ["validation.size=48"]).validation.size == 48


def test_instantiate_builds_components():
    import torch

    p = torch.nn.Parameter(torch.zeros(4))
    opt = instantiate({"_component_": "torch.optim.AdamW", "lr": 0.5}, [p])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 0.5
    with pytest.raises(UraeError, match="cannot import component"):
        instantiate({"_component_": "no_such_module.Thing"})
    with pytest.raises(UraeError, match="does not accept"):
        instantiate({"_component_": "torch.optim.AdamW", "bogus": 1}, [p])


@pytest.mark.parametrize(
    "validation,on",
    [
        (["validation.every=10"], True),
        (["validation.every_minutes=5"], True),  # the loop samples on the timer: the plan counts its memory
        (["validation.every=0", "validation.every_minutes=0"], False),
        (["validation.every=10", "validation.prompts=[]"], False),
    ],
)
def test_the_planner_and_the_loop_agree_when_validation_runs(validation, on):
    from urae_lite.plan.recipe import recipe_job

    cfg = load_recipe(RECIPE_2K, [*REQUIRED, "validation.prompts=[a cat]", "validation.every=0", *validation])
    assert cfg.validation.enabled is on and recipe_job(cfg).validation is on
