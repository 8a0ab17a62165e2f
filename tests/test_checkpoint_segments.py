"""`training.checkpoint_every: k`: only every k-th checkpointed block input is kept, the others are recomputed in
backward from the last kept one. Bit-identical losses and gradients (on/cpu, fp32/bf16 autocast, block swap, FF
chunks), the memory kept between forward and backward, the extra block forwards, bad settings, and a `train()` run
with a resume."""

from __future__ import annotations

import copy
import json
import math
import weakref
from dataclasses import dataclass

import pytest
import torch
from conftest import transformer_inputs
from safetensors.torch import load_file
from torch.utils._python_dispatch import _disable_current_modes
from train_utils import REPO, RESOLUTION, SIZES, make_dataset, one_thread, recipe_overrides  # noqa: F401

from urae_lite.block_swap import enable_block_swap, execution_blocks
from urae_lite.errors import UraeError
from urae_lite.loader import LoadSpec, adapted_layers, empty_transformer, fill_transformer
from urae_lite.measure.fake import LiveBytes
from urae_lite.memory import MemorySettings
from urae_lite.quant import QuantizedWeight
from urae_lite.tiny import iter_random_transformer_tensors
from urae_lite.token_chunking import enable_token_chunking
from urae_lite.train import checkpoint_segments
from urae_lite.train.cache import build_cache
from urae_lite.train.checkpoint_segments import SegmentCheckpointing, enable_checkpoint_segments
from urae_lite.train.config import load_recipe
from urae_lite.train.loop import train

RECIPE = REPO / "recipes" / "train_2k_lora.yaml"
CPU = torch.device("cpu")
N_BLOCKS = 4  # the tiny transformer: 2 double + 2 single blocks
EVERY = [2, 3, N_BLOCKS + 1]  # pairs; a segment of 3 and one of 1; one segment holding every block


def _model(tiny_config, dtype: torch.dtype):
    """NF4 base with a frozen adapter slice and a trainable LoRA (non-zero B) on every linear."""
    model = fill_transformer(
        empty_transformer(tiny_config),
        iter_random_transformer_tensors(tiny_config, seed=0),
        LoadSpec("nf4", CPU, dtype, progress=False),
    )
    g = torch.Generator().manual_seed(3)
    for _, layer in adapted_layers(model):
        layer.add_slice(
            "frozen",
            torch.randn(2, layer.in_features, generator=g) * 0.1,
            torch.randn(layer.out_features, 2, generator=g) * 0.1,
            0.5,
            dtype=dtype,
        )
        lora = layer.add_lora("lora", 4, generator=g, dtype=torch.float32)  # fp32 masters, as in training
        torch.nn.init.normal_(lora.B, std=0.1, generator=g)
    return model


@pytest.fixture(scope="module")
def models(tiny_config):
    return {"fp32": _model(tiny_config, torch.float32), "bf16": _model(tiny_config, torch.bfloat16)}


def _copy(base, every: int, swap: int = 0, token_chunks: int = 1):
    """A training copy set up in prepare_for_training's and build_model's order: token chunks, checkpointing, swap."""
    model = copy.deepcopy(base)
    if token_chunks > 1:
        enable_token_chunking(model, token_chunks)
    enable_checkpoint_segments(model, every)
    enable_block_swap(model, swap, CPU)
    return model.train()


