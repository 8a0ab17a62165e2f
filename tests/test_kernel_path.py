"""The whole tiny FLUX with the fused kernel path forced on (Triton's interpreter on the CPU), and with the library
path, each checked layer by layer against the float64 formula of the computation it must do.

`URAE_LITE_KERNELS=on` sends every adapted linear through `urae_lite.kernels` whatever the device, so the model-level
glue a GPU uses (autocast dtypes, 3-D inputs, bias, trainable-prefix gradients, gradient checkpointing recomputing
the kernels, `save_on_cpu` moving what they save) runs here; `off` is the bitsandbytes / quanto + F.linear path.

Two paths that round in different places drift apart through the network by amounts no analysis bounds, so the
paths are not compared with each other. Instead every adapted linear in the model is tapped: its input x, output y,
output gradient dy (what the rest of the network sent back) and input gradient dx are recorded, and y, dx and the
trainable factors' gradients are checked against float64 evaluations from x, dy, the float64 decode of the layer's
stored weight and its factors, within the rounding of a correct evaluation (tests/references.py).
Both paths pass the same layer-local checks, so they compute the same model up to rounding at each layer.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from references import adapted_linear_float64, adapted_linear_grads_float64, assert_bounded, decode_float64
from train_utils import one_thread  # noqa: F401  (autouse: tiny matmuls, and float64 ones, gain nothing from threads)

from urae_lite.kernels import interpreting
from urae_lite.loader import adapted_layers, add_lora, load_transformer

pytestmark = pytest.mark.skipif(
    not interpreting() and not torch.cuda.is_available(),
    reason="urae_lite.kernels was imported before TRITON_INTERPRET=1 and there is no GPU",
)


def _model(tiny_flux, quant: str, dtype: torch.dtype, seed: int):
    """Tiny FLUX with a frozen style LoRA and a trainable rank-4 LoRA (fp32 masters, B non-zero so A gets grads)."""
    model = load_transformer(tiny_flux, quant, "cpu", dtype, progress=False)
    g = torch.Generator().manual_seed(seed)
    add_lora(model, "style", 3, targets="all", seed=seed)
    add_lora(model, "learn", 4, targets="all", seed=seed + 1)
    for _, layer in adapted_layers(model):
        style, learn = layer.slices["style"], layer.slices["learn"]
        style.A.requires_grad_(False)
        style.B = torch.nn.Parameter((torch.randn(style.B.shape, generator=g) * 0.05).to(dtype), requires_grad=False)
        learn.A = torch.nn.Parameter(learn.A.detach().float())
        learn.B = torch.nn.Parameter(torch.randn(learn.B.shape, generator=g) * 0.05)
    return model


class _Tap(torch.autograd.Function):
    """Identity on a layer's input whose backward records the gradient this layer sends to its input."""

    @staticmethod
    def forward(ctx, x, record):
        ctx.record = record
        return x.clone()

    @staticmethod
    def backward(ctx, dx):
        ctx.record.append(dx.detach().clone())
        return dx, None


