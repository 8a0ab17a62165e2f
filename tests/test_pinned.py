"""Pinned host memory: torch's rounding rule, the setting that makes sizes exact (urae_lite/pinned.py), and the
planner's host figure against what the code pins.

What the code pins: block swap's host copies (one pinned tensor per frozen tensor of a swapped block) and, with
checkpointing `cpu`, every tensor `save_on_cpu(pin_memory=True)` saves. Both are taken from the real code on fake
tensors at full FLUX.1 width and resolution (measure/fake.py): the swap's host copies from the model as the loader
or the trainer builds it, the saved tensors from a training step through `Trainer.forward_loss` with `save_on_cpu`
recording each copy it makes (what is still alive at the step's peak counts). Each request costs what torch's
caching host allocator reserves for it (`pinned_bytes`, under the rule in force after `exact_pinned_sizes`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from unittest import mock

import pytest
import torch
from plan_utils import goal_config, recipe_plan_config

from urae_lite import pinned
from urae_lite.block_swap import block_swap_of, execution_blocks
from urae_lite.flux_configs import flux_dev_config
from urae_lite.measure import fake, fake_cuda
from urae_lite.measure.fake import (
    HOST,
    fake_mode,
    fake_pipeline,
    fake_training_model,
    forget_fake_workspaces,
    measure_train,
    train_recipe,
)
from urae_lite.memory import recipe_overrides
from urae_lite.plan import PlanConfig, estimate
from urae_lite.plan.profiles import HOST_RAM_GIB

GiB, MiB = 2**30, 2**20


def power_of_two_ceil(n: int) -> int:
    """llvm::PowerOf2Ceil, as CachingHostAllocator::allocate applies it (written independently of pinned.py)."""
    return 2 ** math.ceil(math.log2(n))


@pytest.fixture
def fresh(monkeypatch):
    """pinned.py as in a new process: the setting not tried yet."""
    monkeypatch.setattr(pinned, "_applied", None)


class Settings:
    """torch's allocator settings string as `_accelerator_getAllocatorSettings` / `_accelerator_setAllocatorSettings`
    see it: the last string set (or the environment's); `fail` stands for a torch that refuses the key."""

    def __init__(self, text: str = "", fail: bool = False):
        self.text, self.fail, self.sets = text, fail, []

    def get(self) -> str:
        return self.text

    def set(self, text: str) -> None:
        self.sets.append(text)
        if self.fail:
            raise ValueError("Unrecognized key 'pinned_max_round_threshold_mb' in Accelerator allocator config.")
        self.text = text

    def install(self, monkeypatch) -> Settings:
        monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", self.get)
        monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", self.set)
        return self


# ---- the rule ---------------------------------------------------------------------------------------------------
SIZES = [1, 3, 4096, 9 * MiB, 3072 * 3072 + 3072 * 4, 16 * MiB, 384 * MiB, 384 * MiB + 1]


@pytest.mark.parametrize(
    "settings,limit",
    [
        ("", None),  # torch's default: every request rounded
        ("max_split_size_mb:512,pinned_max_round_threshold_mb:64", 64 * MiB),  # rounded up to the threshold
        ("pinned_max_cached_size_mb:8", 8 * MiB),  # above the cache limit: neither cached nor rounded
        ("pinned_max_round_threshold_mb:0", 0),  # exact
    ],
)
def test_pinned_bytes_follow_the_host_allocators_rule(monkeypatch, fresh, settings, limit):
    Settings(settings).install(monkeypatch)
    for n in SIZES:
        want = power_of_two_ceil(n) if limit is None or n <= limit else n
        assert pinned.pinned_bytes(n) == want, n
        assert pinned.pinned_bytes(n, exact=True) == n
        assert pinned.pinned_bytes(n, exact=False) == power_of_two_ceil(n)
    assert pinned.pinned_bytes(0) == 0


def test_exact_sizes_keep_the_other_settings_and_apply_once(monkeypatch, fresh):
    """Setting the allocator's string resets max_split_size, roundup_power2_divisions and the garbage collection
    threshold unless it names them (AcceleratorAllocatorConfig::parseArgs): the user's settings are sent again."""
    user = "max_split_size_mb:512,garbage_collection_threshold:0.6"
    settings = Settings(user).install(monkeypatch)
    assert pinned.pinned_bytes(9 * MiB) == 16 * MiB
    assert pinned.exact_pinned_sizes() and pinned.exact_pinned_sizes()
    assert settings.sets == [f"{user},pinned_max_round_threshold_mb:0"]
    assert pinned.pinned_bytes(9 * MiB) == 9 * MiB
    settings.text = "expandable_segments:True"  # set later by someone else: the threshold stays where it was
    assert pinned.pinned_bytes(9 * MiB) == 9 * MiB

    monkeypatch.setattr(pinned, "_applied", None)
    already = Settings("pinned_max_round_threshold_mb:0").install(monkeypatch)
    assert pinned.exact_pinned_sizes() and already.sets == []


def test_a_torch_that_cannot_warns_once_and_keeps_rounding(monkeypatch, fresh, caplog):
    settings = Settings("", fail=True).install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="urae_lite.pinned"):
        assert not pinned.exact_pinned_sizes() and not pinned.exact_pinned_sizes()
    assert len(settings.sets) == 1 and len(caplog.records) == 1
    assert "up to twice the host memory the plan counts" in caplog.records[0].getMessage()
    assert pinned.pinned_bytes(9 * MiB) == 16 * MiB

    monkeypatch.delattr(torch._C, "_accelerator_setAllocatorSettings")  # an older torch
    monkeypatch.setattr(pinned, "_applied", None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="urae_lite.pinned"):
        assert not pinned.exact_pinned_sizes()
    assert len(caplog.records) == 1