def _step(model, inputs: dict, mode: str, autocast: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and trainable gradients as the Trainer computes them (`cpu`: save_on_cpu around the forward)."""
    offload = torch.autograd.graph.save_on_cpu() if mode == "cpu" else torch.enable_grad()
    with offload, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**inputs, return_dict=False)[0].float().square().mean()
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


def _segment_lengths(every: int) -> list[int]:
    return [min(every, N_BLOCKS - s) for s in range(0, N_BLOCKS, every)]


# ---- exactness ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights,autocast,mode,extra",
    [
        ("fp32", False, "on", ""),
        ("fp32", False, "cpu", ""),
        ("bf16", True, "on", ""),  # training's precision=bf16: bf16 weights, bf16 autocast
        ("fp32", True, "cpu", ""),  # fp32 weights under bf16 autocast: here the chain's autocast state decides the bits
        ("fp32", False, "on", "block swap"),
        ("fp32", False, "cpu", "token chunks"),
        ("fp32", True, "on", "block swap + token chunks"),
        ("bf16", True, "cpu", "block swap + token chunks"),
    ],
)
def test_loss_and_gradients_are_bit_identical(models, tiny_config, weights, autocast, mode, extra, monkeypatch):
    """The recomputed inputs are the forward's bits: the same ops on the same values in the same order (the chain
    runs under no_grad, where token chunking loops without building a graph; the values do not change)."""
    swap, token_chunks = (N_BLOCKS if "block swap" in extra else 0), (3 if "token chunks" in extra else 1)
    inputs = transformer_inputs(tiny_config, dtype=torch.float32 if weights == "fp32" else torch.bfloat16)
    ref_loss, ref_grads = _step(_copy(models[weights], 1, swap, token_chunks), inputs, mode, autocast)
    if swap:  # every forward of a swapped block, the recompute chain's included, reads the device copies
        reads = []
        dequantize = QuantizedWeight.dequantize

        def resident_only(self, out=None):
            reads.append(not torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1)
            assert self.weight.data_ptr() not in host, "a swapped base was read from its host copy"
            return dequantize(self, out)

        monkeypatch.setattr(QuantizedWeight, "dequantize", resident_only)
    for every in EVERY:
        model = _copy(models[weights], every, swap, token_chunks)
        chain = []
        for block in execution_blocks(model):
            block.register_forward_pre_hook(
                lambda *_, chain=chain: chain.append(
                    not torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1
                )
            )
        if swap:
            swap_state = model.__dict__["_urae_block_swap"]
            host = {h.data_ptr() for b in swap_state.blocks for h in b.host}
            reads.clear()
        loss, grads = _step(model, inputs, mode, autocast)
        assert torch.equal(loss, ref_loss), every
        assert len(grads) == len(ref_grads) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads)), every
        assert sum(chain) == sum(length * length // 4 for length in _segment_lengths(every))  # it did recompute
        if swap:
            assert any(reads), "the recompute chain read no swapped block"


class _ToyBlock(torch.nn.Module):
    """A FLUX-block-shaped function whose values depend on the autocast state (CPU autocast runs `linear` in bf16
    on fp32 inputs) and on the RNG (dropout): what the tiny FLUX blocks do not show on a CPU."""

    def __init__(self, seed: int):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(seed))

    def forward(self, hidden, encoder, temb, rotary=None, kwargs=None):
        hidden = hidden + torch.nn.functional.dropout(self.linear(hidden).float(), 0.3, training=True) * temb
        return encoder * torch.sigmoid(self.linear(encoder).float()), hidden


def _toy_run(func, blocks, residual_after: int | None = None):
    """diffusers' block loop with `func` as the checkpointing function (+ a ControlNet-like residual)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 5, 8, generator=g).requires_grad_()
    encoder, temb = torch.randn(1, 3, 8, generator=g), torch.randn(1, 1, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, e = hidden, encoder
        for i, block in enumerate(blocks):
            e, x = func(block, x, e, temb, None, None)
            if i == residual_after:
                x = x + 1
    (x.square().sum() + e.sum()).backward()
    return [x.detach(), hidden.grad] + [p.grad for b in blocks for p in b.parameters()]


@pytest.mark.parametrize("every", [2, 3, 6])
@pytest.mark.parametrize("residual_after", [None, 1])
def test_the_chain_replays_autocast_and_rng(every, residual_after):
    """Each recomputed block runs with its forward's autocast state and RNG state; a residual added between blocks
    (not the previous block's output) starts a new segment instead of being recomputed wrongly."""

    def plain(block, *args):
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    blocks = [_ToyBlock(i) for i in range(5)]
    chain = []
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda _m, _a, i=i: chain.append(i) if not torch.is_grad_enabled() else None)
    expected = _toy_run(plain, blocks, residual_after)
    for b in blocks:
        b.zero_grad(set_to_none=True)
    chain.clear()
    got = _toy_run(SegmentCheckpointing(every), blocks, residual_after)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    starts = sorted({0, *([residual_after + 1] if residual_after is not None else [])})
    lengths = [n for s, end in zip(starts, starts[1:] + [5]) for n in _split(end - s, every)]
    assert len(chain) == sum(n * n // 4 for n in lengths)


def _split(blocks: int, every: int) -> list[int]:
    return [min(every, blocks - s) for s in range(0, blocks, every)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels, pinned host copies")
@pytest.mark.parametrize("mode", ["on", "cpu"])
def test_bit_identical_on_cuda(models, tiny_config, mode):
    """On a GPU the chain's forwards without grad must pick the same kernels (attention backend included) as the
    forward with grad; block swap streams from pinned memory and save_on_cpu pins its copies."""
    device = torch.device("cuda")
    inputs = {
        k: v.to(device) if torch.is_tensor(v) else v
        for k, v in transformer_inputs(tiny_config, dtype=torch.bfloat16).items()
    }
    results = {}
    for every in (1, 2, 3):
        model = copy.deepcopy(models["bf16"]).to(device)
        enable_checkpoint_segments(model, every)
        enable_block_swap(model, 2, device)
        model.train()
        offload = torch.autograd.graph.save_on_cpu(pin_memory=True) if mode == "cpu" else torch.enable_grad()
        with offload, torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs, return_dict=False)[0].float().square().mean()
        loss.backward()
        results[every] = [loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]
    for every in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(results[every], results[1])), every