@contextlib.contextmanager
def tapped(model):
    """Per adapted linear: every forward call's (x, y), and the dy / dx its backward saw."""
    records = {name: {"calls": [], "dy": [], "dx": []} for name, _ in adapted_layers(model)}
    handles = []
    for name, layer in adapted_layers(model):
        rec = records[name]

        def pre(module, args, rec=rec):
            x = args[0]
            return (_Tap.apply(x, rec["dx"]), *args[1:]) if x.requires_grad else None

        def post(module, args, y, rec=rec):
            rec["calls"].append((args[0].detach().clone(), y.detach().clone()))
            if y.requires_grad:
                y.register_hook(lambda dy, rec=rec: rec["dy"].append(dy.detach().clone()))

        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _run(model, inputs: dict, mode: str, monkeypatch, autocast: bool = False, offload: bool = False):
    """Run forward + backward with the kernels `on` or `off` (and check that the switch took); the taps' records."""
    from urae_lite import kernels

    calls = []
    fused = kernels.adapted_linear
    monkeypatch.setattr(kernels, "adapted_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    monkeypatch.setenv("URAE_LITE_KERNELS", mode)
    model.zero_grad(set_to_none=True)
    amp = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    saved = torch.autograd.graph.save_on_cpu() if offload else contextlib.nullcontext()
    with tapped(model) as records, amp, saved:
        out = model(**inputs, return_dict=False)[0]
        out.float().square().mean().backward()
    monkeypatch.setattr(kernels, "adapted_linear", fused)
    assert bool(calls) == (mode == "on")
    assert out.shape == inputs["hidden_states"].shape and torch.isfinite(out).all()
    return records


def _check_layers(model, records: dict, dtype: torch.dtype, recomputed: set[str] = frozenset()) -> None:
    """Every adapted linear's y, dx, dA and dB against float64 from its recorded x and dy, within the rounding of a
    correct evaluation in `dtype` (tests/references.py: the library path's rounding sites, which include the
    kernels'; fp32 accumulation; the dequantized W's decode bound carried through x or dy). The factors enter in
    the compute dtype (fp32 masters cast down, as autocast does); scales are 1. M = the layer's tokens."""
    assert records
    n_dx = 0
    for name, layer in adapted_layers(model):
        rec = records[name]
        calls = rec["calls"]
        assert len(calls) == (2 if name in recomputed else 1), (name, len(calls))
        x, y = calls[0]
        for x2, y2 in calls[1:]:  # the checkpoint's recomputation repeats the forward exactly (same ops, shapes)
            assert torch.equal(x2, x) and torch.equal(y2, y), name
        assert len(rec["dy"]) == 1, (name, len(rec["dy"]))
        K, N = layer.in_features, layer.out_features
        x = x.to(dtype).reshape(-1, K)  # the layer computes in `dtype` (autocast's, else the input's)
        dy = rec["dy"][0].reshape(-1, N)
        style, learn = layer.slices["style"], layer.slices["learn"]
        A = torch.cat([learn.A.detach().to(dtype), style.A.to(dtype)])
        B = torch.cat([learn.B.detach().to(dtype), style.B.to(dtype)], dim=1)
        assert learn.scale == style.scale == 1.0
        r = learn.rank
        w64, w_err = decode_float64(layer.base)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        assert_bounded(y.reshape(-1, N), adapted_linear_float64(x, w64, w_err, bias, A, B, dtype=dtype), f"{name} y")
        grads = adapted_linear_grads_float64(x, dy, w64, w_err, A, B, r, dtype)
        if rec["dx"]:
            assert len(rec["dx"]) == 1, name
            n_dx += 1
            assert_bounded(rec["dx"][0].reshape(-1, K), grads["dx"], f"{name} dx")
        assert_bounded(learn.A.grad, grads["dA"], f"{name} dA")
        assert_bounded(learn.B.grad, grads["dB"], f"{name} dB")
        assert learn.A.grad.dtype == learn.B.grad.dtype == torch.float32  # fp32 masters get fp32 gradients
        assert style.A.grad is None and style.B.grad is None, name  # frozen slices get none
    assert n_dx > len(records) // 2  # every block linear's input needs a gradient (the embedders' do not)


@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("quant", ["nf4", "fp8", "bf16"])
def test_fp32_model_layers_match_float64(tiny_flux, tiny_config, make_inputs, quant, mode, monkeypatch, seed):
    """fp32 compute, kernels on and off: every layer's output and gradients within fp32 rounding of float64."""
    model = _model(tiny_flux, quant, torch.float32, seed)
    inputs = make_inputs(tiny_config, seed=seed, dtype=torch.float32)
    records = _run(model, inputs, mode, monkeypatch)
    _check_layers(model, records, torch.float32)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.split(".")[-2] == "learn" for n in trainable)  # only the trainable slice learns


@pytest.mark.parametrize("mode", ["off", "on"])
def test_bf16_autocast_checkpointing_and_save_on_cpu(tiny_flux, tiny_config, make_inputs, mode, monkeypatch, seed):
    """The training setup: bf16 NF4 base under autocast, fp32 trainable masters, block checkpointing (the backward
    recomputes each block through the kernels) and saved tensors moved to host memory, kernels on and off."""
    model = _model(tiny_flux, "nf4", torch.bfloat16, seed)
    model.enable_gradient_checkpointing()
    model.train()
    inputs = make_inputs(tiny_config, seed=seed, dtype=torch.bfloat16)
    records = _run(model, inputs, mode, monkeypatch, autocast=True, offload=True)
    blocks = ("transformer_blocks.", "single_transformer_blocks.")  # checkpointing recomputes these in backward
    _check_layers(model, records, torch.bfloat16, recomputed={n for n in records if n.startswith(blocks)})
