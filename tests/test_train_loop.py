"""Training on the tiny model: what changes, what the model is fed, loss, 4K init, resume, several processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_utils import REPO, RESOLUTION, assert_same_tree, make_dataset, one_thread, recipe_overrides  # noqa: F401

from urae_lite.adapter_io import read_adapter, save_adapter
from urae_lite.errors import UraeError
from urae_lite.hires import ProportionalAttnProcessor, set_ntk, set_proportional_attention
from urae_lite.loader import add_lora, load_transformer
from urae_lite.minor import MINOR_RESIDUAL_SLICE, MINOR_SLICE
from urae_lite.train.cache import build_cache, open_cache
from urae_lite.train.config import TrainConfig, load_recipe
from urae_lite.train.data import SkipLog
from urae_lite.train.loop import Trainer, oom_advice, oom_guard, train
from urae_lite.train.model import build_model, load_trainable, trainable_parameters
from urae_lite.train.optim import build_optimizer
from urae_lite.train.samples import SampleSource, vae_factors

RECIPE_2K = REPO / "recipes" / "train_2k_lora.yaml"
RECIPE_4K = REPO / "recipes" / "train_4k_minor.yaml"
FAST = {"memory.quant": "bf16", "training.precision": "fp32"}  # bf16 matmuls are ~30x slower than fp32 on most CPUs
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_flux):
    folder = make_dataset(tmp_path_factory.mktemp("loop") / "data")
    build_cache(folder, str(tiny_flux), RESOLUTION, max_sequence_length=32, progress=False)
    return folder


@pytest.fixture(scope="module")
def adapter_2k(tmp_path_factory, tiny_flux):
    """A 2K LoRA with non-zero B, as a trained one would have."""
    model = load_transformer(tiny_flux, "bf16", progress=False)
    add_lora(model, "x", rank=4, seed=5)
    gen = torch.Generator().manual_seed(6)
    for p in model.parameters():
        if p.requires_grad and p.shape[1] == 4:  # the B factors
            p.data = torch.randn(p.shape, generator=gen).to(p.dtype) * 0.2
    return save_adapter(model, tmp_path_factory.mktemp("2k") / "2k.safetensors")


def recipe(path: Path, tiny_flux, data, out, **extra) -> TrainConfig:
    return load_recipe(path, recipe_overrides(tiny_flux, data, out, **extra))


def hires_4k(model):
    """What the 4K recipe trains with: NTK 10 and proportional attention."""
    set_ntk(model, 10)
    set_proportional_attention(model, True)
    return model


def trainer_for(cfg: TrainConfig) -> tuple[Trainer, SampleSource]:
    model = build_model(cfg, CPU, progress=False)
    optimizer, scheduler = build_optimizer(cfg, (p for _, p in trainable_parameters(model)))
    source = SampleSource(
        open_cache(cfg.data.dir, cfg.model, RESOLUTION), cfg, *vae_factors(Path(cfg.model)), SkipLog()
    )
    return Trainer(model, optimizer, scheduler, cfg, CPU), source


@torch.no_grad()
def held_out_losses(trainer: Trainer, source: SampleSource, n: int = 16) -> torch.Tensor:
    """Losses on n fixed samples (indices no run reaches: image, caption, σ and noise fixed), float64."""
    return torch.tensor([trainer.forward_loss(source.get(10_000 + i)).item() for i in range(n)], dtype=torch.float64)


def assert_loss_went_down(before: torch.Tensor, after: torch.Tensor) -> None:
    """The paired drop on the held-out samples (each sample scored before and after with the same draws) is more
    than 3 standard errors above zero: under "training did not lower the expected loss" a mean that high has
    one-sided probability below 0.5% (Student t, 15 degrees of freedom: t_0.995 = 2.95). A fixed fraction of the
    loss (the σ-dependent noise term dominates it and is the same before and after) says nothing on its own; this
    bound comes from the samples' own spread and fails for a run that learned nothing or got worse."""
    drop = before - after
    standard_error = drop.std() / len(drop) ** 0.5
    assert drop.mean() > 3 * standard_error, (drop.mean().item(), standard_error.item(), drop.tolist())