def test_this_torch_takes_the_setting(fresh):
    """The real allocator settings of this torch (it only parses them without a GPU; the threshold it sets is what
    CachingHostAllocator::allocate reads on every request)."""
    assert pinned.exact_pinned_sizes()
    assert "pinned_max_round_threshold_mb:0" in torch._C._accelerator_getAllocatorSettings()
    assert pinned.pinned_bytes(384 * MiB + 1) == 384 * MiB + 1


# ---- the goals: the planner's host figure against what the code pins --------------------------------------------
GOALS = (("train", 2048, 8), ("train", 4096, 12), ("generate", 4096, 8))
# Depth of the training runs: every block's checkpoint call saves the same tensors at checkpoint_every 1 (checked
# below), so three double and four single blocks show what each block and what the rest of the model pin.
REDUCED = {"num_layers": 3, "num_single_layers": 4}


class PinnedSaves:
    """`save_on_cpu(pin_memory=True)` as on a GPU (saved tensors to uncounted host memory, back to the device in
    backward), recording each pinned copy: its bytes, the block whose checkpoint call made it in the forward (None:
    outside the blocks; "backward": made in backward); and what torch's caching host allocator holds for them
    (`reserved`): a request takes a freed block of its power-of-two bucket that fits (the most recently freed first,
    CachingHostAllocator::get_free_block) or a new one of `pinned_bytes` of it, and a copy's block returns to its
    bucket when autograd drops the copy. The copy events the allocator waits for before it reuses a block are
    taken as done: the GPU finished with a saved tensor before backward frees it."""

    def __init__(self):
        self.requests: list[tuple[int, tuple, object]] = []  # (bytes, (shape, dtype), where)
        self.reserved = 0
        self._free: dict[int, list[int]] = {}  # bucket -> sizes of free blocks
        self._pending: list[int] = []  # requests since the last block entry of the forward

    @contextlib.contextmanager
    def save_on_cpu(self, pin_memory: bool = False, device_type: str = "cuda"):
        def pack(t: torch.Tensor):
            host = t.to(HOST)
            nbytes = t.numel() * t.element_size()
            backward = torch._C._current_graph_task_id() != -1
            self.requests.append((nbytes, (tuple(t.shape), t.dtype), "backward" if backward else None))
            if not backward:
                self._pending.append(len(self.requests) - 1)
            weakref.finalize(host, self._freed, self._allocate(pinned.pinned_bytes(nbytes)))
            return t.device, host

        def unpack(packed):
            device, t = packed
            return t.to(device)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def _allocate(self, size: int) -> int:
        free = self._free.setdefault((size - 1).bit_length(), [])
        for i in reversed(range(len(free))):
            if free[i] >= size:
                return free.pop(i)
        self.reserved += size
        return size

    def _freed(self, block: int) -> None:
        self._free.setdefault((block - 1).bit_length(), []).append(block)

    def entering(self, index: int) -> None:
        """A block's forward starts: the requests since the last one are its checkpoint call's."""
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            for i in self._pending:
                self.requests[i] = (*self.requests[i][:2], index)
            self._pending = []

    def by_block(self) -> dict:
        out: dict = {}
        for nbytes, key, where in self.requests:
            out.setdefault(where, []).append((key, nbytes))
        return out


