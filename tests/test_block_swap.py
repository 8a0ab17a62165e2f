"""Block swap on the CPU (the CPU plays both sides: host copies and separate "device" copies): bit-identical
outputs and gradients, the window (which blocks hold device storage when), fetches again in the backward recompute,
no re-quantization, trainable parameters untouched, the pipeline and the trainer with swap, and bad input.
The CUDA stream path runs on the CPU through a stand-in in test_block_swap_streams.py; pinned memory, real streams
and peak memory are in test_block_swap_on_cuda."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import transformer_inputs
from PIL import Image
from safetensors.torch import load_file
from train_utils import REPO, RESOLUTION, SIZES, make_dataset, one_thread, recipe_overrides  # noqa: F401

import urae_lite
from urae_lite.adapter_io import save_adapter
from urae_lite.block_swap import BlockSwap, block_swap_of, disable_block_swap, enable_block_swap, execution_blocks
from urae_lite.cli import main
from urae_lite.errors import UraeError
from urae_lite.loader import LoadSpec, adapted_layers, add_lora, empty_transformer, fill_transformer, load_transformer
from urae_lite.memory import MemorySettings
from urae_lite.quant import QuantizedWeight
from urae_lite.tiny import iter_random_transformer_tensors
from urae_lite.train.cache import build_cache
from urae_lite.train.config import load_recipe
from urae_lite.train.loop import train

RECIPE = REPO / "recipes" / "train_2k_lora.yaml"
CPU = torch.device("cpu")
N_BLOCKS = 4  # the tiny transformer: 2 double + 2 single blocks


@pytest.fixture(scope="module")
def base_model(tiny_config):
    """NF4 base (fp32 compute) with a frozen adapter slice and a trainable fp32 LoRA (non-zero B) on every linear."""
    model = fill_transformer(
        empty_transformer(tiny_config),
        iter_random_transformer_tensors(tiny_config, seed=0),
        LoadSpec("nf4", CPU, torch.float32, progress=False),
    )
    g = torch.Generator().manual_seed(3)
    for _, layer in adapted_layers(model):
        layer.add_slice(
            "frozen",
            torch.randn(2, layer.in_features, generator=g) * 0.1,
            torch.randn(layer.out_features, 2, generator=g) * 0.1,
            0.5,
            dtype=torch.float32,
        )
        lora = layer.add_lora("lora", 4, generator=g, dtype=torch.float32)
        torch.nn.init.normal_(lora.B, std=0.1, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def inputs(tiny_config):
    return transformer_inputs(tiny_config, dtype=torch.float32)


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _forward(model, inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def _train_step(model, inputs, mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and trainable gradients with block checkpointing (`cpu`: block inputs saved to host memory)."""
    offload = torch.autograd.graph.save_on_cpu() if mode == "cpu" else torch.enable_grad()
    with offload:
        loss = _forward(model, inputs).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in _trainable(model)]


def _training_copy(base_model):
    model = copy.deepcopy(base_model)
    model.enable_gradient_checkpointing()
    return model.train()


def _state(swap: BlockSwap) -> list[str]:
    """Per swapped block: `device` (its frozen tensors are separate device copies), `prefetched` (they still are
    the host copies, and device copies are being made) or `host`."""
    out = []
    for b in swap.blocks:
        at_host = [t.data_ptr() == h.data_ptr() for t, h in zip(b.tensors, b.host)]
        assert all(at_host) or not any(at_host), "a block is half swapped"
        if not any(at_host):
            assert all(t.data_ptr() == c.data_ptr() for t, c in zip(b.tensors, b.copies))
        out.append("host" if not b.copies else "prefetched" if all(at_host) else "device")
    return out


@pytest.fixture
def no_quantize(monkeypatch):
    """Swapping must move the packed tensors, never quantize again."""

    def refuse(*args, **kwargs):
        raise AssertionError("QuantizedWeight.quantize called after enable_block_swap")

    return lambda: monkeypatch.setattr(QuantizedWeight, "quantize", classmethod(refuse))


