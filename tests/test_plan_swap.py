"""The planner's model of block swap and token chunking (urae_lite/plan/swap.py, estimate.py, search.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import transformer_inputs
from plan_utils import best, plan_config

from urae_lite.errors import UraeError
from urae_lite.plan import estimate, expected_seconds
from urae_lite.plan.swap import SwapLayout, pass_windows, swapped_blocks, transfer_seconds

GiB = 2**30


@pytest.fixture(scope="module")
def arch():
    return plan_config().arch()


def test_layout_keeps_every_byte_once_plus_the_window(arch):
    per_block, adapters = arch.block_weight_bytes("nf4"), arch.block_adapter_params(32)
    for n in (0, 1, 2, 20, arch.n_blocks):
        swap = SwapLayout.of(arch, "nf4", n, 32)
        swapped = swapped_blocks(arch, n)
        assert len(swapped) == n and list(swapped) == list(per_block)[len(per_block) - n :]  # the last blocks
        assert swap.host == sum(per_block[b] + 2 * adapters[b] for b in swapped)  # adapters in bf16
        idle = swap.held(frozenset())
        assert idle.weights + sum(per_block[b] for b in swapped) == arch.weight_bytes("nf4")
        assert idle.adapters + sum(2 * adapters[b] for b in swapped) == 2 * arch.adapter_params(32)
        window = frozenset(swapped[-2:])
        assert swap.held(window).weights - idle.weights == sum(per_block[b] for b in window)


def _window_bytes(arch, quant: str, n: int, *blocks: str) -> int:
    """The transformer weights row with `n` blocks swapped and `blocks` of them on the device, counted from arch."""
    per_block = arch.block_weight_bytes(quant)
    resident = list(per_block)[: arch.n_blocks - n]
    return arch.other_params * 2 + sum(per_block[b] for b in (*resident, *blocks))


@pytest.mark.parametrize("task", ["generate", "train"])
def test_more_swapped_blocks_move_weights_from_the_card_to_host_memory(arch, task):
    extra = {"checkpointing": "on"} if task == "train" else {"offload": "none"}
    plans = [estimate(plan_config(task=task, blocks_to_swap=n, **extra)) for n in (0, 8, 28, arch.n_blocks)]
    peaks, hosts = [p.peak for p in plans], [p.host for p in plans]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] - peaks[-1] > 4 * GiB  # NF4 FLUX.1-dev is 5.8 GiB
    assert hosts == sorted(hosts) and hosts[0] == 0
    names = arch.block_names()  # every phase holds at most two neighbours (the last block's is the first)
    neighbours = {frozenset(names[i - 1 : i + 1]) for i in range(1, len(names))} | {frozenset((names[-1], names[0]))}
    windows = {_window_bytes(arch, "nf4", arch.n_blocks, *w) for w in neighbours | {frozenset((b,)) for b in names}}
    assert set(dict(plans[-1].rows)["transformer weights (nf4)"]) <= windows


def test_swap_phases_hold_the_window_the_mechanism_leaves_there(arch):
    """The goal plans with 56 blocks swapped (transformer_blocks.0 resident): the windows the fake-tensor
    measurement (benchmarks/results/memory_fake.json) sees at each phase's peak."""
    d, s = "transformer_blocks.", "single_transformer_blocks."
    gen = estimate(plan_config(width=4096, height=4096, quant="fp8", t5_quant="nf4", blocks_to_swap=56, token_chunks=4))
    # model offload moves the transformer off for the text encoders and the VAE (the window emptied); denoising
    # peaks in the last single block, beside the first swapped block it prefetches for the next step
    assert dict(gen.rows)["transformer weights (fp8)"] == (0, _window_bytes(arch, "fp8", 56, d + "1", s + "37"), 0)
    train = estimate(plan_config(task="train", quant="fp8", checkpointing="cpu", blocks_to_swap=56, adapter="lora"))
    assert dict(train.rows)["transformer weights (fp8)"] == (
        _window_bytes(arch, "fp8", 56, s + "0", s + "1"),  # forward: a single block and the next
        _window_bytes(arch, "fp8", 56, s + "0", d + "18"),  # backward runs down: single 0 prefetches double 18
        _window_bytes(arch, "fp8", 56, d + "1"),  # the backward ended on the first swapped block
        _window_bytes(arch, "fp8", 56, s + "37", d + "1"),  # validation: as a denoising step
        _window_bytes(arch, "fp8", 56, s + "37", d + "1"),  # what it leaves for the decode
    )


def test_swap_with_model_offload_moves_the_whole_transformer_off_between_steps(arch):
    plan = estimate(plan_config(blocks_to_swap=arch.n_blocks, offload="model"))
    weights = dict(plan.rows)["transformer weights (nf4)"]
    assert weights[0] == weights[2] == 0 and weights[1] > 0  # only denoising holds it
    plain = estimate(plan_config(offload="model"))  # host: the weights wait there, plus the swap's frozen slices
    assert plan.host - plain.host == 2 * arch.adapter_params(plan.config.adapter_rank)
    kept = estimate(plan_config(blocks_to_swap=arch.n_blocks, offload="none"))
    weights = dict(kept.rows)["transformer weights (nf4)"]  # offload none: the window the last step left stays
    last_and_first = _window_bytes(arch, "nf4", arch.n_blocks, "single_transformer_blocks.37", "transformer_blocks.0")
    assert weights[0] == weights[2] == last_and_first