def test_a_step_changes_only_the_adapter_and_feeds_guidance_one(tiny_flux, data, tmp_path):
    cfg = recipe(RECIPE_2K, tiny_flux, data, tmp_path, **{"optimizer.d0": 1e-3})  # NF4 base, bf16, Prodigy
    trainer, source = trainer_for(cfg)
    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model.register_forward_pre_hook(lambda m, args, kw: seen.append((kw["guidance"], kw["timestep"])), with_kwargs=True)
    for step in range(2):
        trainer.micro_step(source.get(step))
        trainer.optimizer_step()
    after = model.state_dict()
    trainable = {n for n, _ in trainable_parameters(model)}
    assert trainable and all(".slices.lora." in n for n in trainable)
    assert len(trainable) == 2 * 14  # A and B on the authors' targets: 2 double blocks x 4 + 2 single x 3
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every adapter factor moved, nothing else did (NF4 base bit-identical)
    assert all(g.tolist() == [1.0] for g, _ in seen)
    assert [t.item() for _, t in seen] == pytest.approx([source.get(i).sigma for i in range(2)])

    columns = [source.get(i).column for i in range(400)]  # 20 % original captions, 80 % generated ones
    assert 0.15 < columns.count("prompt") / len(columns) < 0.25
    assert {source.get(i).item for i in range(8)} == {f"image_{i}" for i in range(8)}  # an epoch visits every item

    cfg.training.guidance = 3.5  # the paper's ablation stays possible
    trainer, source = trainer_for(cfg)
    trainer.model.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["guidance"], 0)), with_kwargs=True)
    trainer.forward_loss(source.get(0))
    assert seen[-1][0].tolist() == [3.5]