# ---- the recompute chain --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "every,chain",
    [
        (1, []),
        (2, [2, 0]),  # backward needs block 3's input first (block 2's output), then block 1's
        (3, [0, 1]),  # block 2 needs blocks 0, 1; block 1 then finds its input kept from that chain
        (4, [0, 1, 2, 0]),  # block 3: 0, 1, 2 (block 2's input kept); block 1: 0 again
        (5, [0, 1, 2, 0]),
    ],
)
def test_the_chain_runs_the_expected_block_forwards(models, tiny_config, every, chain):
    model = _copy(models["fp32"], every)
    blocks = execution_blocks(model)
    calls = []
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(
            lambda _m, _a, i=i: calls.append((i, torch.is_grad_enabled(), torch._C._current_graph_task_id() != -1))
        )
    _step(model, transformer_inputs(tiny_config, dtype=torch.float32), "on")
    assert [(i, grad) for i, grad, back in calls if not back] == [(i, True) for i in range(N_BLOCKS)]
    assert sorted(i for i, grad, back in calls if back and grad) == list(range(N_BLOCKS))  # checkpoint's recompute
    assert [i for i, grad, back in calls if back and not grad] == chain
    assert len(chain) == sum(length * length // 4 for length in _segment_lengths(every))  # L²//4 per segment


# ---- memory ---------------------------------------------------------------------------------------------------------
class _HostCopies(torch.autograd.graph.saved_tensors_hooks):
    """save_on_cpu as on a GPU, on the CPU: saved tensors are copied to uncounted "host" memory (made outside the
    LiveBytes mode) and come back as new counted tensors. Records (weakly) every original it copied, when (in
    backward or not), and the copy."""

    def __init__(self, copied: list):
        def pack(t: torch.Tensor):
            with _disable_current_modes():
                c = t.clone()
            copied.append((weakref.ref(t), torch._C._current_graph_task_id() != -1, weakref.ref(c)))
            return c

        super().__init__(pack, lambda c: c.clone())


@dataclass
class _Measured:
    kept: int  # device bytes kept from the forward to the backward
    peak: int  # backward peak above the start
    left: int  # bytes alive after the backward, the loss dropped (the gradients)
    copied: list  # _HostCopies' records
    host_blocks: list[int]  # blocks whose hidden states went to host memory in the forward
    input_bytes: list[int]  # each block's input (hidden + encoder storages)


def _measure(model, inputs: dict, mode: str) -> _Measured:
    copied, host_blocks, input_bytes = [], [], []
    blocks = execution_blocks(model)

    def seen(module, args):
        hidden, encoder = args[0], args[1]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (hidden, encoder)}
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:  # the forward
            input_bytes.append(sum(storages.values()))
            if any(ref() is hidden for ref, _, _ in copied):
                host_blocks.append(blocks.index(module))

    for block in blocks:
        block.register_forward_pre_hook(seen)
    tracker = LiveBytes()
    with tracker:
        start = tracker.current
        with _HostCopies(copied) if mode == "cpu" else torch.enable_grad():
            loss = model(**inputs, return_dict=False)[0].square().mean()
        kept = tracker.current - start
        tracker.start_phase()
        loss.backward()
        peak = tracker.peak - start
        del loss
        left = tracker.current - start
    return _Measured(kept, peak, left, copied, host_blocks, input_bytes)


@pytest.fixture(scope="module")
def measured(models, tiny_config):
    """`_measure(every, mode)`, each once per module (the k=1 references serve every k)."""
    inputs = transformer_inputs(tiny_config, height_tokens=8, width_tokens=8, text_tokens=16, dtype=torch.float32)
    results = {}

    def get(every: int, mode: str) -> _Measured:
        if (every, mode) not in results:
            results[every, mode] = _measure(_copy(models["fp32"], every), inputs, mode)
        return results[every, mode]

    return get


@pytest.mark.parametrize("every", EVERY)
def test_kept_inputs_drop_by_k(measured, every):
    ref, got = measured(1, "on"), measured(every, "on")
    assert len(set(got.input_bytes)) == 1 and got.input_bytes == ref.input_bytes  # (64 + 16) tokens x 32 x 4 B
    kept_inputs = math.ceil(N_BLOCKS / every)
    assert ref.kept - got.kept == (N_BLOCKS - kept_inputs) * got.input_bytes[0]  # exactly the in-between inputs
    assert got.peak <= ref.peak  # (equal here: the peak is in a double block's backward, where both hold two inputs)
    assert got.left == ref.left  # nothing outlives the backward (the segments are freed with the graph)


