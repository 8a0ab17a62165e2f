"""MemorySettings: every memory setting declared once, checked once, and everything else derived from it (the
command-line options, the recipe keys, the planner's search space, the out-of-memory advice, the mechanisms)."""

from __future__ import annotations

import argparse

import pytest
import torch
from plan_utils import plan_config

from urae_lite import memory
from urae_lite.errors import UraeError
from urae_lite.memory import TASKS, MemorySettings, options, searched, spell
from urae_lite.plan import estimate
from urae_lite.quant import QUANT_FORMATS

N_BLOCKS = 57


def test_every_option_is_declared_completely():
    assert list(options()) == [f for f in MemorySettings.__dataclass_fields__]
    for name, option in options().items():
        assert option.help and set(option.tasks) <= set(TASKS) and set(option.searched) <= set(option.tasks), name
    for task in TASKS:
        space = MemorySettings.search_space(task, N_BLOCKS)
        assert list(space) == list(searched(task)) and space
        for name, values in space.items():  # every value the search tries is a valid setting
            assert values and all(getattr(MemorySettings(**{name: v}), name) == v for v in values), name
    assert MemorySettings.search_space("train", N_BLOCKS)["blocks_to_swap"][-1] == N_BLOCKS  # all of them, too


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"quant": "int3"}, f"unknown quantization 'int3': use one of {', '.join(QUANT_FORMATS)}"),
        ({"offload": "disk"}, "unknown offload 'disk': use one of none, model, group, sequential"),
        ({"t5_quant": "int4"}, "unknown t5_quant 'int4': use one of bf16, nf4"),
        ({"checkpointing": "sometimes"}, "unknown checkpointing 'sometimes': use one of on, off, cpu"),
        ({"vae_tiling": "yes"}, "unknown vae_tiling 'yes': use one of auto, on, off"),
        ({"blocks_to_swap": -1}, "blocks_to_swap must be a whole number of at least 0, got -1"),
        ({"token_chunks": 0}, "token_chunks must be a whole number of at least 1, got 0"),
        ({"token_chunks": True}, "token_chunks must be a whole number of at least 1, got True"),
        ({"checkpoint_every": 1.5}, "checkpoint_every must be a whole number of at least 1, got 1.5"),
        ({"vae_strip_rows": 0}, "vae_strip_rows must be a whole number of at least 1, got 0"),
    ],
)
def test_each_value_is_checked_on_construction(fields, message):
    with pytest.raises(UraeError, match=f"^{message}$"):
        MemorySettings(**fields)