def test_checkpointing_modes_give_the_same_gradients(tiny_flux, data, tmp_path):
    grads = {}
    for mode in ("off", "on", "cpu"):
        trainer, source = trainer_for(
            recipe(RECIPE_2K, tiny_flux, data, tmp_path, **FAST, **{"memory.checkpointing": mode})
        )
        for p in trainer.params:  # non-zero B so that every factor gets a gradient
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(p.numel()))
        trainer.micro_step(source.get(0))
        grads[mode] = [p.grad.clone() for p in trainer.params]
    for mode in ("on", "cpu"):
        for a, b in zip(grads["off"], grads[mode]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_a_step_lowers_the_loss_at_the_rate_of_its_gradient(tiny_flux, data, tmp_path, seed):
    """One training step as `train` takes it (forward, flow loss, backward with activations checkpointed to the CPU
    as shipped, clipping, optimizer, schedule), in float64 on one fixed sample with plain SGD and clipping active:

    * the factors move by exactly -lr · c/(|g| + 1e-6) · g (torch's clipping formula), g the step's gradient;
    * along that direction the float64 loss falls at rate |g|: the central difference (L(-h) - L(h)) / 2h,
      Richardson-extrapolated from h = s and s/2, equals |g|. So the step lowers the loss by s·|g| to first order,
      s the step length: the gradient is that of the loss being minimised, and the step goes down it."""
    cfg = recipe(RECIPE_2K, tiny_flux, data, tmp_path, **FAST, optimizer="{_component_: torch.optim.SGD, lr: 1.0}")
    model = build_model(cfg, CPU, progress=False).double()  # the bf16 base becomes float64 exactly
    params = [p for _, p in trainable_parameters(model)]
    gen = torch.Generator().manual_seed(seed)
    for p in params:  # non-zero B: every factor has a gradient (at B = 0 the A factors have none)
        p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1
    optimizer, scheduler = build_optimizer(cfg, params)
    trainer = Trainer(model, optimizer, scheduler, cfg, CPU)
    sample = SampleSource(
        open_cache(cfg.data.dir, cfg.model, RESOLUTION), cfg, *vae_factors(Path(cfg.model)), SkipLog()
    ).get(0)

    def loss64() -> float:
        """The flow-matching loss in float64, written here: mean of (prediction - (noise - x0))²."""
        captured = {}
        with torch.no_grad(), pytest.MonkeyPatch.context() as m:
            m.setattr("urae_lite.train.loop.flow_loss", lambda p, t: captured.setdefault("p", p) * 0)
            trainer.forward_loss(sample)
        return torch.mean((captured["p"].double() - sample.target.double()) ** 2).item()

    theta = [p.detach().clone() for p in params]
    loss0 = loss64()
    trainer.micro_step(sample)
    grads = [p.grad.clone() for p in params]
    norm = torch.sqrt(sum((g * g).sum() for g in grads)).item()
    assert norm > 0
    # Step: clipping to half the norm (so that it acts), and a length s whose first-order drop s·|g| is 3e-3 of the
    # loss, far above the rounding noise of L (see below) and short enough for the s² terms to be small (checked).
    clip = norm / 2
    coef = clip / (norm + 1e-6)
    step = 3e-3 * loss0 / norm
    lr = step / (coef * norm)
    cfg.training.max_grad_norm = clip
    optimizer.param_groups[0]["lr"] = lr  # this step's rate (the constant schedule restores 1.0 after it)
    assert trainer.optimizer_step() == pytest.approx(norm, rel=1e-12)  # the pre-clip norm it reports
    for p, p0, g in zip(params, theta, grads):  # a few float64 roundings per element
        torch.testing.assert_close(p.detach(), p0 - lr * coef * g, rtol=1e-14, atol=1e-16)
        assert p.grad is None  # cleared for the next step
    loss1 = loss64()
    assert loss1 < loss0

    def along(t: float) -> float:  # the loss at theta0 - t·g/|g|
        with torch.no_grad():
            for p, p0, g in zip(params, theta, grads):
                p.copy_(p0 - t * g / norm)
        return loss64()

    assert along(step) == pytest.approx(loss1, rel=1e-13)  # the step went exactly that way, that far
    central = {h: (along(-h) - along(h)) / (2 * h) for h in (step, step / 2)}
    rate = (4 * central[step / 2] - central[step]) / 3  # Richardson: the h² term cancels, h⁴ remains
    # First-order regime: the h² term |D(s/2) - rate| is under 3e-3 of the rate, so the h⁴ term left in `rate`
    # is of order its square, ~1e-5.
    assert abs(central[step / 2] - rate) < 3e-3 * norm
    # Error budget for rate vs |g| (relative): the h⁴ term, ≤ ~1e-5; rounding in L: the forward is float64 except
    # diffusers' rotary embedding, which rounds q and k to float32 (2^-24 ≈ 6e-8), moving L by at most ~1e-7 of
    # itself, i.e. ≤ 1e-7·L / (s·|g|) ≈ 3e-5 in the difference quotients; the gradient carries the float32
    # rounding of `flow_loss`'s residual, ~1e-7. Together < 1e-4. A wrong gradient or step (a dropped or doubled
    # term, a factor 1/G, another loss, a sign) is off by O(1).
    assert rate == pytest.approx(norm, rel=1e-4)


def test_2k_lora_loss_goes_down(tiny_flux, data, tmp_path):
    steps = 30
    cfg = recipe(
        RECIPE_2K,
        tiny_flux,
        data,
        tmp_path / "run",
        **FAST,
        **{"training.steps": steps, "checkpoint.every": steps, "optimizer.d0": 1e-3},
    )
    train(cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, steps + 1)) and all(r["loss"] > 0 for r in log)
    trainer, source = trainer_for(cfg)
    before = held_out_losses(trainer, source)
    load_trainable(
        trainer.model, load_file(tmp_path / "run" / "checkpoints" / f"step-{steps:08d}" / "trainable.safetensors")
    )
    assert_loss_went_down(before, held_out_losses(trainer, source))
    adapter = read_adapter(tmp_path / "run" / "adapter.safetensors")
    assert adapter.kind == "lora" and adapter.ranks == {16} and len(adapter.modules) == 14


