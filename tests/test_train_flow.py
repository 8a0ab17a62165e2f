"""Flow-matching math, latent packing and schedules (no models)."""

from __future__ import annotations

import pytest
import torch

from urae_lite.memory import MemorySettings
from urae_lite.train.flow import (
    flow_loss,
    latent_image_ids,
    noisy_and_target,
    pack_latents,
    posterior_sample,
    sample_generator,
    sample_sigma,
    unpack_latents,
)


def test_pack_and_ids_match_diffusers_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(1, 16, 6, 10)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 1, 16, 6, 10))
    assert torch.equal(unpack_latents(pack_latents(x), 6, 10), x)
    expected = FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    assert torch.equal(latent_image_ids(6, 10), expected)


def test_uniform_sigma_is_the_authors_grid():
    gen = torch.Generator().manual_seed(0)
    sigmas = [sample_sigma(gen) for _ in range(4000)]
    assert all(0.001 <= s <= 1.0 and abs(s * 1000 - round(s * 1000)) < 1e-9 for s in sigmas)
    assert abs(sum(sigmas) / len(sigmas) - 0.5) < 0.02
    assert sum(s < 0.25 for s in sigmas) / len(sigmas) == pytest.approx(0.25, abs=0.03)
    logit = [sample_sigma(gen, "logit_normal") for _ in range(4000)]
    assert all(0.001 <= s <= 1.0 for s in logit)
    assert sum(0.25 < s < 0.75 for s in logit) / 4000 > 0.6  # mass concentrated in the middle


def test_posterior_sample_and_noisy_target_follow_the_formulas():
    mean, std = torch.randn(16, 4, 4), torch.rand(16, 4, 4)
    gen = torch.Generator().manual_seed(3)
    x0 = posterior_sample(mean, std, gen, 0.1159, 0.3611)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x0, (mean + std * eps - 0.1159) * 0.3611)
    x, target = noisy_and_target(x0, 0.3, gen)
    n = target + x0
    torch.testing.assert_close(x, 0.7 * x0 + 0.3 * n)
    # a fresh posterior draw per sample: another index gives another ε
    other = posterior_sample(mean, std, sample_generator(0, 1), 0.1159, 0.3611)
    again = posterior_sample(mean, std, sample_generator(0, 1), 0.1159, 0.3611)
    assert torch.equal(other, again) and not torch.equal(
        other, posterior_sample(mean, std, sample_generator(0, 2), 0.1159, 0.3611)
    )


def test_flow_loss_is_the_mean_squared_velocity_error_in_fp32():
    """MSE over every element, weight 1, in fp32 even for a bf16 prediction, against float64 by hand."""
    g = torch.Generator().manual_seed(7)
    prediction = torch.randn(2, 9, 12, generator=g).bfloat16()  # as a bf16 forward returns it
    target = torch.randn(2, 9, 12, generator=g)
    loss = flow_loss(prediction, target)
    assert loss.dtype == torch.float32 and loss.shape == ()
    p, t = prediction.double(), target.double()
    expected = sum(((p - t) ** 2).flatten().tolist()) / p.numel()  # plain Python sum of the 216 squares
    # fp32, u = 2^-24: the difference rounds once (doubled by the square) and the square once: 3u per term; a sum of
    # 216 non-negative terms adds ≤ 215u relative, the division u: ≤ 219u ≈ 1.3e-5 in all. In bf16 (8 significant
    # bits) the loss would be off by ~1e-3 or more.
    assert abs(loss.item() - expected) <= 219 * 2**-24 * expected
    assert flow_loss(target, target).item() == 0.0


