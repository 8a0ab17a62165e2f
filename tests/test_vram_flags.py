"""`generate --vram` and `train --vram` take the planner's fastest fitting settings and keep the user's own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from plan_utils import best

from urae_lite.cli import main
from urae_lite.model_files import resolve_files
from urae_lite.plan.choose import model_fields
from urae_lite.plan.search import options


def test_generate_vram_uses_the_planners_pick(tiny_flux, tmp_path, capsys):
    out = tmp_path / "x.png"
    args = [
        "generate",
        "a fox",
        "--model",
        str(tiny_flux),
        "--width",
        "128",
        "--height",
        "128",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(args + ["--vram", "48", "--ram", "20"]) == 0  # planned for the model's own config
    fields = model_fields(resolve_files(str(tiny_flux)))
    expected = best("generate", 128, 128, 48, ram_gib=20, **fields).best.config
    assert f"planner picks {options(expected)} " in capsys.readouterr().out
    assert Image.open(out).info["quant"] == expected.memory.quant
    assert main(args + ["--vram", "48", "--ram", "20", "--quant", "nf4", "--token-chunks", "3"]) == 0  # given: stay
    assert "--quant nf4 " in capsys.readouterr().out and Image.open(out).info["quant"] == "nf4"
    assert main(args + ["--vram", "48", "--ram", "20", "--blocks-to-swap", "3"]) == 0  # given: stays, and runs
    assert "--blocks-to-swap 3" in capsys.readouterr().out


def test_generate_vram_too_small_is_one_clear_error(tiny_flux, tmp_path, capsys):
    code = main(
        [
            "generate",
            "a fox",
            "--model",
            str(tiny_flux),
            "--width",
            "4096",
            "--height",
            "4096",
            "--vram",
            "2",
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "GiB" in err


@pytest.mark.parametrize(
    "overrides,fixed,vram",
    [
        ([], {}, 8.0),
        (["memory.quant=fp8"], {"quant": "fp8"}, 24.0),
        (["memory.token_chunks=4"], {"token_chunks": 4}, 12.0),
    ],
)
def test_train_vram_sets_the_memory_settings_and_keeps_the_users(tiny_flux, overrides, fixed, vram):
    """Planned for the recipe's model, whose depth bounds blocks_to_swap (here the tiny one)."""
    from urae_lite.memory import overridden
    from urae_lite.plan.choose import apply_vram
    from urae_lite.plan.recipe import recipe_job
    from urae_lite.train.config import load_recipe
    from urae_lite.train_cli import vram_overrides

    overrides = ["data.dir=x", "output_dir=y", f"model={tiny_flux}", *overrides]
    cfg = load_recipe("recipes/train_2k_lora.yaml", overrides)
    job = recipe_job(cfg, **model_fields(resolve_files(str(tiny_flux))))
    picked = apply_vram(job, overridden(overrides), vram, 24)
    cfg = load_recipe("recipes/train_2k_lora.yaml", [*vram_overrides(picked), *overrides])
    pick = best(
        "train",
        2048,
        2048,
        vram,
        24,
        adapter="lora",
        rank=16,
        validation=True,
        optimizer="prodigy",
        **model_fields(resolve_files(str(tiny_flux))),
        **fixed,
    ).best.config
    m = cfg.memory
    assert (m.quant, m.checkpointing, m.blocks_to_swap, m.token_chunks) == (
        pick.memory.quant,
        pick.memory.checkpointing,
        pick.memory.blocks_to_swap,
        pick.memory.token_chunks,
    )
    assert all(getattr(pick.memory, k) == v for k, v in fixed.items())


PLANNER = ("urae_lite.plan.search", "urae_lite.plan.estimate")


def _planner_modules_after_import(module: str) -> list[str]:
    """The planner modules a clean interpreter holds after importing `module` (and nothing else)."""
    code = f"import sys, json, {module}; print(json.dumps([m for m in {list(PLANNER)!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_command_modules_do_not_import_the_planner():
    """`--vram`'s options come from urae_lite.vram_options; the planner is imported only when it runs."""
    assert _planner_modules_after_import("urae_lite.plan.choose") == list(PLANNER)  # the check sees the planner
    for module in ("urae_lite.generate", "urae_lite.train_cli", "urae_lite.cli"):
        assert _planner_modules_after_import(module) == [], module