def test_4k_minor_starts_at_base_plus_2k_and_loss_goes_down(
    tiny_flux, data, adapter_2k, tmp_path, make_inputs, tiny_config
):
    steps = 30
    cfg = recipe(
        RECIPE_4K,
        tiny_flux,
        data,
        tmp_path / "run",
        **FAST,
        **{
            "adapter.base_adapters": f"[{adapter_2k}]",
            "training.steps": steps,
            "checkpoint.every": steps,
            "optimizer": "{_component_: bitsandbytes.optim.AdamW8bit, lr: 3.0e-3}",
        },
    )
    trainer, source = trainer_for(cfg)
    model = trainer.model
    layers = [m for m in model.modules() if hasattr(m, "slices") and MINOR_SLICE in m.slices]
    assert len(layers) == 14
    for layer in layers:  # effective weight = base + 2K exactly: the minor slice and its residual cancel
        assert torch.equal(layer.slices[MINOR_SLICE].delta(), -layer.slices[MINOR_RESIDUAL_SLICE].delta())
        assert not layer.slices["adapter0"].trainable and layer.slices[MINOR_SLICE].trainable
    assert model.pos_embed.theta == 100000
    assert {type(p) for p in model.attn_processors.values()} == {ProportionalAttnProcessor}
    reference = hires_4k(
        load_transformer(tiny_flux, "bf16", dtype=torch.float32, adapters=[adapter_2k], progress=False)
    )
    inputs = make_inputs(tiny_config, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, reference(**inputs).sample, rtol=0, atol=1e-5)

    before = held_out_losses(trainer, source)
    train(cfg, progress=False)
    load_trainable(model, load_file(tmp_path / "run" / "checkpoints" / f"step-{steps:08d}" / "trainable.safetensors"))
    assert_loss_went_down(before, held_out_losses(trainer, source))

    # both exports reproduce the trained model: the plain rank-48 LoRA alone, the authors' layout with the 2K
    plain = read_adapter(tmp_path / "run" / "adapter.safetensors")
    assert plain.kind == "lora" and plain.ranks == {4 + 16 + 16}
    assert read_adapter(tmp_path / "run" / "adapter_urae4k.safetensors").kind == "urae_minor"
    with torch.no_grad():
        want = model(**inputs).sample
        for adapters in (
            [tmp_path / "run" / "adapter.safetensors"],
            [adapter_2k, tmp_path / "run" / "adapter_urae4k.safetensors"],
        ):
            loaded = hires_4k(
                load_transformer(tiny_flux, "bf16", dtype=torch.float32, adapters=adapters, progress=False)
            )
            torch.testing.assert_close(loaded(**inputs).sample, want, rtol=0, atol=2e-2)