def record_saves(cfg: PlanConfig, monkeypatch) -> PinnedSaves:
    """One training step of `cfg` (its transformer_config's depth) through `Trainer.forward_loss` on fake tensors,
    with save_on_cpu's pinned copies recorded."""
    saves = PinnedSaves()
    names = ("checkpointing", "blocks_to_swap", "token_chunks", "checkpoint_every")
    recipe = train_recipe(
        cfg.width, cfg.memory.quant, tuple(recipe_overrides({n: getattr(cfg.memory, n) for n in names}))
    )
    assert recipe_plan_config(recipe) == cfg.replace(transformer_config=None)  # the plan's job is the recipe's

    def model_with_hooks(recipe, config=None):
        model = fake_training_model(recipe, config)
        for i, block in enumerate(execution_blocks(model)):
            block.register_forward_pre_hook(lambda _m, _a, i=i: saves.entering(i))
        return model

    monkeypatch.setattr(fake, "fake_training_model", model_with_hooks)
    monkeypatch.setattr(
        fake_cuda,
        "host_saved_tensors",
        lambda: mock.patch.object(torch.autograd.graph, "save_on_cpu", saves.save_on_cpu),
    )
    monkeypatch.setenv("URAE_LITE_KERNELS", "on")  # the fused path a GPU runs (the custom ops' fake implementations)
    try:
        with fake_mode():
            measure_train(recipe, cfg.width, cfg.transformer_config, validation=False, decode=False)
    finally:
        forget_fake_workspaces()
    return saves


def swap_host_copies(cfg: PlanConfig) -> list[int]:
    """Bytes of each host copy block swap pins for `cfg`, on the model the trainer or the pipeline builds."""
    with fake_mode():
        if cfg.task == "generate":
            model = fake_pipeline(cfg.memory, cfg.adapter_rank, config=cfg.transformer_config).transformer
        else:
            names = ("checkpointing", "blocks_to_swap", "token_chunks", "checkpoint_every")
            overrides = tuple(recipe_overrides({n: getattr(cfg.memory, n) for n in names}))
            model = fake_training_model(train_recipe(cfg.width, cfg.memory.quant, overrides), cfg.transformer_config)
        swap = block_swap_of(model)
        assert swap is not None and len(swap.blocks) == cfg.memory.blocks_to_swap
        return [h.numel() * h.element_size() for b in swap.blocks for h in b.host]