# ---- exactness -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, N_BLOCKS])
def test_forward_without_grad_is_bit_identical(base_model, inputs, n, no_quantize):
    with torch.no_grad():
        reference = _forward(base_model, inputs)
        model = copy.deepcopy(base_model)
        swap = enable_block_swap(model, n, CPU)
        no_quantize()
        assert [b.module for b in swap.blocks] == execution_blocks(model)[N_BLOCKS - n :]  # the LAST n blocks
        for _ in range(2):  # the second pass starts on the block the first one prefetched at its end
            assert torch.equal(_forward(model, inputs), reference)
        disable_block_swap(model)
        assert block_swap_of(model) is None and torch.equal(_forward(model, inputs), reference)
    assert all("_apply" not in b.__dict__ and not b._forward_pre_hooks for b in execution_blocks(model))
    assert not any(t.is_pinned() for t in model.state_dict().values())


@pytest.mark.parametrize("n,mode", [(1, "on"), (3, "cpu"), (N_BLOCKS, "on"), (N_BLOCKS, "cpu")])
def test_training_loss_gradients_and_optimizer_step_are_identical(base_model, inputs, n, mode, no_quantize):
    reference = _training_copy(base_model)
    ref_opt = torch.optim.AdamW(_trainable(reference), lr=1e-2)
    model = _training_copy(base_model)
    params = _trainable(model)
    pointers = [p.data_ptr() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)  # made before the swap: it must keep working
    swap = enable_block_swap(model, n, CPU)
    no_quantize()
    held = {id(t) for b in swap.blocks for t in b.tensors}
    assert _trainable(model) == params and not held & {id(p) for p in params}
    assert [p.data_ptr() for p in params] == pointers  # trainable factors stay where they were (on the device)
    for _ in range(2):  # the second step runs on the factors the swapped step updated
        ref_loss, ref_grads = _train_step(reference, inputs, mode)
        loss, grads = _train_step(model, inputs, mode)
        assert torch.equal(loss, ref_loss) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
        ref_opt.step(), optimizer.step()
        ref_opt.zero_grad(), optimizer.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(params, _trainable(reference)))
    assert [p.data_ptr() for p in params] == pointers
    after, expected = model.state_dict(), reference.state_dict()
    assert all(torch.equal(after[k], expected[k]) for k in expected)  # frozen tensors unchanged, factors equal


# ---- the window ------------------------------------------------------------------------------------------------------
def _watch(model, swap, monkeypatch) -> tuple[list, list]:
    """(entries, fetches): every swapped block's entry with the window's state right after it, and the block of
    each device copy made (seen where the swap's streams copy a block's first host tensor)."""
    entries, fetches = [], []
    for pos, b in enumerate(swap.blocks):
        b.module.register_forward_pre_hook(  # registered after the swap's own hook, so it sees its result
            lambda _m, _a, pos=pos: entries.append((pos, torch._C._current_graph_task_id() != -1, _state(swap)))
        )
    first = {id(b.host[0]): pos for pos, b in enumerate(swap.blocks)}
    copy = swap.streams.copy

    def counted(dst, src, stream):
        if id(src) in first:
            fetches.append(first[id(src)])
        copy(dst, src, stream)

    monkeypatch.setattr(swap.streams, "copy", counted)
    return entries, fetches


def _expected(pos: int, backward: bool, last_forward_next: int | None) -> list[str]:
    nxt = pos - 1 if backward else (pos + 1 if pos + 1 < N_BLOCKS else last_forward_next)
    return ["device" if q == pos else "prefetched" if q == nxt else "host" for q in range(N_BLOCKS)]


