"""Out of memory mid-run: the run re-plans, reconfigures the loaded model and goes on; it ends as a run with the
final settings from the start would (urae_lite.recovery). The out-of-memory errors are raised by the tests (a
forward pre-hook on a block, or a patched stage), never by a hook in the library."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_utils import RESOLUTION, make_dataset, recipe_overrides

import urae_lite
from urae_lite import pipeline as pipeline_module
from urae_lite.block_swap import block_swap_of, execution_blocks
from urae_lite.errors import UraeError
from urae_lite.memory import MemorySettings
from urae_lite.plan import PlanConfig
from urae_lite.plan.choose import replanner
from urae_lite.recovery import MAX_REPLANS, OutOfMemory, step_down
from urae_lite.train.cache import build_cache
from urae_lite.train.config import load_recipe
from urae_lite.train.loop import train

REPO = Path(__file__).resolve().parents[1]
CPU = dict(device="cpu", dtype=torch.float32, progress=False)
SMALL = dict(width=64, height=64, steps=2)
START = {"quant": "bf16", "offload": "none"}


def _oom_once(block: torch.nn.Module, when=lambda: True) -> list[int]:
    """A forward pre-hook that raises CUDA's out-of-memory error the first time `when()` holds (and counts it)."""
    raised = []

    def hook(module, args):
        if not raised and when():
            raised.append(1)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    block.register_forward_pre_hook(hook)
    return raised


def test_denoising_that_runs_out_goes_on_lighter_and_makes_the_same_image(tiny_flux, capsys, row_independent):
    pipe = urae_lite.load_pipeline(tiny_flux, memory=START, **CPU, **SMALL)
    raised = _oom_once(execution_blocks(pipe.transformer)[-1])
    result = pipe("a red fox", seed=4)
    final = step_down(MemorySettings(**START), OutOfMemory("generate", "denoise", "transformer", 4))
    assert raised and result.memory == final == pipe.memory
    assert (final.offload, final.blocks_to_swap, final.token_chunks) == ("model", 4, 4)
    out = capsys.readouterr().out
    assert "out of memory in denoise: re-plan 1 of 3, going on with --offload model --blocks-to-swap 4" in out
    assert block_swap_of(pipe.transformer) is not None and pipe.transformer.transformer_blocks[0].token_chunks == 4
    clean = urae_lite.load_pipeline(tiny_flux, memory=final.as_dict(), **CPU, **SMALL)("a red fox", seed=4)
    assert np.array_equal(np.asarray(result.image), np.asarray(clean.image))
    assert [name for name, _ in result.report.stages].count("denoise") == 2  # the stage ran again from its start


def test_a_decode_that_runs_out_tiles_and_makes_the_same_image(tiny_flux, monkeypatch, capsys):
    pipe = urae_lite.load_pipeline(tiny_flux, memory={**START, "vae_tiling": "off"}, **CPU, **SMALL)
    real, calls = pipeline_module.vae_decode, []

    def decode_once_short(*args, **kwargs):
        calls.append(kwargs["mode"])
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "vae_decode", decode_once_short)
    denoised = []
    real_denoise = pipe.denoise
    monkeypatch.setattr(pipe, "denoise", lambda *a, **k: denoised.append(1) or real_denoise(*a, **k))
    result = pipe("a cat", seed=2)
    assert calls == ["off", "on"] and len(denoised) == 1  # the latents are kept: only the decode ran again
    assert (
        result.memory.vae_tiling == "on" and "going on with --offload model --vae-tiling on" in capsys.readouterr().out
    )
    monkeypatch.undo()
    clean = urae_lite.load_pipeline(tiny_flux, memory=result.memory.as_dict(), **CPU, **SMALL)("a cat", seed=2)
    assert np.array_equal(np.asarray(result.image), np.asarray(clean.image))


def test_after_the_last_re_plan_the_run_stops_with_the_advice(tiny_flux, monkeypatch):
    pipe = urae_lite.load_pipeline(tiny_flux, memory=START, **CPU, **SMALL)
    plans = []

    def always_lighter(memory, oom):  # a replanner that always finds something: the count must stop it
        plans.append(memory)
        return memory.replace(vae_strip_rows=memory.vae_strip_rows + 1)

    pipe.replan = always_lighter

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(pipe, "denoise", oom)
    with pytest.raises(UraeError, match="^CUDA out of memory in stage 'denoise' at 64x64"):
        pipe("a cat")
    assert len(plans) == MAX_REPLANS


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_flux):
    folder = make_dataset(tmp_path_factory.mktemp("recovery") / "data")
    build_cache(folder, str(tiny_flux), RESOLUTION, max_sequence_length=32, progress=False)
    return folder


def _run(tiny_flux, data, out: Path, memory: dict, fail_at: int | None = None):
    extra = {"memory.quant": "bf16", "training.precision": "fp32", "training.steps": 3, "checkpoint.every": 3}
    extra["training.gradient_accumulation"] = 2  # the error comes in a step's second micro-step, after a backward
    extra |= {"optimizer.d0": 1e-3, **{f"memory.{k}": v for k, v in memory.items()}}
    cfg = load_recipe(REPO / "recipes" / "train_2k_lora.yaml", recipe_overrides(tiny_flux, data, out, **extra))
    import urae_lite.train.loop as loop_module

    raised, step, micro, build = [], [0], [0], loop_module.build_model
    micro_step = loop_module.Trainer.micro_step

    def counted_micro_step(self, sample):
        micro[0] += 1
        return micro_step(self, sample)

    def build_and_arm(*args, **kwargs):  # a block that raises once, in the second micro-step of step `fail_at`
        model = build(*args, **kwargs)
        raised.append(_oom_once(execution_blocks(model)[1], lambda: step[0] == fail_at and micro[0] == 2))
        return model

    def on_step(k: int) -> None:
        step[0], micro[0] = k, 0

    with pytest.MonkeyPatch.context() as mp:
        if fail_at is not None:
            mp.setattr(loop_module, "build_model", build_and_arm)
            mp.setattr(loop_module.Trainer, "micro_step", counted_micro_step)
        train(cfg, progress=False, on_step=on_step)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return cfg, raised, [r["loss"] for r in log], load_file(out / "adapter.safetensors")


