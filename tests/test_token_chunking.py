"""Token-chunked blocks (urae_lite.token_chunking) against the unchunked model and diffusers' own block forwards: same
outputs, gradients equal up to summation order, unchanged names, less live memory; and through load_pipeline and the
Trainer."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch.utils.checkpoint import checkpoint
from train_utils import REPO, one_thread, recipe_overrides  # noqa: F401

import urae_lite
from urae_lite import token_chunking
from urae_lite.cli import main
from urae_lite.errors import UraeError
from urae_lite.hires import ProportionalAttnProcessor
from urae_lite.loader import adapted_layers, add_lora, load_transformer
from urae_lite.measure.fake import LiveBytes
from urae_lite.memory import MemorySettings
from urae_lite.token_chunking import (
    ChunkedFluxSingleTransformerBlock,
    ChunkedFluxTransformerBlock,
    enable_token_chunking,
)
from urae_lite.train.config import load_recipe
from urae_lite.train.loop import Trainer
from urae_lite.train.model import build_model, trainable_parameters
from urae_lite.train.optim import build_optimizer
from urae_lite.train.samples import TrainSample

CHUNKS = (2, 3, 7, 64)  # 64: more chunks than any region's tokens (7 text, 24 image, 31 joint)


def adapted_model(tiny_flux, dtype: torch.dtype, quant: str = "nf4"):
    """The tiny transformer with an NF4 base and a LoRA whose B is non-zero (so the adapter branch matters); the
    LoRA factors are fp32 masters, as prepare_for_training makes them."""
    model = load_transformer(tiny_flux, quant, "cpu", dtype, progress=False)
    add_lora(model, "lora", rank=4, targets="all", seed=3)
    gen = torch.Generator().manual_seed(4)
    for _, layer in adapted_layers(model):
        piece = layer.slices["lora"]
        piece.A = torch.nn.Parameter(piece.A.detach().float())
        piece.B = torch.nn.Parameter(torch.randn(piece.B.shape, generator=gen) * 0.1)
    return model


def run(model, inputs: dict) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


# ---- generation: identical outputs ------------------------------------------------------------------------------
# A CPU GEMM (MKL / oneDNN) picks its kernel, blocking and thread split by the row count, so the same row inside a
# chunk of 3 rows and inside the whole matrix may round differently, in ways that vary between CPUs and BLAS builds
# (fp32 and bf16 alike). Tests that compare chunked with unchunked runs bit for bit therefore send every linear through
# `rowwise_linear`, which computes each output row the same way whatever the number of rows: what is left to differ
# is the chunking itself, which must change no value. (Attention runs over all tokens at once in both.)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_forward_is_identical(tiny_flux, tiny_config, make_inputs, dtype, row_independent):
    """Chunked forwards (any chunk count, more chunks than tokens included) give the unchunked output bit for bit,
    and going back to one chunk restores the unchunked model."""
    model = adapted_model(tiny_flux, dtype)
    inputs = make_inputs(tiny_config, dtype=dtype)
    with torch.no_grad():
        reference = run(model, inputs)
        for chunks in CHUNKS:
            enable_token_chunking(model, chunks)
            out = run(model, inputs)
            assert out.dtype == reference.dtype and torch.equal(out, reference), chunks
        enable_token_chunking(model, 1)
        assert torch.equal(run(model, inputs), reference)


def test_enable_swaps_classes_keeps_names_and_restores(tiny_flux):
    model = adapted_model(tiny_flux, torch.float32)
    keys = list(model.state_dict())
    classes = {n: type(m) for n, m in model.named_modules()}
    assert enable_token_chunking(model, 4) == 2 + 2  # 2 double blocks, 2 single blocks
    assert list(model.state_dict()) == keys
    assert type(model.transformer_blocks[1]) is ChunkedFluxTransformerBlock
    assert type(model.single_transformer_blocks[1]) is ChunkedFluxSingleTransformerBlock
    assert model.single_transformer_blocks[0].token_chunks == 4
    enable_token_chunking(model, 2)  # re-enabling only changes the count
    assert model.transformer_blocks[0].token_chunks == 2
    enable_token_chunking(model, 1)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any("token_chunks" in vars(m) for m in model.modules())
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_chunk_counts_fail_with_one_line(bad):
    """Checked where the setting enters (MemorySettings); the mechanism takes checked values."""
    with pytest.raises(UraeError, match="token_chunks must be a whole number of at least 1") as info:
        MemorySettings(token_chunks=bad)
    assert "\n" not in str(info.value)
    with pytest.raises(UraeError, match="no FLUX blocks"):
        enable_token_chunking(torch.nn.Linear(2, 2), 2)


def test_hooked_modules_are_refused():
    """An offload hook keeps the forward it wrapped, which would silently bypass the chunking."""
    block = FluxSingleTransformerBlock(32, 2, 16)
    block.forward = block.forward  # what accelerate's and diffusers' hooks leave behind: an instance attribute
    with pytest.raises(UraeError, match="enable token chunking before offloading"):
        enable_token_chunking(block, 2)
    assert type(block) is FluxSingleTransformerBlock
    enable_token_chunking(block, 1)  # nothing to change: fine


# ---- the single block against diffusers' own forward -------------------------------------------------------------
def single_block_inputs(dim: int, text: int, image: int, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden, context, temb = (
        torch.randn(1, image, dim, generator=g),
        torch.randn(1, text, dim, generator=g),
        torch.randn(1, dim, generator=g),
    )
    return [t.requires_grad_(grad) for t in (hidden, context, temb)]


BLOCKS = {"double": (FluxTransformerBlock, FluxTransformerBlock.forward), "single": (FluxSingleTransformerBlock, None)}
PROCESSORS = {"diffusers": FluxAttnProcessor, "proportional": lambda: ProportionalAttnProcessor(base_tokens=7)}


def block_grads(block, fn, hidden, context, temb, rope) -> list[torch.Tensor]:
    """Both outputs, then the gradients of the inputs and every parameter, of an arbitrary scalar of the outputs."""
    c, h = fn(hidden, context, temb, rope)
    ((c.float() * 1.3).sum() + (h.float() ** 2).sum()).backward()
    grads = [t.grad.clone() for t in (hidden, context, temb)] + [p.grad.clone() for p in block.parameters()]
    for t in [hidden, context, temb, *block.parameters()]:
        t.grad = None
    return [c.detach(), h.detach(), *grads]


@pytest.mark.parametrize("processor", list(PROCESSORS))
@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_blocks_match_diffusers_forward(kind, processor, chunks, row_independent):
    """The chunked forwards repeat diffusers' block forwards (and FluxAttnProcessor / URAE's proportional
    processor): a change in diffusers shows up here. fp32 with a row-independent matmul: exact outputs."""
    torch.manual_seed(0)
    cls = BLOCKS[kind][0]
    block = cls(32, 2, 16)
    block.attn.set_processor(PROCESSORS[processor]())
    theirs = cls.forward.__get__(block)  # diffusers' own forward, on the same weights
    enable_token_chunking(block, 2)
    block.token_chunks = chunks  # 1: the two passes without chunks
    rope = (torch.randn(13, 16), torch.randn(13, 16))
    with torch.no_grad():
        args = (*single_block_inputs(32, 5, 8), rope)
        assert all(torch.equal(a, b) for a, b in zip(block(*args), theirs(*args)))
    inputs = single_block_inputs(32, 5, 8, grad=True)
    ours, reference = block_grads(block, block, *inputs, rope), block_grads(block, theirs, *inputs, rope)
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    for a, b in zip(ours[2:], reference[2:]):  # input and weight gradients: summed per chunk
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_blocks_under_bf16_autocast_give_the_same_bits(kind, row_independent):
    """Under autocast the passes cast q, k, v and the normed tokens to bf16 where the linears and the attention
    would, and skip diffusers' fp32 round trip of the attention output: the same bits (bf16 row-independent
    linears, so that only the chunking differs)."""
    torch.manual_seed(1)
    cls = BLOCKS[kind][0]
    block = cls(32, 2, 16)
    theirs = cls.forward.__get__(block)
    enable_token_chunking(block, 3)
    rope = (torch.randn(13, 16), torch.randn(13, 16))
    inputs = single_block_inputs(32, 5, 8, grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, reference = block_grads(block, block, *inputs, rope), block_grads(block, theirs, *inputs, rope)
    assert all(a.dtype == b.dtype for a, b in zip(ours, reference))
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    for a, b in zip(ours[2:], reference[2:]):  # bf16 partial sums per chunk: a few bf16 ulps of the largest entry
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()


def test_frozen_inputs_with_trainable_weights_get_gradients():
    """The first block's inputs need no gradient (frozen embedders), yet its adapters do: the chunked passes must
    still build a graph and give the weights the unchunked gradients."""
    torch.manual_seed(2)
    block = FluxSingleTransformerBlock(32, 2, 16)
    for p in block.parameters():
        p.requires_grad_(False)
    block.proj_out.weight.requires_grad_(True)
    block.attn.to_q.weight.requires_grad_(True)
    hidden, context, temb = single_block_inputs(32, 5, 8)
    rope = (torch.randn(13, 16), torch.randn(13, 16))
    grads = {}
    for chunks in (1, 3):
        enable_token_chunking(block, chunks)
        c, h = block(hidden, context, temb, rope)
        assert h.requires_grad
        (c.sum() + h.square().sum()).backward()
        grads[chunks] = [block.proj_out.weight.grad.clone(), block.attn.to_q.weight.grad.clone()]
        block.zero_grad(set_to_none=True)
    for a, b in zip(grads[3], grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_other_attention_processors_run_diffusers_forward(monkeypatch):
    """A processor the passes do not reproduce (here: extra joint_attention_kwargs) runs diffusers' unchunked
    forward: same result, no chunked pass."""
    torch.manual_seed(3)
    block = FluxSingleTransformerBlock(32, 2, 16)
    enable_token_chunking(block, 3)
    calls = []
    monkeypatch.setattr(token_chunking, "chunked_pass", lambda *a, **k: calls.append(a))
    block.attn.set_processor(ProportionalAttnProcessor())
    args = (*single_block_inputs(32, 5, 8), None)
    with torch.no_grad():
        out = block(*args, joint_attention_kwargs={"ip_adapter_masks": None})
        reference = FluxSingleTransformerBlock.forward(block, *args, joint_attention_kwargs={"ip_adapter_masks": None})
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(out, reference))


# ---- training: same loss, gradients equal up to summation order ---------------------------------------------------
MODES = {  # (diffusers block checkpointing, save_on_cpu, bf16 autocast)
    "no checkpointing": (False, False, False),
    "checkpointing": (True, False, False),
    "checkpointing + save_on_cpu": (True, True, False),
    "checkpointing + save_on_cpu + autocast": (True, True, True),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_training_gradients_match(tiny_flux, tiny_config, make_inputs, mode, monkeypatch, row_independent):
    block_checkpointing, save_on_cpu, autocast = MODES[mode]
    model = adapted_model(tiny_flux, torch.float32)
    if block_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    inputs = make_inputs(tiny_config, dtype=torch.float32)
    target = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(9))
    params = [p for _, p in trainable_parameters(model)]
    recomputed = []  # token chunks run again in backward (one per chunk of every chunked pass)
    real_backward = token_chunking._ChunkedPass.backward

    def counting_backward(ctx, *grads):
        recomputed.append(len(token_chunking.chunk_bounds(ctx.tokens, ctx.chunks)))
        return real_backward(ctx, *grads)

    monkeypatch.setattr(token_chunking._ChunkedPass, "backward", staticmethod(counting_backward))

    def step(chunks: int):
        enable_token_chunking(model, chunks)
        recomputed.clear()
        x = {k: v.clone().requires_grad_(k in ("hidden_states", "encoder_hidden_states")) for k, v in inputs.items()}
        offload = torch.autograd.graph.save_on_cpu() if save_on_cpu else contextlib.nullcontext()
        with offload, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.mse_loss(run(model, x).float(), target)
        loss.backward()
        grads = [x["hidden_states"].grad, x["encoder_hidden_states"].grad] + [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads, sum(recomputed)

    loss, grads, calls = step(1)
    assert calls == 0 and len(grads) > 2 and all(g is not None for g in grads)
    for chunks in (3, 64):
        chunked_loss, chunked_grads, calls = step(chunks)
        # Each block's two passes are recomputed chunk by chunk in backward: double blocks' image passes (24
        # tokens) in `chunks`, their text passes (7) whole, single blocks' passes (31 joint tokens) in `chunks`.
        assert calls == 2 * 2 * (min(chunks, 24) + 1) + 2 * 2 * min(chunks, 31)
        # Row-independent linears: the chunked forward is the unchunked one, bit for bit
        assert torch.equal(chunked_loss, loss)
        # Weight gradients are sums over tokens, now added chunk by chunk: fp32 summation order (measured <= 1.4e-6
        # of each tensor's largest entry). Under bf16 autocast each chunk's gradient matmul rounds its partial sum to
        # bf16 and the 1-ulp differences propagate back through the network: measured <= 1.6e-2 of the largest
        # entry, where autocast itself moves these gradients by up to 0.43 of it against fp32 on this tiny model.
        bound = 5e-2 if autocast else 1e-5
        for a, b in zip(chunked_grads, grads):
            assert (a - b).abs().max() <= bound * b.abs().max(), chunks


# ---- memory ---------------------------------------------------------------------------------------------------------
DIM, TEXT, IMAGE = 64, 24, 1000  # 1024 tokens


def peak_bytes(fn) -> int:
    tracker = LiveBytes()
    with tracker:
        tracker.start_phase()
        fn()
    return tracker.peak


def single_block_peaks(chunks: int) -> tuple[int, int]:
    """(no-grad forward peak, forward + backward peak under block checkpointing) of one single block."""
    torch.manual_seed(0)
    block = FluxSingleTransformerBlock(DIM, 4, DIM // 4)
    enable_token_chunking(block, chunks)
    hidden, context, temb = single_block_inputs(DIM, TEXT, IMAGE)

    def forward():
        with torch.no_grad():
            block(hidden, context, temb)

    def train_step():
        x = hidden.clone().requires_grad_()
        c, h = checkpoint(block, x, context, temb, use_reentrant=False)  # as diffusers' block checkpointing
        (c.sum() + h.sum()).backward()

    return peak_bytes(forward), peak_bytes(train_step)


def test_chunking_lowers_a_single_blocks_peak():
    tokens = TEXT + IMAGE
    mlp, cat = tokens * 4 * DIM * 4, tokens * 5 * DIM * 4  # fp32 GELU(proj_mlp) output and cat(attention, mlp)
    (fwd1, train1), (fwd4, train4) = single_block_peaks(1), single_block_peaks(4)
    print(
        f"\nsingle block, {tokens} tokens, hidden {DIM}, fp32: one T x 4D tensor {mlp / 2**20:.2f} MiB; "
        f"no-grad forward peak {fwd1 / 2**20:.2f} -> {fwd4 / 2**20:.2f} MiB; "
        f"checkpointed forward + backward peak {train1 / 2**20:.2f} -> {train4 / 2**20:.2f} MiB"
    )
    # Unchunked, the forward peaks with GELU's output and the cat alive together: 4 chunks keep a quarter of both.
    assert fwd1 - fwd4 >= 0.75 * (mlp + cat)
    # Backward: unchunked, the recomputed block holds the MLP intermediates and their gradients; chunked, the peak
    # moves to the attention's backward, so at least 3/4 of one T x 4D tensor must go (measured: 1.4 of them).
    assert train1 - train4 >= 0.75 * mlp


# ---- through the pipeline and the trainer -------------------------------------------------------------------------
def test_generation_with_chunks_is_identical(tiny_flux, row_independent):
    outputs = {}
    for chunks in (1, 3):
        pipe = urae_lite.load_pipeline(
            tiny_flux,
            memory={"quant": "nf4", "token_chunks": chunks},
            device="cpu",
            dtype=torch.float32,
            progress=False,
            width=64,
            height=64,
            steps=2,
        )
        seen = []
        pipe.transformer.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out[0].clone()))
        image = np.asarray(pipe("a cat", seed=2, max_sequence_length=32).image)
        outputs[chunks] = (seen, image)
        assert (type(pipe.transformer.single_transformer_blocks[0]) is ChunkedFluxSingleTransformerBlock) == (
            chunks > 1
        )
    assert len(outputs[1][0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(outputs[1][0], outputs[3][0]))
    assert np.array_equal(outputs[1][1], outputs[3][1])
    with pytest.raises(UraeError, match="token_chunks"):
        urae_lite.load_pipeline(tiny_flux, memory={"quant": "nf4", "token_chunks": 0}, device="cpu", progress=False)


def test_generate_cli_passes_token_chunks(tiny_flux, tmp_path, capsys, monkeypatch):
    seen = {}

    def stop(*args, **kwargs):
        seen.update(kwargs)
        raise UraeError("stopped before loading")

    argv = ["generate", "a cat", "--model", str(tiny_flux), "--device", "cpu", "--out", str(tmp_path / "cat.png")]
    monkeypatch.setattr(urae_lite.pipeline, "load_pipeline", stop)
    assert main([*argv, "--token-chunks", "3"]) == 2 and seen["memory"].token_chunks == 3
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*argv, "--token-chunks", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "token_chunks must be a whole number of at least 1" in err[0]


def fake_samples(tiny_config, n: int) -> list[TrainSample]:
    """Training samples as the cache would give them (16 image tokens, 32 text tokens)."""
    g = torch.Generator().manual_seed(11)
    ids = torch.zeros(4, 4, 3)
    ids[..., 1], ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
    return [
        TrainSample(
            i,
            f"image_{i}",
            "prompt",
            0.3 + 0.2 * i,
            torch.randn(1, 16, 64, generator=g),
            torch.randn(1, 16, 64, generator=g),
            torch.randn(1, 32, tiny_config["joint_attention_dim"], generator=g),
            torch.randn(1, tiny_config["pooled_projection_dim"], generator=g),
            ids.reshape(16, 3),
            torch.zeros(32, 3),
        )
        for i in range(n)
    ]


def test_trainer_run_with_chunks_matches(tiny_flux, tiny_config, tmp_path, row_independent):
    samples = fake_samples(tiny_config, 2)
    runs = {}
    for chunks in (1, 2):
        cfg = load_recipe(
            REPO / "recipes" / "train_2k_lora.yaml",
            recipe_overrides(
                tiny_flux, tmp_path, tmp_path / "out", **{"training.precision": "fp32", "memory.token_chunks": chunks}
            ),
        )
        assert cfg.memory.checkpointing == "cpu"  # save_on_cpu around checkpointed blocks
        model = build_model(cfg, torch.device("cpu"), progress=False)
        assert (type(model.transformer_blocks[0]) is ChunkedFluxTransformerBlock) == (chunks > 1)
        optimizer, scheduler = build_optimizer(cfg, (p for _, p in trainable_parameters(model)))
        trainer = Trainer(model, optimizer, scheduler, cfg, torch.device("cpu"))
        losses = []
        for sample in samples:
            losses.append(trainer.micro_step(sample))
            trainer.optimizer_step()
        runs[chunks] = losses, [p.detach().clone() for p in trainer.params]
    assert runs[2][0][0] == runs[1][0][0]  # same start, same loss
    assert runs[2][0][1] == pytest.approx(runs[1][0][1], rel=1e-5)
    for a, b in zip(runs[2][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(UraeError, match="token_chunks must be a whole number of at least 1, got 0"):
        load_recipe(
            REPO / "recipes" / "train_2k_lora.yaml",
            recipe_overrides(tiny_flux, tmp_path, tmp_path / "out", **{"memory.token_chunks": 0}),
        )