# ---- the window against the mechanism --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_swap_model(tiny_config):
    """The tiny transformer (2 double + 2 single blocks) with a trainable LoRA and checkpointing, for training."""
    from urae_lite.loader import LoadSpec, adapted_layers, empty_transformer, fill_transformer
    from urae_lite.tiny import iter_random_transformer_tensors

    model = fill_transformer(
        empty_transformer(tiny_config),
        iter_random_transformer_tensors(tiny_config, seed=0),
        LoadSpec("bf16", torch.device("cpu"), torch.float32, progress=False),
    )
    for _, layer in adapted_layers(model):
        layer.add_lora("lora", 2, dtype=torch.float32)
    model.enable_gradient_checkpointing()
    return model


@pytest.mark.parametrize("n,every", [(1, 1), (3, 1), (4, 1), (3, 2), (4, 2), (3, 3), (4, 3)])
def test_windows_match_block_swap_on_every_block_of_every_pass(tiny_config, tiny_swap_model, n, every):
    """Which swapped blocks have device copies while each block (resident ones too) runs, in two denoising
    steps, then two training steps, on the real BlockSwap, against `pass_windows` carried from pass to pass;
    `every`: checkpoint segments (training's backward replays blocks, so the window pairs blocks differently)."""
    import copy

    from urae_lite.block_swap import block_names, enable_block_swap, execution_blocks
    from urae_lite.train.checkpoint_segments import enable_checkpoint_segments

    model = copy.deepcopy(tiny_swap_model)
    enable_checkpoint_segments(model, every)
    swap = enable_block_swap(model, n, "cpu")
    names = block_names(tiny_config["num_layers"], tiny_config["num_single_layers"])
    swapped = names[len(names) - n :]
    seen: list[tuple[str, frozenset]] = []
    for name, block in zip(names, execution_blocks(model)):  # after the swap's own hook: it sees the result
        block.register_forward_pre_hook(
            lambda _m, _a, name=name: seen.append(
                (name, frozenset(swapped[q] for q, b in enumerate(swap.blocks) if b.copies is not None))
            )
        )
    inputs = transformer_inputs(tiny_config, dtype=torch.float32)
    expected, held = [], frozenset()
    for kind in ("inference", "inference"):
        windows, held = pass_windows(names, swapped, kind, held, every)
        expected += windows
    with torch.no_grad():
        for _ in range(2):
            model(**inputs, return_dict=False)
    for _ in range(2):
        model(**inputs, return_dict=False)[0].square().mean().backward()
        for kind in ("forward", "backward"):
            windows, held = pass_windows(names, swapped, kind, held, every)
            expected += windows
    assert seen == expected
    assert held == frozenset(swapped[q] for q, b in enumerate(swap.blocks) if b.copies is not None)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"blocks_to_swap": 58}, "--blocks-to-swap must be from 0 .off. to 57"),
        ({"blocks_to_swap": 4, "offload": "group"}, "use it with --offload model or none, not group"),
        ({"task": "train", "blocks_to_swap": 4, "checkpointing": "off"}, "needs gradient checkpointing"),
        ({"token_chunks": 0}, "token_chunks must be a whole number of at least 1"),
    ],
)
def test_invalid_memory_options_are_one_clear_error(fields, message):
    with pytest.raises(UraeError, match=message):
        estimate(plan_config(**fields))


def test_copies_cost_time_only_where_compute_cannot_hide_them(arch):
    tok = plan_config(width=1024, height=1024).tokens()
    compute = {k: v / 58e12 for k, v in arch.block_flops(tok.image, tok.text).items()}
    slow_bus = transfer_seconds(arch, "bf16", 0, arch.n_blocks, 1e9, compute, (1.0,))
    fast_bus = transfer_seconds(arch, "bf16", 0, arch.n_blocks, 1e12, compute, (1.0,))
    assert slow_bus > 1.0 and fast_bus == 0.0
    hidden = {k: 10.0 for k in compute}  # seconds of compute per block: every copy hides behind it
    assert transfer_seconds(arch, "nf4", 16, 20, 22e9, hidden, (1.0, 3.0)) == 0.0


def test_speed_model_orders_swap_and_chunks():
    def seconds(**kw) -> float:
        return expected_seconds(plan_config(**kw))

    swaps = [seconds(width=1024, height=1024, offload="none", blocks_to_swap=n) for n in (0, 20, 57)]
    assert swaps == sorted(swaps) and swaps[0] < swaps[-1]
    chunks = [seconds(task="train", token_chunks=c) for c in (1, 4, 16)]
    assert chunks == sorted(chunks) and chunks[0] < chunks[1]


def test_the_search_streams_blocks_only_when_the_card_needs_it():
    roomy = best("train", 2048, 2048, 48, 24).best.config
    tight = best("train", 2048, 2048, 8, 24).best
    assert roomy.memory.blocks_to_swap == 0
    assert tight.config.memory.blocks_to_swap > 0 and tight.peak <= 8 * GiB and tight.estimate.host <= 24 * GiB


def test_ram_too_small_for_any_plan_says_what_the_best_plan_needs():
    result = best("train", 2048, 2048, 8, ram_gib=2)
    assert result.best is None and result.fits_card_only
    message = result.impossible()
    assert message.startswith("nothing fits in 8 GiB with 2 GiB of host memory for train at 2048x2048")
    fastest = result.fits_card_only[0]
    assert f"needs {fastest.estimate.host / GiB:.1f} GiB of host memory" in message
    with pytest.raises(UraeError, match="--ram must be a positive"):
        best("train", 2048, 2048, 8, ram_gib=0)