def _cli(*args: str, env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`urae-lite train` in fresh processes, one intra-op thread like this one (results depend on the thread count)."""
    command = (launcher or [sys.executable]) + ["-m", "urae_lite.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _killed_at(step: int, recipe_path: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """A training run in a fresh process that dies (as if killed: no cleanup) when step `step` begins."""
    script = (
        f"import os\nfrom urae_lite.train.config import load_recipe\nfrom urae_lite.train.loop import train\n"
        f"train(load_recipe({str(recipe_path)!r}, {list(overrides)!r}), progress=False,\n"
        f"      on_step=lambda step: step == {step} and os._exit(3))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def test_resume_after_a_kill_is_exact(tiny_flux, data, tmp_path):
    extra = {**FAST, "training.steps": 10, "checkpoint.every": 5, "optimizer.d0": 1e-3}
    straight = recipe(
        RECIPE_2K,
        tiny_flux,
        data,
        tmp_path / "straight",
        **extra,
        **{"checkpoint.keep": 1, "validation.every": 5, "validation.steps": 2, "validation.prompts": "[a red flower]"},
    )
    train(straight, progress=False)  # validation draws from its own generators: it cannot change the training
    assert [p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()] == ["step-00000010"]  # keep 1
    from PIL import Image

    for step in (5, 10):
        assert Image.open(tmp_path / "straight" / "validation" / f"step-{step:08d}" / "00.png").size == (64, 64)
    with pytest.raises(UraeError, match="already holds checkpoints: pass --resume"):
        train(straight, progress=False)

    killed = recipe_overrides(tiny_flux, data, tmp_path / "killed", **extra)
    result = _killed_at(7, RECIPE_2K, killed)
    assert result.returncode == 3, result.stderr[-2000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000005"]
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()
    (ckpts / ".step-00000006.partial").mkdir()  # what a kill during a checkpoint write leaves behind
    (ckpts / "step-00000006").mkdir()  # an incomplete folder (no state.json) is never resumed from

    train(load_recipe(RECIPE_2K, killed), resume="auto", progress=False)
    for name in ("trainable.safetensors", "adapter.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoints" / "step-00000010" / name)
        b = load_file(ckpts / "step-00000010" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    opt_a = torch.load(tmp_path / "straight" / "checkpoints" / "step-00000010" / "optimizer.pt", weights_only=False)
    opt_b = torch.load(ckpts / "step-00000010" / "optimizer.pt", weights_only=False)
    assert assert_same_tree(opt_a, opt_b) >= 4 * 28  # every state tensor of the 28 factors, groups, schedule
    logs = [
        [json.loads(x)["loss"] for x in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("straight", "killed")
    ]
    assert len(logs[1]) == 10 and logs[0] == logs[1]  # step 6-7 lines of the killed run were replaced


def test_two_processes_match_gradient_accumulation(tiny_flux, data, tmp_path):
    extra = {**FAST, "training.steps": 3, "checkpoint.every": 3, "optimizer.d0": 1e-3}
    single = recipe(RECIPE_2K, tiny_flux, data, tmp_path / "single", **extra, **{"training.gradient_accumulation": 2})
    train(single, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
    ]
    result = _cli(str(RECIPE_2K), *recipe_overrides(tiny_flux, data, tmp_path / "multi", **extra), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_file(tmp_path / "single" / "checkpoints" / "step-00000003" / "trainable.safetensors")
    b = load_file(tmp_path / "multi" / "checkpoints" / "step-00000003" / "trainable.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("single", "multi")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    state = json.loads((tmp_path / "multi" / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples_per_step"] == 2
    assert {p.name for p in (tmp_path / "multi" / "checkpoints" / "step-00000003").glob("rng-*.pt")} == {
        "rng-0.pt",
        "rng-1.pt",
    }


def test_bad_runs_fail_with_one_line(tiny_flux, data, tmp_path):
    cfg = recipe(
        RECIPE_2K,
        tiny_flux,
        data,
        tmp_path,
        **{"data.resolution": 128, "memory.quant": "fp8", "memory.checkpointing": "on"},
    )
    with pytest.raises(UraeError, match="no cache at .*urae-lite cache .* --resolution 128"):
        train(cfg, progress=False)
    from urae_lite.cli import main

    overrides = recipe_overrides(tiny_flux, data, tmp_path, **{"data.resolution": 128})
    assert main(["train", str(RECIPE_2K), *overrides]) == 2
    with pytest.raises(
        UraeError,
        match="CUDA out of memory during training step 3.*checkpointing=on.*"
        "most effective first: memory.checkpointing=cpu memory.token_chunks=4 "
        "memory.blocks_to_swap=57 .*quant=nf4 "
        "optimizer._component_=bitsandbytes.optim.AdamW8bit",
    ):
        with oom_guard(cfg, CPU, "training step 3"):
            raise torch.cuda.OutOfMemoryError("out of memory")
    cfg.memory = cfg.memory.replace(quant="nf4", checkpointing="cpu", token_chunks=4, blocks_to_swap=57)
    cfg.optimizer = {"_component_": "bitsandbytes.optim.AdamW8bit"}
    text = oom_advice(cfg, "training step 1", 23.5, 24.0)
    assert "peak 23.5 of 24.0 GiB" in text and "Every memory saving is already on" in text