def test_window_without_grad_holds_the_running_and_the_next_block(base_model, inputs, monkeypatch):
    model = copy.deepcopy(base_model)
    swap = enable_block_swap(model, N_BLOCKS, CPU)
    entries, fetches = _watch(model, swap, monkeypatch)
    assert _state(swap) == ["host"] * N_BLOCKS
    with torch.no_grad():
        _forward(model, inputs), _forward(model, inputs)
    assert [(pos, back) for pos, back, _ in entries] == [(p, False) for p in range(N_BLOCKS)] * 2
    for pos, _, state in entries:  # after the last block the next pass's first block is prefetched
        assert state == _expected(pos, False, last_forward_next=0)
    assert fetches == [0, 1, 2, 3, 0, 1, 2, 3, 0]  # each block copied once per pass


def test_window_in_training_fetches_again_in_the_backward_recompute(base_model, inputs, monkeypatch):
    model = _training_copy(base_model)
    swap = enable_block_swap(model, N_BLOCKS, CPU)
    entries, fetches = _watch(model, swap, monkeypatch)
    host = {h.data_ptr() for b in swap.blocks for h in b.host}
    dequantized = []
    dequantize = QuantizedWeight.dequantize

    def resident_only(self, out=None):  # forward, recompute AND backward read the base from device copies
        dequantized.append(torch._C._current_graph_task_id() != -1)
        assert self.weight.data_ptr() not in host, "a swapped base was read from its host copy"
        return dequantize(self, out)

    monkeypatch.setattr(QuantizedWeight, "dequantize", resident_only)
    _train_step(model, inputs, "on")
    order = [(p, False) for p in range(N_BLOCKS)] + [(p, True) for p in reversed(range(N_BLOCKS))]
    assert [(pos, back) for pos, back, _ in entries] == order
    for pos, back, state in entries:  # after the last forward block comes its own recompute: nothing prefetched
        assert state == _expected(pos, back, last_forward_next=None)
    assert fetches == [0, 1, 2, 3, 2, 1, 0]  # the forward copies every block, the backward all but the last again
    assert any(dequantized) and not all(dequantized)  # the check above ran in the backward too
    entries.clear(), fetches.clear()
    _train_step(model, inputs, "on")  # the backward ended on block 0: the next step starts with it resident
    assert fetches == [1, 2, 3, 2, 1, 0]


def test_only_the_swapped_blocks_use_host_copies_and_to_leaves_them_alone(base_model):
    model = copy.deepcopy(base_model)
    swap = enable_block_swap(model, 2, CPU)
    held = {id(t) for b in swap.blocks for t in b.tensors}
    for block in execution_blocks(model)[:2]:
        assert not held & {id(t) for t in list(block.parameters()) + list(block.buffers())}
    frozen = [
        t for b in execution_blocks(model)[2:] for t in list(b.parameters()) + list(b.buffers()) if not t.requires_grad
    ]
    assert {id(t) for t in frozen} == held  # every frozen tensor of a swapped block: base, bias, norms, slices
    model.to("meta")  # a move off the device: the window's tensors stay host copies, the rest moves
    assert all(not t.is_meta for t in frozen) and _state(swap) == ["host", "host"]
    assert all(p.is_meta for p in model.parameters() if id(p) not in held)


# ---- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [-1, N_BLOCKS + 1, 1.5, True])
def test_bad_block_counts_name_the_valid_range(base_model, n):
    """Checked where the setting enters (MemorySettings), against the model's block count; the mechanism takes
    checked values."""
    with pytest.raises(UraeError, match=r"blocks_to_swap must be (a whole number of at least 0|from 0 \(off\) to 4 )"):
        MemorySettings(blocks_to_swap=n).check("train", N_BLOCKS)
    assert enable_block_swap(base_model, 0, CPU) is None and block_swap_of(base_model) is None


def test_misuse_fails_with_one_line(base_model, inputs):
    model = copy.deepcopy(base_model)
    enable_block_swap(model, 1, CPU)
    with pytest.raises(UraeError, match="already on"):
        enable_block_swap(model, 1, CPU)
    with pytest.raises(UraeError, match=r"needs gradient checkpointing \(set memory.checkpointing=on"):
        _forward(model.train(), inputs)  # with grad, without checkpointing
    with pytest.raises(UraeError, match="before converting the transformer's dtype"):
        model.to(torch.bfloat16)