class _ToyModel(torch.nn.Module):
    """What the Trainer calls, on two small tensors: prediction = x·Wᵀ + b per token (W 4x4, b 4); `x_embedder`
    and `config` are the two attributes the Trainer reads."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.x_embedder = torch.nn.Linear(4, 4)
        with torch.no_grad():
            self.x_embedder.weight.copy_(W)
            self.x_embedder.bias.copy_(b)
        self.config = type("Config", (), {"guidance_embeds": False})()

    def forward(self, hidden_states, return_dict=False, **_):
        return (self.x_embedder(hidden_states),)


@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # clipping active (the norm is ≈ 1-3) / inactive
def test_training_step_loss_norm_and_clipped_update_by_hand(max_norm):
    """Two micro-steps of gradient accumulation, clipping and an SGD(lr=1) update on a toy model, against the loss,
    gradient, norm and clipped step computed by hand in float64."""
    from urae_lite.train.config import TrainConfig, TrainingConfig
    from urae_lite.train.loop import Trainer
    from urae_lite.train.samples import TrainSample

    g = torch.Generator().manual_seed(11)
    W, b = torch.randn(4, 4, generator=g), torch.randn(4, generator=g)
    model = _ToyModel(W, b)
    cfg = TrainConfig(
        model="-",
        output_dir="-",
        training=TrainingConfig(gradient_accumulation=2, max_grad_norm=max_norm, precision="fp32"),
        memory=MemorySettings(checkpointing="off"),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = Trainer(model, optimizer, scheduler, cfg, torch.device("cpu"))
    samples = []
    for i in range(2):
        x, target = torch.randn(1, 5, 4, generator=g), torch.randn(1, 5, 4, generator=g)
        samples.append(
            TrainSample(i, f"item{i}", "prompt", 0.5, x, target, torch.zeros(1, 2, 4), torch.zeros(1, 4), None, None)
        )
    losses = [trainer.micro_step(s) for s in samples]
    norm = trainer.optimizer_step()

    # by hand, float64: per sample L = mean over its n = 5·4 elements of (x·Wᵀ + b − t)², so with R = x·Wᵀ + b − t
    # dL/dW = (2/n)·Rᵀx and dL/db = (2/n)·Σ_tokens R; the step's gradient is the mean over the G = 2 micro-steps.
    # Rounding bounds (u = 2^-24, fp32): R̂ (a 4-term product sum, the bias, the target) is within 8u·Ra, Ra the
    # same sum over |terms|; a gradient element (≤ 10 products of R̂ and x, ≤ 5 more roundings) is within 30u of the
    # same computation on |terms| (mW, mb).
    u = 2.0**-24
    Wd, bd = W.double(), b.double()
    gW, gb = torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    mW, mb = torch.zeros_like(gW), torch.zeros_like(gb)
    for s, loss in zip(samples, losses):
        x, t = s.noisy[0].double(), s.target[0].double()
        R = x @ Wd.T + bd - t
        n = R.numel()
        Ra = (x.abs() @ Wd.abs().T + bd.abs() + t.abs()) * (1 + 8 * u)  # ≥ |R| and ≥ |R̂|
        expected_loss = (R**2).sum().item() / n
        # |R̂² − R²| ≤ 2·|R|·8u·Ra + (8u·Ra)², then 3u for the square, the 20-term sum and the division
        loss_error = ((16 * u * R.abs() * Ra + (8 * u * Ra) ** 2).sum().item()) / n + 25 * u * expected_loss
        assert abs(loss - expected_loss) <= loss_error
        gW += (2 / n) * R.T @ x / 2
        gb += (2 / n) * R.sum(0) / 2
        mW += (2 / n) * Ra.T @ x.abs() / 2
        mb += (2 / n) * Ra.sum(0) / 2
    total = (gW.square().sum() + gb.square().sum()).sqrt().item()
    norm_error = 30 * u * (total + (mW.square().sum() + mb.square().sum()).sqrt().item())
    assert abs(norm - total) <= norm_error  # the pre-clip norm over the trainable tensors only
    coef = min(1.0, max_norm / (total + 1e-6))  # torch's clip_grad_norm_: scale by max_norm / (norm + 1e-6) if < 1
    assert (coef < 1) == (max_norm < 1)
    # fp32 coefficient: the norm's relative error plus 3 roundings (1.0 exactly when not clipping)
    coef_error = norm_error / total + 3 * u if coef < 1 else 0.0
    # SGD(lr=1): p ← p − coef·g, one rounding of the scaled gradient and one of the sum
    for got, p0, grad, mag in ((model.x_embedder.weight, Wd, gW, mW), (model.x_embedder.bias, bd, gb, mb)):
        expected = p0 - coef * grad
        bound = u * p0.abs() + coef * (30 * u * mag + (coef_error + 2 * u) * grad.abs()) + u * expected.abs()
        assert ((got.detach().double() - expected).abs() <= bound).all()
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
