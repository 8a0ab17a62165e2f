"""The whole tiny FLUX with the fused kernel path forced on (Triton's interpreter on the CPU) equals the library path.

`URAE_LITE_KERNELS=on` sends every adapted linear through `urae_lite.kernels` whatever the device, so the model-level
glue a GPU uses (autocast dtypes, 3-D inputs, bias, trainable-prefix gradients, gradient checkpointing recomputing
the kernels, `save_on_cpu` moving what they save) runs here; `off` is the bitsandbytes / quanto + F.linear path.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

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


def _run(model, inputs: dict, mode: str, monkeypatch, autocast: bool = False, offload: bool = False):
    """Output and the trainable factors' gradients with the kernels `on` or `off` (and that the switch took)."""
    from urae_lite import kernels

    calls = []
    fused = kernels.adapted_linear
    monkeypatch.setattr(kernels, "adapted_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    monkeypatch.setenv("URAE_LITE_KERNELS", mode)
    model.zero_grad(set_to_none=True)
    amp = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    saved = torch.autograd.graph.save_on_cpu() if offload else contextlib.nullcontext()
    with amp, saved:
        out = model(**inputs, return_dict=False)[0]
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    monkeypatch.setattr(kernels, "adapted_linear", fused)
    assert bool(calls) == (mode == "on")
    return out.detach().float(), grads


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool((a - b).norm() <= rel * b.norm() + 1e-12)


@pytest.mark.parametrize("quant", ["nf4", "fp8", "bf16"])
def test_fp32_model_kernel_path_equals_library_path(tiny_flux, tiny_config, make_inputs, quant, monkeypatch):
    """fp32 compute: the kernels' fp32 products (ieee) and the reference differ only in summation order."""
    seed = torch.seed() % 2**31
    model = _model(tiny_flux, quant, torch.float32, seed)
    inputs = make_inputs(tiny_config, seed=seed, dtype=torch.float32)
    ref_out, ref_grads = _run(model, inputs, "off", monkeypatch)
    out, grads = _run(model, inputs, "on", monkeypatch)
    assert out.shape == ref_out.shape and torch.isfinite(out).all()
    assert _close(out, ref_out, 1e-5), (out - ref_out).abs().max()
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    assert all(name.split(".")[-2] == "learn" for name in grads)  # only the trainable slice learns
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and _close(grad, ref_grads[name], 1e-4), name


def test_bf16_autocast_checkpointing_and_save_on_cpu(tiny_flux, tiny_config, make_inputs, monkeypatch):
    """The training setup: bf16 base under autocast, fp32 trainable masters, block checkpointing (the backward
    recomputes each block through the kernels) and saved tensors moved to host memory."""
    seed = torch.seed() % 2**31
    model = _model(tiny_flux, "nf4", torch.bfloat16, seed)
    model.enable_gradient_checkpointing()
    model.train()
    inputs = make_inputs(tiny_config, seed=seed, dtype=torch.bfloat16)
    ref_out, ref_grads = _run(model, inputs, "off", monkeypatch, autocast=True, offload=True)
    out, grads = _run(model, inputs, "on", monkeypatch, autocast=True, offload=True)
    # bf16 roundings in different places (the kernel adds branch and bias in fp32 before one rounding)
    assert _close(out, ref_out, 2e-2)
    assert grads.keys() == ref_grads.keys() and all(g.dtype == torch.float32 for g in grads.values())
    flat, ref_flat = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads, ref_grads))
    assert _close(flat, ref_flat, 3e-2)
    # Per factor the error is larger where a gradient comes from few rounded terms: the adaLN modulation linears see
    # one conditioning vector, and their small A gradients differ by up to 4.5% (8 seeds) or 12% (seen once); a
    # wrong gradient would be off by its whole size.
    for name, grad in grads.items():
        assert _close(grad, ref_grads[name], 0.25), name