@pytest.mark.parametrize(
    "task,fields,message",
    [
        ("generate", {"blocks_to_swap": 58}, "--blocks-to-swap must be from 0 (off) to 57"),
        ("train", {"blocks_to_swap": 58}, "memory.blocks_to_swap must be from 0 (off) to 57"),
        ("generate", {"blocks_to_swap": 4, "offload": "group"}, "--blocks-to-swap streams the transformer itself"),
        ("train", {"blocks_to_swap": 4, "checkpointing": "off"}, "memory.blocks_to_swap needs gradient checkpointing"),
        ("train", {"checkpoint_every": 2, "checkpointing": "off"}, "memory.checkpoint_every=2 thins out"),
        ("train", {"offload": "model"}, "memory.offload is not a train setting"),
        ("generate", {"checkpointing": "cpu"}, "--checkpointing is not a generate setting"),
    ],
)
def test_the_rules_between_settings_name_them_as_the_job_spells_them(task, fields, message):
    settings = MemorySettings(**fields)
    with pytest.raises(UraeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings.check(task, N_BLOCKS)
    assert not settings.valid(task, N_BLOCKS)


def test_valid_combinations_pass_and_the_rules_agree_with_valid():
    for task in TASKS:
        space = MemorySettings.search_space(task, 8)
        for name, values in space.items():
            for v in values:
                m = MemorySettings(**{name: v})
                try:
                    passes = m.check(task, 8) is m
                except UraeError:
                    passes = False
                assert m.valid(task, 8) == passes
    assert MemorySettings(blocks_to_swap=57, offload="model").check("generate", 57)
    assert MemorySettings(blocks_to_swap=57, checkpointing="cpu", checkpoint_every=3).check("train", 57)


def test_the_command_line_options_come_from_the_declaration():
    generate, plan = argparse.ArgumentParser(), argparse.ArgumentParser()
    MemorySettings.add_arguments(generate, ["generate"])
    MemorySettings.add_arguments(plan, TASKS)
    flags = {a.dest for a in generate._actions} - {"help"}
    assert flags == {n for n, o in options().items() if "generate" in o.tasks}
    assert {a.dest for a in plan._actions} - {"help"} == set(options())
    args = generate.parse_args(["--quant", "fp8", "--blocks-to-swap", "12", "--offload", "none"])
    assert MemorySettings.given(args) == {"quant": "fp8", "blocks_to_swap": 12, "offload": "none"}
    assert MemorySettings.given(generate.parse_args([])) == {}
    with pytest.raises(SystemExit):
        generate.parse_args(["--checkpointing", "cpu"])  # a training setting is not a generate option


def test_describe_is_read_back_by_the_job_that_spells_it(tiny_flux, tmp_path):
    from urae_lite.train.config import load_recipe

    picked = MemorySettings(quant="fp8", offload="none", t5_quant="nf4", blocks_to_swap=12, token_chunks=4)
    parser = argparse.ArgumentParser()
    MemorySettings.add_arguments(parser, ["generate"])
    back = MemorySettings.given(parser.parse_args(picked.describe("generate").split()))
    assert MemorySettings(**back) == picked
    trained = MemorySettings(quant="bf16", checkpointing="on", blocks_to_swap=3, token_chunks=4, checkpoint_every=2)
    overrides = trained.describe("train").split()
    assert memory.overridden(overrides) == set(trained.for_task("train"))
    required = ["data.dir=d", "output_dir=o", f"model={tiny_flux}"]
    recipe = load_recipe("recipes/train_4k_minor.yaml", [*required, "adapter.base_adapters=[a]", *overrides])
    assert recipe.memory == trained
    assert memory.recipe_overrides({"token_chunks": 4}) == ["memory.token_chunks=4"]
    assert (spell("token_chunks", "train"), spell("token_chunks", "generate")) == (
        "memory.token_chunks",
        "--token-chunks",
    )
    assert MemorySettings().describe("generate", skip_defaults=True) == "--quant nf4"


@pytest.mark.parametrize(
    "task,stage,phase",
    [("generate", "transformer", "denoising"), ("generate", "vae decode", "VAE decode"), ("train", None, "backward")],
)
def test_each_lighter_setting_lowers_the_planned_peak_of_its_stage(task, stage, phase):
    """The out-of-memory advice: every setting `lighter` names, one step from the current value, lowers the
    planner's bytes of the stage that ran out (or leaves them, for offload in a phase it does not touch)."""
    start = MemorySettings(quant="bf16", offload="none", vae_tiling="off", checkpointing="on")
    start = start.replace(checkpointing=MemorySettings().checkpointing) if task == "generate" else start
    start = start.replace(offload=None, vae_tiling="auto") if task == "train" else start
    cfg = plan_config(task=task, width=4096, height=4096, **start.for_task(task))
    tips = cfg.memory.lighter(task, N_BLOCKS, stage or "transformer")
    assert tips, "the heaviest settings must have lighter ones"
    base = dict(zip(estimate(cfg).phases, estimate(cfg).allocated()))[phase]
    lower = 0
    for name, value in tips.items():
        lighter = estimate(cfg.with_memory(**{name: value}))
        got = dict(zip(lighter.phases, lighter.allocated()))[phase]
        assert got <= base, (name, value, got, base)
        lower += got < base
    assert lower >= len(tips) - 1  # at most one tip (offload in a later phase) leaves this phase as it was
    fully = cfg.with_memory(**tips)
    assert not fully.memory.lighter(task, N_BLOCKS, stage or "transformer").keys() & {"quant", "token_chunks"}


def test_apply_puts_the_mechanisms_on_in_their_order(tiny_flux):
    """Token chunking (the block classes), checkpoint segments (training only), then block swap, on the device."""
    from urae_lite.block_swap import block_swap_of, execution_blocks
    from urae_lite.loader import load_transformer
    from urae_lite.token_chunking import ChunkedFluxSingleTransformerBlock
    from urae_lite.train.checkpoint_segments import SegmentCheckpointing

    model = load_transformer(tiny_flux, "bf16", progress=False)
    settings = MemorySettings(token_chunks=3, blocks_to_swap=2, checkpoint_every=2, checkpointing="cpu")
    memory.apply(model, settings, torch.device("cpu"), training=True)
    blocks = execution_blocks(model)
    assert isinstance(blocks[-1], ChunkedFluxSingleTransformerBlock) and blocks[-1].token_chunks == 3
    assert isinstance(model._gradient_checkpointing_func, SegmentCheckpointing)
    assert model._gradient_checkpointing_func.every == 2
    swap = block_swap_of(model)
    assert [b.module for b in swap.blocks] == blocks[-2:]
    inference = load_transformer(tiny_flux, "bf16", progress=False)
    memory.apply(inference, MemorySettings(blocks_to_swap=1), torch.device("cpu"))
    assert not inference.gradient_checkpointing and block_swap_of(inference) is not None