def test_adding_an_adapter_to_a_swapped_block_is_one_clear_error(base_model, inputs):
    """The window moves only the frozen tensors it found when enabled: a slice added later would stay in host
    memory beside device factors (on a GPU the branch's concatenation fails mid-forward). Refused on every device,
    at once, with what to do; resident blocks and a swap-free model take adapters as before."""
    model = copy.deepcopy(base_model)
    swap = enable_block_swap(model, 2, CPU)
    swapped = {id(m) for b in swap.blocks for m in b.module.modules()}
    layers = [layer for _, layer in adapted_layers(model)]
    inside = [layer for layer in layers if id(layer) in swapped]
    assert inside and len(inside) < len(layers)
    for layer in inside:
        A, B = torch.zeros(2, layer.in_features), torch.zeros(layer.out_features, 2)
        for add, args in ((layer.add_slice, ("late", A, B)), (layer.add_lora, ("late", 2))):
            with pytest.raises(UraeError) as error:
                add(*args)
            assert "\n" not in str(error.value) and "add adapters before block swap" in str(error.value)
        assert "late" not in layer.slices
    resident = next(layer for layer in layers if id(layer) not in swapped)
    resident.add_lora("late", 2)  # outside the swapped blocks: as without swap
    disable_block_swap(model)
    inside[0].add_lora("late", 2)  # once the swap is off, as anywhere
    assert "late" in resident.slices and "late" in inside[0].slices
    with torch.no_grad():
        _forward(model, inputs)


def test_training_config_needs_checkpointing(tiny_flux, tmp_path):
    base = recipe_overrides(tiny_flux, tmp_path, tmp_path)
    cfg = load_recipe(RECIPE, base + ["memory.blocks_to_swap=2", "memory.checkpointing=off"])
    with pytest.raises(UraeError, match="blocks_to_swap needs gradient checkpointing.*set memory.checkpointing=on"):
        cfg.memory.check("train", N_BLOCKS)  # where `train` checks it, before loading anything
    with pytest.raises(UraeError, match="blocks_to_swap must be a whole number of at least 0, got -1"):
        load_recipe(RECIPE, base + ["memory.blocks_to_swap=-1"])
    assert load_recipe(RECIPE, base).memory.blocks_to_swap == 0


# ---- generation ------------------------------------------------------------------------------------------------------
SMALL = dict(device="cpu", dtype=torch.float32, progress=False, width=64, height=64, steps=2)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_flux):
    model = load_transformer(tiny_flux, "bf16", progress=False)
    add_lora(model, "x", rank=4, seed=5)
    gen = torch.Generator().manual_seed(6)
    for p in model.parameters():
        if p.requires_grad and p.shape[1] == 4:  # the B factors: a LoRA that changes the image
            p.data = torch.randn(p.shape, generator=gen).to(p.dtype) * 0.2
    return save_adapter(model, tmp_path_factory.mktemp("lora") / "lora.safetensors")