def test_a_training_step_that_runs_out_runs_again_lighter_and_trains_the_same(
    tiny_flux, data, tmp_path, capsys, row_independent
):
    # token chunks change a gradient's summation order (equal up to rounding): start with them, so that the re-plan
    # changes only settings that are bit for bit the same (checkpointing on -> cpu, block swap)
    start = {"checkpointing": "on", "token_chunks": 4, "blocks_to_swap": 0}
    cfg, raised, losses, adapter = _run(tiny_flux, data, tmp_path / "a", start, fail_at=2)
    assert raised and raised[0] == [1]  # the error was raised, in step 2
    final = step_down(cfg_memory(start), OutOfMemory("train", "training step 2", "transformer", 4))
    assert cfg.memory == final and (final.checkpointing, final.token_chunks, final.blocks_to_swap) == ("cpu", 4, 4)
    out = capsys.readouterr().out
    assert "out of memory in training step 2: re-plan 1 of 3, going on with memory.blocks_to_swap=4" in out
    assert "memory.checkpointing=cpu" in out
    chosen = {k: getattr(final, k) for k in start}
    _, _, clean_losses, clean_adapter = _run(tiny_flux, data, tmp_path / "b", chosen)
    assert losses == clean_losses and len(losses) == 3
    assert adapter.keys() == clean_adapter.keys() and all(torch.equal(adapter[k], clean_adapter[k]) for k in adapter)


def cfg_memory(fields: dict) -> MemorySettings:
    return MemorySettings(quant="bf16", **fields)


def test_the_planner_re_plans_for_a_card_smaller_by_what_was_short():
    """With the device's numbers, the pick for a budget lowered by what the allocation was short of; the base format
    and what the user set stay. Without them (a CPU, a test), the library's step down."""
    job = PlanConfig(task="generate", width=4096, height=4096, memory=MemorySettings(quant="fp8", token_chunks=1))
    replan = replanner(job, {"token_chunks"}, ram_gib=24)
    short = OutOfMemory("generate", "denoise", "transformer", 57, short_bytes=4 * 2**30, card_bytes=24 * 2**30)
    new = replan(job.memory, short)
    assert new.quant == "fp8" and new.token_chunks == 1 and new != job.memory
    from urae_lite.plan import estimate

    assert estimate(job.replace(memory=new)).peak <= 20 * 2**30  # fits the card less what was missing
    unknown = OutOfMemory("generate", "denoise", "transformer", 57)
    assert replan(job.memory, unknown) == step_down(job.memory, unknown)


def test_vram_auto_is_the_default_on_cuda_unless_a_setting_is_given(tiny_flux, tmp_path, monkeypatch, capsys):
    """No memory setting on a CUDA machine: generate plans for the card's free memory and says so; a setting given
    on the command line wins (and nothing is planned around it without --vram)."""
    from urae_lite.cli import main
    from urae_lite.model_files import resolve_files
    from urae_lite.plan import best_config
    from urae_lite.plan.choose import model_fields, this_machine_ram_gib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 24 * 2**30))
    seen = {}

    def stop(files, **kwargs):
        seen.update(kwargs)
        raise UraeError("stopped before loading")

    monkeypatch.setattr(pipeline_module, "load_pipeline", stop)
    argv = ["generate", "a cat", "--model", str(tiny_flux), "--width", "1024", "--height", "1024"]
    assert main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    out = capsys.readouterr().out
    job = PlanConfig(task="generate", width=1024, height=1024, **model_fields(resolve_files(str(tiny_flux))))
    pick = best_config(job, 10, this_machine_ram_gib()).best.config.memory
    assert "--vram auto (10.0 GiB free): planner picks" in out and seen["memory"] == pick
    assert seen["device"] == torch.device("cuda") and seen["replan"] is not step_down
    assert main([*argv, "--quant", "bf16", "--out", str(tmp_path / "x.png")]) == 2
    assert "planner picks" not in capsys.readouterr().out and seen["memory"].quant == "bf16"


def test_settings_put_on_a_loaded_pipeline_meet_the_same_rules_as_loading(tiny_flux, tiny_config):
    """`reconfigure` (the recovery's and the page's path) refuses what `load_pipeline` refuses, and changes nothing."""
    pipe = urae_lite.load_pipeline(tiny_flux, memory=START, **CPU, **SMALL)
    n_blocks = tiny_config["num_layers"] + tiny_config["num_single_layers"]
    with pytest.raises(UraeError, match="blocks_to_swap|blocks-to-swap"):
        urae_lite.load_pipeline(tiny_flux, memory={**START, "blocks_to_swap": n_blocks + 1}, **CPU, **SMALL)
    with pytest.raises(UraeError, match="blocks_to_swap|blocks-to-swap"):
        pipe.reconfigure(MemorySettings(**START, blocks_to_swap=n_blocks + 1))
    assert pipe.memory == MemorySettings(**START).replace(offload=pipe.memory.offload)
    assert block_swap_of(pipe.transformer) is None
