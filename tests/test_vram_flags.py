"""`generate --vram` and `train --vram` take the planner's fastest fitting settings and keep the user's own."""

from __future__ import annotations

import argparse
import pytest
from PIL import Image

from urae_lite.cli import main
from urae_lite.plan import best_config


def test_generate_vram_uses_the_planners_pick(tiny_flux, tmp_path, capsys):
    out = tmp_path / "x.png"
    args = ["generate", "a fox", "--model", str(tiny_flux), "--width", "128", "--height", "128", "--steps", "1",
            "--device", "cpu", "--out", str(out)]
    assert main(args + ["--vram", "48"]) == 0
    expected = best_config("generate", 128, 128, 48).best.config
    assert f"planner picks --quant {expected.quant} --offload {expected.offload}" in capsys.readouterr().out
    assert Image.open(out).info["quant"] == expected.quant
    assert main(args + ["--vram", "48", "--quant", "nf4"]) == 0  # a --quant the user gave stays
    assert Image.open(out).info["quant"] == "nf4"


def test_generate_vram_too_small_is_one_clear_error(tiny_flux, tmp_path, capsys):
    code = main(["generate", "a fox", "--model", str(tiny_flux), "--width", "4096", "--height", "4096",
                 "--vram", "2", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "GiB" in err


@pytest.mark.parametrize("overrides,fixed_quant,vram", [([], None, 16.0), (["quant=fp8"], "fp8", 24.0)])
def test_train_vram_sets_quant_and_checkpointing(overrides, fixed_quant, vram):
    from urae_lite.train.cli import _plan_memory
    from urae_lite.train.config import load_recipe

    overrides = ["data.dir=x", "output_dir=y", *overrides]
    cfg = load_recipe("recipes/train_2k_lora.yaml", overrides)
    _plan_memory(cfg, argparse.Namespace(vram=vram, overrides=overrides))
    pick = best_config("train", 2048, 2048, vram, adapter="lora", rank=16, validation=True,
                       **({"quant": fixed_quant} if fixed_quant else {})).best.config
    assert (cfg.quant, cfg.training.checkpointing) == (pick.quant, pick.checkpointing)
    if fixed_quant:
        assert cfg.quant == fixed_quant