def test_generation_gives_the_same_image(tiny_flux, lora, tmp_path, capsys):
    image = urae_lite.load_pipeline(tiny_flux, memory={"quant": "nf4"}, adapters=[lora], **SMALL)("a cat", seed=5).image
    reference = np.asarray(image)
    for offload, n in (("none", 2), ("model", N_BLOCKS)):  # `model`: diffusers' offload hooks move the rest
        pipe = urae_lite.load_pipeline(
            tiny_flux, memory={"quant": "nf4", "offload": offload, "blocks_to_swap": n}, adapters=[lora], **SMALL
        )
        swap = block_swap_of(pipe.transformer)
        assert len(swap.blocks) == n and all(t.device.type == "cpu" for b in swap.blocks for t in b.host)
        for _ in range(2):  # a second call reuses the window (and re-installs the `model` hooks)
            assert np.array_equal(np.asarray(pipe("a cat", seed=5).image), reference), offload
    out = tmp_path / "swap.png"
    code = main(
        [
            "generate",
            "a cat",
            "--model",
            str(tiny_flux),
            "--device",
            "cpu",
            "--adapter",
            str(lora),
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--seed",
            "5",
            "--blocks-to-swap",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and np.array_equal(np.asarray(Image.open(out).convert("RGB")), reference)  # PNG: lossless


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ("--offload", "group", "--blocks-to-swap", 1),
            "--blocks-to-swap streams the transformer itself: use it with --offload model or none, not group",
        ),
        (("--offload", "sequential", "--blocks-to-swap", 4), "not sequential"),
        (("--blocks-to-swap", 5), "--blocks-to-swap must be from 0 (off) to 4 (every block of this transformer)"),
    ],
)
def test_generate_rejects_bad_block_swap(capsys, tiny_flux, argv, message):
    code = main(["generate", "a cat", "--model", str(tiny_flux), "--device", "cpu", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


# ---- training ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_flux):
    folder = make_dataset(tmp_path_factory.mktemp("swap") / "data", SIZES[:3])
    build_cache(folder, str(tiny_flux), RESOLUTION, max_sequence_length=32, progress=False)
    return folder


def test_a_trainer_run_with_block_swap_matches_one_without(tiny_flux, data, tmp_path):
    runs = {}
    for n in (0, 3):
        out = tmp_path / f"swap{n}"
        cfg = load_recipe(
            RECIPE,
            recipe_overrides(
                tiny_flux,
                data,
                out,
                **{
                    "training.steps": 2,
                    "training.precision": "fp32",
                    "memory.blocks_to_swap": n,
                    "optimizer.d0": 1e-3,
                },
            ),
        )  # NF4 base, checkpointing cpu (the recipe's)
        train(cfg, progress=False)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        runs[n] = [(r["loss"], r["grad_norm"]) for r in log], load_file(out / "adapter.safetensors")
    assert runs[3][0] == runs[0][0] and len(runs[0][0]) == 2
    assert runs[3][1].keys() == runs[0][1].keys()
    assert all(torch.equal(runs[3][1][k], runs[0][1][k]) for k in runs[0][1])


# ---- CUDA ------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams, pinned memory and GPU memory need CUDA")
def test_block_swap_on_cuda(base_model, inputs):
    """Side-stream prefetch from pinned memory gives the same outputs as the resident model, the swapped blocks'
    weights are off the GPU except for the two-block window, and their host copies take their own bytes."""
    device = torch.device("cuda")
    x = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    outputs, grads, held = {}, {}, {}

    def pinned_held() -> int:  # bytes of the blocks torch's caching host allocator holds (active + cached)
        return torch.cuda.memory.host_memory_stats_as_nested_dict()["allocated_bytes"]["current"]

    for n in (0, N_BLOCKS):
        model = copy.deepcopy(base_model).to(device)
        before = pinned_held()
        swap = enable_block_swap(model, n, device)
        if swap is not None:
            assert all(h.is_pinned() for b in swap.blocks for h in b.host)
            assert all(p.is_cuda for p in model.parameters() if p.requires_grad)
            # each host copy pinned at its own size (pinned.py), not the next power of two; cached blocks of an
            # earlier pinned allocation may serve some, so at most
            assert pinned_held() - before <= sum(h.numel() * h.element_size() for b in swap.blocks for h in b.host)
        with torch.no_grad():
            outputs[n] = torch.stack([_forward(model, x) for _ in range(3)])
        torch.cuda.synchronize()
        held[n] = sum(
            t.untyped_storage().nbytes() for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda
        )
        model.enable_gradient_checkpointing()
        model.train()
        _forward(model, x).square().mean().backward()
        torch.cuda.synchronize()
        grads[n] = [p.grad for p in _trainable(model)]
        del model, swap
    assert torch.equal(outputs[N_BLOCKS], outputs[0])
    for a, b in zip(grads[N_BLOCKS], grads[0]):
        torch.testing.assert_close(a, b)
    assert held[N_BLOCKS] < held[0]
