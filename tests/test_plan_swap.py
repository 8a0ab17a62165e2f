"""The planner's model of block swap and FF chunking (urae_lite/plan/swap.py, estimate.py, search.py)."""

from __future__ import annotations

import pytest

from urae_lite.errors import UraeError
from urae_lite.plan import PlanConfig, best_config, estimate, expected_seconds
from urae_lite.plan.swap import WINDOW, split, swapped_blocks, transfer_seconds

GiB = 2**30


@pytest.fixture(scope="module")
def arch():
    return PlanConfig().arch()


def test_split_keeps_every_byte_once_plus_the_window(arch):
    per_block = arch.block_weight_bytes("nf4")
    total = sum(per_block.values())
    for n in (0, 1, 2, 20, arch.n_blocks):
        swapped = swapped_blocks(arch, n)
        assert len(swapped) == n and set(swapped) <= set(per_block)
        assert list(swapped) == list(per_block)[len(per_block) - n :]  # the last blocks in execution order
        s = split(per_block, swapped)
        window = sum(sorted((per_block[b] for b in swapped), reverse=True)[:WINDOW])
        assert s.device == total - s.host + window
        assert s.host == sum(per_block[b] for b in swapped)


@pytest.mark.parametrize("task", ["generate", "train"])
def test_more_swapped_blocks_move_weights_from_the_card_to_host_memory(arch, task):
    extra = {"checkpointing": "on"} if task == "train" else {"offload": "none"}
    plans = [estimate(PlanConfig(task=task, blocks_to_swap=n, **extra)) for n in (0, 8, 28, arch.n_blocks)]
    peaks, hosts = [p.peak for p in plans], [p.host for p in plans]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] - peaks[-1] > 4 * GiB  # NF4 FLUX.1-dev is 5.8 GiB
    assert hosts == sorted(hosts) and hosts[0] == 0
    weights = dict(plans[-1].rows)["transformer weights (nf4)"]
    largest_two = sum(sorted(arch.block_weight_bytes("nf4").values(), reverse=True)[:2])
    assert max(weights) == arch.other_params * 2 + largest_two  # only the window of swapped blocks is resident


def test_swap_with_model_offload_keeps_the_resident_part_through_every_phase(arch):
    plan = estimate(PlanConfig(blocks_to_swap=arch.n_blocks, offload="model"))
    weights = dict(plan.rows)["transformer weights (nf4)"]
    assert all(weights) and len(set(weights)) == 1  # text encoding, denoising and decode all hold it


@pytest.mark.parametrize(
    "config,message",
    [
        (PlanConfig(blocks_to_swap=58), "blocks_to_swap must be in 0..57"),
        (PlanConfig(blocks_to_swap=4, offload="group"), "use it with offload model or none"),
        (PlanConfig(task="train", blocks_to_swap=4, checkpointing="off"), "needs gradient checkpointing"),
        (PlanConfig(ff_chunks=0), "ff_chunks must be at least 1"),
    ],
)
def test_invalid_memory_options_are_one_clear_error(config, message):
    with pytest.raises(UraeError, match=message):
        estimate(config)


def test_copies_cost_time_only_where_compute_cannot_hide_them(arch):
    tok = PlanConfig(width=1024, height=1024).tokens()
    compute = {k: v / 58e12 for k, v in arch.block_flops(tok.image, tok.text).items()}
    slow_bus = transfer_seconds(arch, "bf16", 0, arch.n_blocks, 1e9, compute, (1.0,))
    fast_bus = transfer_seconds(arch, "bf16", 0, arch.n_blocks, 1e12, compute, (1.0,))
    assert slow_bus > 1.0 and fast_bus == 0.0
    hidden = {k: 10.0 for k in compute}  # seconds of compute per block: every copy hides behind it
    assert transfer_seconds(arch, "nf4", 16, 20, 22e9, hidden, (1.0, 3.0)) == 0.0


def test_speed_model_orders_swap_and_chunks():
    def seconds(**kw) -> float:
        return expected_seconds(PlanConfig(**kw))

    swaps = [seconds(width=1024, height=1024, offload="none", blocks_to_swap=n) for n in (0, 20, 57)]
    assert swaps == sorted(swaps) and swaps[0] < swaps[-1]
    chunks = [seconds(task="train", ff_chunks=c) for c in (1, 4, 16)]
    assert chunks == sorted(chunks) and chunks[0] < chunks[1]


def test_the_search_streams_blocks_only_when_the_card_needs_it():
    roomy = best_config("train", 2048, 2048, 48, 24).best.config
    tight = best_config("train", 2048, 2048, 8, 24).best
    assert roomy.blocks_to_swap == 0
    assert tight.config.blocks_to_swap > 0 and tight.peak <= 8 * GiB and tight.estimate.host <= 24 * GiB


def test_ram_too_small_for_any_plan_says_what_the_best_plan_needs():
    result = best_config("train", 2048, 2048, 8, ram_gib=2)
    assert result.best is None and result.fits_card_only
    message = result.impossible()
    assert message.startswith("nothing fits in 8 GiB with 2 GiB of host memory for train at 2048x2048")
    fastest = result.fits_card_only[0]
    assert f"needs {fastest.estimate.host / GiB:.1f} GiB of host memory" in message
    with pytest.raises(UraeError, match="--ram must be a positive"):
        best_config("train", 2048, 2048, 8, ram_gib=0)
