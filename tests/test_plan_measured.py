"""The consumer-card goal plans and every shipped memory profile, measured on the fake-tensor harness.

test_plan_profiles.py checks that the profiles are the planner's picks; a pick is made among plans the planner says
fit, so that alone cannot fail when the planner is wrong. Here each plan runs through the real code (measure/fake.py:
the pipeline or the Trainer at full FLUX.1 width and the plan's resolution on fake tensors, live storage bytes
counted as CUDA would allocate them), and for every measured phase:

* measured / planner is within ±5% (`BAND`, the band benchmarks/memory.py --fake holds for all its rows), both for
  the configuration that ran and for the full plan;
* the full plan's measured bytes plus the planner's non-tensor terms (CUDA context, allocator reserve:
  `Estimate.totals`) fit the card.

Depth. A full-size step costs tens of seconds on fake tensors (per op, not per byte), so most plans run with 3
double and 4 single blocks instead of 19 and 38, at full width, resolution, rank, token chunks, checkpoint stride
and swap window; `measured_as` maps each plan to the configuration that runs and says why that checks the full plan.
Plans that differ only in how many blocks are resident run once. What the extra blocks of the full model hold is
counted on the harness's own fake blocks (`BlockBytes`): the full plan's measurement is the reduced one plus
those bytes.

Phases. Every phase is measured except a trailing validation pass or exact tiled VAE decode that the planner puts
so far below the peak that it could not set it while within the band (`phases_needed`): they cost the most to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from plan_utils import goal_config, recipe_plan_config

from urae_lite.flux_configs import flux_dev_config
from urae_lite.measure.fake import (
    LiveBytes,
    fake_frozen_lora,
    fake_mode,
    fake_pipeline,
    fake_training_model,
    fake_transformer,
    forget_fake_workspaces,
    measure_generate,
    measure_train,
    module_tensors,
    prodigy_state_bytes,
    train_recipe,
)
from urae_lite.memory import recipe_overrides
from urae_lite.plan import PlanConfig, estimate
from urae_lite.plan import constants as C
from urae_lite.plan.profiles import shipped_jobs, shipped_profiles

GiB = 2**30
BAND = 0.05
# The goals: 2K LoRA training and 4K generation (2K + converted 4K adapter, rank 48) in 8 GiB, 4K minor-component
# training in 12 GiB, each in a desktop with 24 GiB of host memory for what the plan parks there.
GOALS = (("train", 2048, 8), ("train", 4096, 12), ("generate", 4096, 8))
KINDS = ("double", "single")  # block_swap.BLOCK_LISTS order: the double blocks run first
# The depth the measurements run at. Three double blocks and four single ones keep every structure the full model's
# peaks come from (see `measured_as`): resident and swapped blocks of each kind, two swapped neighbours of a kind,
# the double -> single junction inside one checkpoint segment of 2 (blocks 2 and 3), and an odd block count whose
# last segment is one block, as 57 blocks have.
REDUCED = {"double": 3, "single": 4}
# Phases that end a run and cost the most to measure: an exact tiled VAE decode takes seconds on fake tensors
# (its working set is checked on its own at full size: test_memory_fake.py::test_tiled_decode_working_set_at_full_size),
# a validation pass as much as the forward.
SKIPPABLE = ("VAE decode", "validation", "val. decode")


# ---- the plans --------------------------------------------------------------------------------------------------
def profile_config(job, settings: dict) -> PlanConfig:
    """A shipped `profiles:` entry (as the YAML file says it) applied to its preset's or recipe's job."""
    whole = ("blocks_to_swap", "token_chunks", "checkpoint_every")
    fields = {k: int(v) if k in whole else str(v) for k, v in settings.items()}
    return job.config.with_memory(**fields)


def resolved(cfg: PlanConfig, card: int) -> PlanConfig:
    """`cfg` with what the card leaves open spelled out: the adapter rank, and the VAE tiling `auto` resolves to on
    this card (the decode estimate equals the tiled or the plain one)."""
    cfg = cfg.replace(rank=cfg.adapter_rank)
    if cfg.task == "generate" and cfg.memory.vae_tiling == "auto":
        decode = estimate(cfg, card).allocated()[-1]
        modes = [m for m in ("on", "off") if estimate(cfg.with_memory(vae_tiling=m)).allocated()[-1] == decode]
        assert len(modes) == 1, modes
        cfg = cfg.with_memory(vae_tiling=modes[0])
    return cfg


@dataclass(frozen=True)
class Plan:
    names: tuple[str, ...]  # the goals and profiles that are this plan
    card: int  # GiB
    config: PlanConfig  # full FLUX.1; rank and VAE tiling resolved


def all_plans() -> list[Plan]:
    """The goal plans and every shipped profile, one entry per distinct (configuration, card)."""
    named = [(f"goal-{t}-{r}-{v}gib", v, goal_config(t, r, v)) for t, r, v in GOALS]
    for job in shipped_jobs():
        for card, settings in shipped_profiles(job).items():
            named.append((f"{job.file.stem}-{card}gib", card, profile_config(job, settings)))
    plans: dict[tuple, list[str]] = {}
    for name, card, cfg in named:
        plans.setdefault((resolved(cfg, card), card), []).append(name)
    return [Plan(tuple(names), card, cfg) for (cfg, card), names in plans.items()]


PLANS = all_plans()


# ---- the configuration that runs --------------------------------------------------------------------------------
def swapped_per_kind(blocks_to_swap: int, depth: dict[str, int]) -> dict[str, int]:
    """Block swap takes the last blocks in execution order: single blocks first, then double ones."""
    single = min(blocks_to_swap, depth["single"])
    return {"double": blocks_to_swap - single, "single": single}


def full_depth(cfg: PlanConfig) -> dict[str, int]:
    config = flux_dev_config(cfg.variant)
    return {"double": config["num_layers"], "single": config["num_single_layers"]}


def measured_as(cfg: PlanConfig) -> PlanConfig:
    """The configuration that runs for the full plan `cfg`: full width, resolution, rank, precision, offload, token
    chunks and checkpointing, fewer blocks, and per block kind the swap's structure kept (none, all, or two
    swapped beside at least one resident).

    Why the reduced run checks the full plan. Within a phase the planner's bytes are (plan/estimate.py, swap.py):
    what does not depend on the depth (text encoders, VAE, the parameters outside the blocks, the batch, the
    kernels' buffer), plus one block's activations at the phase's worst moment (activations.py: per block kind, at
    full width and token count), plus the swap window held then (the largest window of two neighbouring blocks
    while a block of that kind runs, swap.py), plus per resident block its frozen weights and adapter slices, and
    in training per block its fp32 trainable factors, their gradients and Prodigy's states. With checkpointing
    `cpu` only two block inputs are on the device whatever the depth. Every depth-dependent part is therefore a
    count of blocks times bytes per block, which `BlockBytes` counts on the harness's own fake blocks, and the
    windows are the same sets of block kinds when each kind has none, all, or two of its blocks swapped beside a
    resident one (2 neighbours: the largest window; the last swapped block and the first again: the window a pass
    leaves). So the reduced run measures every per-block term and the window at the same moment as the full one,
    and the remaining blocks add what `BlockBytes` counts: exactly their weights, trainable factors and states;
    their gradients all exist only once the backward is over, so adding them to the backward's peak can only
    overstate it (by under 0.1 GiB: rank-16 factors in fp32), never hide a plan that does not fit. Checkpointing
    `on` or `off` keeps a block input (or all saved tensors) per block on the device, freed one by one in backward:
    where the peak falls then depends on the depth, so those plans run at full depth (with two double blocks
    swapped when some are).
    """
    depth = full_depth(cfg)
    keep_depth = cfg.task == "train" and cfg.memory.checkpointing != "cpu"
    run = depth if keep_depth else REDUCED
    swapped = swapped_per_kind(cfg.memory.blocks_to_swap, depth)
    reduced = {k: 0 if s == 0 else run[k] if s == depth[k] else min(s, 2) for k, s in swapped.items()}
    config = {**flux_dev_config(cfg.variant), "num_layers": run["double"], "num_single_layers": run["single"]}
    return cfg.replace(transformer_config=config).with_memory(blocks_to_swap=sum(reduced.values()))


def depth_of(cfg: PlanConfig) -> dict[str, int]:
    config = cfg.transformer_config or flux_dev_config(cfg.variant)
    return {"double": config["num_layers"], "single": config["num_single_layers"]}


def key(cfg: PlanConfig) -> tuple:
    """PlanConfig equality leaves out transformer_config: the depth is part of what ran."""
    return cfg, tuple(depth_of(cfg).values())


def planned(cfg: PlanConfig) -> dict[str, int]:
    est = estimate(cfg)
    return dict(zip(est.phases, est.allocated()))


def phases_needed(plan: Plan) -> int:
    """How many of the plan's phases to measure: all but the trailing validation and decodes (SKIPPABLE) that the
    planner puts so far below its peak that, even measured at the top of the band, they would stay under the lowest
    value the band allows for the peak phase."""
    phases = planned(plan.config)
    low = max(phases.values()) * (1 - BAND)
    names = list(phases)
    while names[-1] in SKIPPABLE and phases[names[-1]] * (1 + BAND) <= low:
        names.pop()
    return len(names)


# ---- measuring ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockBytes:
    """Device bytes one block of a kind adds to a phase, counted by the harness on its own fake blocks: the frozen
    weights and adapter slices (only while the block is resident), and in training its trainable fp32 factors,
    their Prodigy states and, in backward and the optimizer step, their gradients (whether swapped or not)."""

    frozen: dict[str, int]
    trainable: dict[str, int]
    states: dict[str, int]


def _held(tensors) -> int:
    tracker = LiveBytes()
    tracker.hold(tensors)
    return tracker.current


def _one_of_each(cfg: PlanConfig) -> dict:
    return {**(cfg.transformer_config or flux_dev_config(cfg.variant)), "num_layers": 1, "num_single_layers": 1}


def _blocks(model) -> dict:
    return {"double": model.transformer_blocks[0], "single": model.single_transformer_blocks[0]}


def train_overrides(cfg: PlanConfig) -> tuple[str, ...]:
    names = ("checkpointing", "blocks_to_swap", "token_chunks", "checkpoint_every")
    return tuple(recipe_overrides({n: getattr(cfg.memory, n) for n in names}))


def block_bytes(cfg: PlanConfig) -> BlockBytes:
    with fake_mode():
        if cfg.task == "generate":
            model = fake_transformer(_one_of_each(cfg), cfg.memory.quant)
            fake_frozen_lora(model, "urae", cfg.adapter_rank)
            frozen = {k: _held(module_tensors(b)) for k, b in _blocks(model).items()}
            return BlockBytes(frozen, dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0))
        recipe = train_recipe(cfg.width, cfg.memory.quant, (*train_overrides(cfg.with_memory(blocks_to_swap=0)),))
        model = fake_training_model(recipe, _one_of_each(cfg))
        blocks = _blocks(model)
        frozen = {k: _held(t for t in module_tensors(b) if not t.requires_grad) for k, b in blocks.items()}
        trainable = {k: _held(p for p in b.parameters() if p.requires_grad) for k, b in blocks.items()}
        states = {k: prodigy_state_bytes(b, recipe) for k, b in blocks.items()}
    return BlockBytes(frozen, trainable, states)


def run_phases(cfg: PlanConfig, count: int) -> dict[str, int]:
    """Peak live device bytes of the first `count` phases of `cfg` (its transformer_config's depth) on the
    fake-tensor harness."""
    assert cfg.width == cfg.height
    try:
        with fake_mode():
            if cfg.task == "generate":
                pipe = fake_pipeline(cfg.memory, cfg.adapter_rank, config=cfg.transformer_config)
                phases = measure_generate(pipe, cfg.width, cfg.variant, count > 2)
            else:
                recipe = train_recipe(cfg.width, cfg.memory.quant, train_overrides(cfg))
                # the recipe that runs is the plan's job (adapter, rank, optimizer, validation), read independently
                assert recipe_plan_config(recipe) == cfg.replace(transformer_config=None), recipe_plan_config(recipe)
                phases, _ = measure_train(recipe, cfg.width, cfg.transformer_config, count > 3, count > 4)
    finally:
        forget_fake_workspaces()
    assert len(phases) == count
    return {p.name: p.peak for p in phases}


@pytest.fixture(scope="module")
def measure():
    """Runs each distinct configuration once, as far as any plan it stands for needs."""
    import urae_lite.kernels  # noqa: F401  (registers the custom ops)

    if not hasattr(torch.ops.urae_lite, "lowrank_forward"):
        pytest.skip("torch.ops.urae_lite custom ops are not registered")
    needed: dict[tuple, int] = {}
    for plan in PLANS:
        k = key(measured_as(plan.config))
        needed[k] = max(needed.get(k, 0), phases_needed(plan))
    runs: dict[tuple, dict[str, int]] = {}
    blocks: dict[tuple, BlockBytes] = {}

    def get(cfg: PlanConfig) -> tuple[dict[str, int], BlockBytes]:
        k = key(cfg)
        if k not in runs:
            runs[k] = run_phases(cfg, needed[k])
        b = key(cfg.replace(transformer_config=None).with_memory(blocks_to_swap=0))
        if b not in blocks:
            blocks[b] = block_bytes(cfg)
        return runs[k], blocks[b]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("URAE_LITE_KERNELS", "on")  # the fused path a GPU runs (the custom ops' fake implementations)
        yield get


def added_bytes(full: PlanConfig, ran: PlanConfig, blocks: BlockBytes) -> dict[str, int]:
    """Per phase, what the full plan's extra blocks hold on the device beyond the configuration that ran."""
    n_full, n_ran = depth_of(full), depth_of(ran)
    resident = {
        k: (n_full[k] - swapped_per_kind(full.memory.blocks_to_swap, n_full)[k])
        - (n_ran[k] - swapped_per_kind(ran.memory.blocks_to_swap, n_ran)[k])
        for k in KINDS
    }
    extra = {k: n_full[k] - n_ran[k] for k in KINDS}
    out = {}
    for phase in estimate(full).phases:
        if full.task == "generate":  # `model` offload: the transformer is on the device while it denoises only
            on_device = full.memory.offload == "none" or phase == "denoising"
            out[phase] = sum(resident[k] * blocks.frozen[k] for k in KINDS) if on_device else 0
        else:
            grads = phase in ("backward", "optimizer step")
            out[phase] = sum(
                resident[k] * blocks.frozen[k] + extra[k] * (blocks.trainable[k] * (1 + grads) + blocks.states[k])
                for k in KINDS
            )
    return out


def fits(allocated: float) -> float:
    """The card bytes an allocated peak needs: the planner's allocator reserve and CUDA context on top."""
    return allocated * (1 + C.ALLOCATOR_RESERVE) + C.CUDA_CONTEXT


@pytest.mark.parametrize("plan", PLANS, ids=["+".join(p.names) for p in PLANS])
def test_plan_measured_fits_its_card(plan: Plan, measure, capsys):
    ran = measured_as(plan.config)
    measured, blocks = measure(ran)
    want_full, want_ran = planned(plan.config), planned(ran)
    added = added_bytes(plan.config, ran, blocks)
    assert list(measured) == list(want_full)[: len(measured)] and len(measured) >= phases_needed(plan)
    assert max(want_full, key=want_full.get) in measured  # the planner's peak phase ran
    ratios = {p: (measured[p] / want_ran[p], (measured[p] + added[p]) / want_full[p]) for p in measured}
    peak = max(measured[p] + added[p] for p in measured)
    with capsys.disabled():
        print(
            f"\n{'+'.join(plan.names)}: {plan.config.summary()}, run with {sum(depth_of(ran).values())} blocks "
            f"({ran.memory.blocks_to_swap} swapped); measured/planner "
            + ", ".join(f"{p} {a:.3f} (full {b:.3f})" for p, (a, b) in ratios.items())
            + f"; needs {fits(peak) / GiB:.2f} of {plan.card} GiB"
        )
    assert all(abs(r - 1) <= BAND for pair in ratios.values() for r in pair), ratios
    assert fits(peak) <= plan.card * GiB, (fits(peak) / GiB, plan.card)