@pytest.mark.parametrize("goal", GOALS, ids=[f"{t}-{r}-{v}gib" for t, r, v in GOALS])
def test_planners_host_figure_is_what_the_code_pins(goal, monkeypatch, capsys):
    assert pinned.exact_pinned_sizes()  # what block swap and the trainer apply before they pin
    cfg = goal_config(*goal)
    plan = estimate(cfg)
    copies = swap_host_copies(cfg)
    saves: list[int] = []
    if cfg.task == "train":
        assert cfg.memory.checkpointing == "cpu" and cfg.memory.checkpoint_every == 1
        full = flux_dev_config(cfg.variant)
        ran = cfg.replace(transformer_config={**full, **REDUCED}).with_memory(
            blocks_to_swap=min(2, cfg.memory.blocks_to_swap)
        )
        saved = record_saves(ran, monkeypatch)
        blocks = saved.by_block()
        per_block = blocks[0]
        n_ran, n_full = sum(REDUCED.values()), full["num_layers"] + full["num_single_layers"]
        # Why the reduced run gives the full one: at checkpoint_every 1 each block's checkpoint call saves its own
        # inputs (hidden and encoder states, temb), the same shapes whatever the block's kind or place (checked
        # here on every block); outside the blocks the saved tensors are the final norm's and projection's, which
        # do not depend on the depth; backward pins nothing (each checkpoint's inputs come back from host memory).
        # Block swap changes no saved tensor: a block's own saved tensors go through checkpoint's inner hooks.
        assert sorted(blocks, key=str) == sorted([*range(n_ran), None], key=str)
        assert all(blocks[i] == per_block for i in range(n_ran)) and len(per_block) == 3
        assert saved.reserved == sum(pinned.pinned_bytes(n) for n, _, _ in saved.requests)  # no reuse in a step
        saves = [n for _, n in blocks[None]] + [n for _ in range(n_full) for _, n in per_block]
    code = sum(pinned.pinned_bytes(n) for n in copies + saves)
    rounded = sum(pinned.pinned_bytes(n, exact=False) for n in copies + saves)
    true_host = plan.host - plan.pinned + code
    with capsys.disabled():
        print(
            f"\n{goal}: {cfg.summary()}: pinned by the code {code / GiB:.2f} GiB ({len(copies)} swap copies "
            f"{sum(copies) / GiB:.2f}, {len(saves)} saved tensors {sum(saves) / GiB:.2f}), planner "
            f"{plan.pinned / GiB:.2f} of host {plan.host / GiB:.2f}; true host {true_host / GiB:.2f} GiB; "
            "power-of-two sizes: "
            f"{(plan.host - plan.pinned + rounded) / GiB:.2f} GiB"
        )
    # The planner counts each tensor the code pins at its bytes; what it leaves out is the page granularity of
    # cudaHostAlloc (under 4 KiB per request, ~2,000 requests: < 10 MiB, under 0.1% of these figures).
    assert abs(code - plan.pinned) <= 0.01 * plan.pinned, (code, plan.pinned)
    assert true_host <= HOST_RAM_GIB * GiB


@pytest.mark.parametrize("double,single,every", [(3, 4, 1), (3, 4, 2), (3, 4, 3), (3, 3, 3), (3, 5, 4)])
def test_planner_counts_what_checkpoint_segments_pin(monkeypatch, double, single, every):
    """With `checkpoint_every` k only the segment starts' inputs are saved, plus one input a replay keeps in
    backward: on top of the others when the last segment has 3 blocks or more (6 blocks in 3s, 8 in 4s), in the
    block the last segment freed otherwise (7 blocks in 3s: the last segment is one block). At 1024² (full width),
    the planner at the same depth against the allocator's blocks for the step's requests."""
    assert pinned.exact_pinned_sizes()
    names = ("checkpointing", "blocks_to_swap", "token_chunks", "checkpoint_every")
    memory = {"checkpointing": "cpu", "blocks_to_swap": 0, "token_chunks": 1, "checkpoint_every": every}
    recipe = train_recipe(1024, "nf4", tuple(recipe_overrides({n: memory[n] for n in names})))
    config = {**flux_dev_config(), "num_layers": double, "num_single_layers": single}
    cfg = recipe_plan_config(recipe).replace(transformer_config=config)
    saved = record_saves(cfg, monkeypatch)
    in_backward = [key for _, key, where in saved.requests if where == "backward"]
    assert bool(in_backward) == (every >= 3)  # segments of 3 or more keep inputs in backward
    inputs = {key for key, _ in saved.by_block()[0][:2]}  # a block's hidden and encoder states (then temb)
    assert set(in_backward) <= inputs
    # exact: the planner counts every saved tensor at its bytes, and the allocator's blocks are the requests' sizes
    assert saved.reserved == estimate(cfg).pinned