@pytest.mark.parametrize("every", EVERY)
def test_cpu_copies_only_every_kth_input_to_host_memory(measured, tiny_config, every):
    ref, got = measured(1, "cpu"), measured(every, "cpu")
    assert ref.host_blocks == list(range(N_BLOCKS))
    assert got.host_blocks == list(range(0, N_BLOCKS, every))  # blocks 0, k, 2k, ...: n/k host copies
    forward = [c for c in got.copied if not c[1]]
    assert len(ref.copied) - len(forward) == 2 * (N_BLOCKS - len(got.host_blocks))  # hidden + encoder of the others
    # in backward, a segment of 3 or more blocks copies the input of the block below the one it recomputes for
    assert len(got.copied) - len(forward) == 2 * sum(length >= 3 for length in _segment_lengths(every))
    temb = tiny_config["num_attention_heads"] * tiny_config["attention_head_dim"] * 4  # (1, 32) fp32
    assert got.kept == ref.kept + temb  # on the device only the segments' shared temb (6 KiB for FLUX in bf16)
    assert got.peak <= ref.peak + temb  # the chain's forwards without grad stay below the block's recompute with grad
    assert got.left == ref.left and all(c() is None for _, _, c in got.copied)  # host copies freed too


# ---- settings -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_values_fail_with_one_line(bad):
    with pytest.raises(UraeError, match="checkpoint_every must be a whole number of at least 1"):
        MemorySettings(checkpoint_every=bad)  # where the setting enters; the mechanism takes checked values


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_flux):
    folder = make_dataset(tmp_path_factory.mktemp("segments") / "data", SIZES[:3])
    build_cache(folder, str(tiny_flux), RESOLUTION, max_sequence_length=32, progress=False)
    return folder


def test_recipe_checks(tiny_flux, data, tmp_path):
    def load(**extra):
        return load_recipe(RECIPE, recipe_overrides(tiny_flux, data, tmp_path, **extra))

    assert load().memory.checkpoint_every == 1
    with pytest.raises(UraeError, match="^checkpoint_every must be a whole number of at least 1, got 0$"):
        load(**{"memory.checkpoint_every": 0})
    with pytest.raises(
        UraeError,
        match=r"^memory.checkpoint_every=2 thins out .*set memory.checkpointing=on "
        r"or cpu, or memory.checkpoint_every=1$",
    ):  # the rule between settings is checked where the run starts (it needs the model's block count too)
        load(**{"memory.checkpoint_every": 2, "memory.checkpointing": "off"}).memory.check("train", 57)
    assert load(**{"memory.checkpoint_every": 3, "memory.checkpointing": "on"}).memory.checkpoint_every == 3


# ---- a training run -------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _stop_at(step: int):
    def on_step(n: int) -> None:
        if n == step:
            raise _Stop

    return on_step


def test_a_run_with_every_2_matches_one_without_including_a_resume(tiny_flux, data, tmp_path, monkeypatch):
    extra = {
        "memory.quant": "bf16",
        "training.precision": "fp32",
        "training.steps": 4,
        "checkpoint.every": 2,
        "optimizer.d0": 1e-3,
    }  # checkpointing cpu: the recipe's
    recomputed = []
    segment_input = checkpoint_segments._Segment.input
    monkeypatch.setattr(
        checkpoint_segments._Segment,
        "input",
        lambda self, pos, which: recomputed.append(pos) or segment_input(self, pos, which),
    )
    runs = {}
    for every in (1, 2):
        out = tmp_path / f"every{every}"
        cfg = load_recipe(RECIPE, recipe_overrides(tiny_flux, data, out, **extra, **{"memory.checkpoint_every": every}))
        assert cfg.memory.checkpointing == "cpu"
        if every == 2:  # stopped when step 3 begins, resumed from the step-2 checkpoint
            with pytest.raises(_Stop):
                train(cfg, progress=False, on_step=_stop_at(3))
            train(cfg, resume="auto", progress=False)
        else:
            train(cfg, progress=False)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        runs[every] = (
            [(r["step"], r["loss"], r["grad_norm"]) for r in log],
            load_file(out / "adapter.safetensors"),
            load_file(out / "checkpoints" / "step-00000004" / "trainable.safetensors"),
        )
    assert [s for s, _, _ in runs[2][0]] == [1, 2, 3, 4]
    assert len(recomputed) == 4 * 2 * 2  # 4 steps x blocks 1 and 3 x hidden and encoder: the k=2 run recomputed
    assert runs[2][0] == runs[1][0]  # losses and gradient norms, step for step
    for a, b in zip(runs[2][1:], runs[1][1:]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
