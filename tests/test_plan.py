"""Memory planner: its model of the real code checked against measurement on CPU, its table, search and CLI.

Measurement: a TorchDispatchMode adds the storage bytes of every tensor an op creates and subtracts them when the
storage dies (weakref.finalize on the untyped storage; deduplicated by data pointer, so views count once),
starting from the model's parameters and buffers and the inputs. Its peak is what a device allocator would have to
hold, minus allocator rounding. The estimator is run with the CPU reference backend (dense W per call, composite
RMSNorm), which differs from CUDA only in the terms `activations.Precision` names.

Tolerance: the README's goal is ±10% on GPU at full size. On CPU the weights are computed exactly and activations
from per-tensor inventories, so totals are held to ±10% here too; on configs this small, per-block constants
(the first block saves less, text tokens are a large share) weigh more than at 2K, so we also check the trend the
estimator rests on: activation memory grows linearly with tokens, at the predicted rate.
"""

from __future__ import annotations

import json

import pytest
import torch
from plan_utils import best, plan_config, recipe_plan_config

from urae_lite.cli import main
from urae_lite.errors import UraeError
from urae_lite.flux_configs import flux_dev_config
from urae_lite.loader import LoadSpec, add_lora, empty_transformer, fill_transformer
from urae_lite.measure.fake import LiveBytes, module_tensors
from urae_lite.plan import PlanConfig, estimate, expected_seconds
from urae_lite.plan.activations import CPU, Tokens, inference_bytes, training_bytes
from urae_lite.plan.arch import flux_arch
from urae_lite.quant import QUANT_FORMATS
from urae_lite.tiny import iter_random_transformer_tensors, tiny_transformer_config
from urae_lite.token_chunking import enable_token_chunking

GiB = 2**30
TEXT = 32  # text tokens in the measured forwards
TOLERANCE = 0.10


def flux_shaped(double: int = 1, single: int = 1) -> dict:
    """Bigger than the tiny model and FLUX-shaped where activations care: head_dim 128, RoPE axes (16, 56, 56)."""
    return {
        **flux_dev_config(),
        "num_layers": double,
        "num_single_layers": single,
        "num_attention_heads": 2,
        "joint_attention_dim": 256,
        "pooled_projection_dim": 64,
    }


CONFIGS = {"tiny": tiny_transformer_config(), "flux-shaped": flux_shaped()}


def build(config: dict, quant: str) -> torch.nn.Module:
    return fill_transformer(
        empty_transformer(config), iter_random_transformer_tensors(config), LoadSpec(quant, progress=False)
    )


def inputs(config: dict, side: int, seed: int = 0) -> dict:
    """Transformer inputs for a side x side token grid and TEXT text tokens (bf16, as the pipeline passes them)."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return dict(
        hidden_states=torch.randn(1, side * side, config["in_channels"], generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, TEXT, config["joint_attention_dim"], generator=g).bfloat16(),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).bfloat16(),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(TEXT, 3),
        guidance=torch.tensor([3.5]),
    )


def measure(step, model: torch.nn.Module, held: list[torch.Tensor]) -> int:
    """Peak of `step()` counting the model's tensors but not the caller's inputs (`held`), which the estimator
    accounts for outside the transformer; they are registered so that ops returning them are not counted."""
    tracker = LiveBytes()
    tracker.hold(module_tensors(model) + held)
    with tracker:
        step()
    return tracker.peak - sum(t.untyped_storage().nbytes() for t in held)


def measure_forward(model: torch.nn.Module, config: dict, side: int) -> int:
    x = inputs(config, side)
    with torch.no_grad():
        return measure(lambda: model(**x, return_dict=False), model, list(x.values()))


def trainable(model: torch.nn.Module) -> torch.nn.Module:
    """As urae_lite/train/model.py prepares it: rank-16 LoRA on the authors' targets, fp32 masters."""
    add_lora(model, "lora", 16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float().normal_(0, 0.01)  # B != 0: every branch gets gradients, as mid-training
    return model.train()


def measure_step(model: torch.nn.Module, config: dict, side: int) -> int:
    """Peak of forward + backward under bf16 autocast with the fp32 MSE loss (urae_lite/train/loop.py)."""
    x = inputs(config, side)
    # inputs that need grad make the first block save what every later block saves (the steady state the
    # estimator models; on FLUX.1 the first of 57 blocks saving less is a 1% effect)
    x["hidden_states"].requires_grad_(True)
    x["encoder_hidden_states"].requires_grad_(True)
    target = torch.randn(x["hidden_states"].shape)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = model(**x, return_dict=False)[0]
        torch.mean((prediction.float() - target) ** 2).backward()

    peak = measure(step, model, [*x.values(), target])
    model.zero_grad(set_to_none=True)
    return peak


def estimated_forward(config: dict, quant: str, side: int, chunks: int = 1) -> int:
    arch = flux_arch(config)
    return arch.weight_bytes(quant) + inference_bytes(arch, Tokens(side * side, TEXT), quant, CPU, chunks)


def estimated_step(config: dict, quant: str, side: int, checkpointing: str, chunks: int = 1) -> int:
    arch = flux_arch(config)
    acts = training_bytes(arch, Tokens(side * side, TEXT), quant, CPU, checkpointing, 16, chunks)
    lora = arch.adapter_params(16) * 4  # fp32 masters, and as much again in gradients
    return arch.weight_bytes(quant) + 2 * lora + max(acts.forward_peak, acts.backward_peak)


def close(estimate_: float, measured: float, tolerance: float = TOLERANCE) -> bool:
    return abs(estimate_ / measured - 1) <= tolerance


# ---- against measurement --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANT_FORMATS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_weight_bytes_equal_the_loaded_model(name, quant):
    config = CONFIGS[name]
    model = build(config, quant)
    loaded = sum(t.untyped_storage().nbytes() for t in module_tensors(model))
    assert flux_arch(config).weight_bytes(quant) == loaded


@pytest.mark.parametrize("quant", ["nf4", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_peak_matches_measurement_at_two_resolutions(name, quant):
    config = CONFIGS[name]
    model = build(config, quant).eval()
    sides = (16, 32)
    measured = [measure_forward(model, config, s) for s in sides]
    predicted = [estimated_forward(config, quant, s) for s in sides]
    for m, e, s in zip(measured, predicted, sides):
        assert close(e, m), f"{name} {quant} {s}²: estimate {e} vs measured {m}"
    # activations grow linearly with tokens at the predicted rate (no N x N attention matrix)
    assert close(predicted[1] - predicted[0], measured[1] - measured[0]), (predicted, measured)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_step_peak_matches_measurement(name):
    """LoRA forward + backward without and with gradient checkpointing, at two resolutions."""
    config = CONFIGS[name]
    model = trainable(build(config, "nf4"))
    sides = (12, 24)
    measured, predicted = {}, {}
    for checkpointing in ("off", "on"):
        if checkpointing == "on":
            model.enable_gradient_checkpointing()
        measured[checkpointing] = [measure_step(model, config, s) for s in sides]
        predicted[checkpointing] = [estimated_step(config, "nf4", s, checkpointing) for s in sides]
        for m, e, s in zip(measured[checkpointing], predicted[checkpointing], sides):
            assert close(e, m), f"{name} checkpointing {checkpointing} {s}²: estimate {e} vs measured {m}"
        m, e = measured[checkpointing], predicted[checkpointing]
        assert close(e[1] - e[0], m[1] - m[0]), (checkpointing, e, m)
    saved = [measured["off"][i] - measured["on"][i] for i in range(2)]
    assert saved[1] > saved[0] > 0
    assert close(predicted["off"][1] - predicted["on"][1], saved[1], 0.15), (predicted, measured)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_token_chunks_forward_matches_measurement(name):
    """Token chunks (urae_lite/token_chunking.py) without grad: the peak, and what chunking saves, as predicted
    (plan/chunked.py)."""
    config = CONFIGS[name]
    model = build(config, "nf4").eval()
    sides, measured = (16, 32), {}
    for chunks in (1, 4):
        enable_token_chunking(model, chunks)
        measured[chunks] = [measure_forward(model, config, s) for s in sides]
    predicted = {c: [estimated_forward(config, "nf4", s, c) for s in sides] for c in (1, 4)}
    for m, e, s in zip(measured[4], predicted[4], sides):
        assert close(e, m), f"{name} 4 chunks {s}²: estimate {e} vs measured {m}"
    saved = measured[1][1] - measured[4][1]
    assert saved > 0 and close(predicted[1][1] - predicted[4][1], saved), (predicted, measured)


def test_token_chunks_training_step_matches_measurement():
    """A checkpointed LoRA step with token chunks: each pass keeps only its inputs and recomputes one chunk at a time
    in backward, writing its input gradients into full-size buffers (plan/chunked.py)."""
    config = CONFIGS["flux-shaped"]
    model = trainable(build(config, "nf4"))
    model.enable_gradient_checkpointing()
    sides, measured = (12, 24), {}
    for chunks in (1, 4):
        enable_token_chunking(model, chunks)
        measured[chunks] = [measure_step(model, config, s) for s in sides]
    predicted = {c: [estimated_step(config, "nf4", s, "on", c) for s in sides] for c in (1, 4)}
    for m, e, s in zip(measured[4], predicted[4], sides):
        assert close(e, m), f"4 chunks {s}²: estimate {e} vs measured {m}"
    saved = measured[1][1] - measured[4][1]
    assert saved > 0 and close(predicted[1][1] - predicted[4][1], saved, 0.15), (predicted, measured)


# ---- the full-size model and the table --------------------------------------------------------------------------
def test_full_size_flux_from_its_config():
    arch = flux_arch(flux_dev_config())
    assert len(arch.linears) == 494 and arch.n_blocks == 57
    assert arch.params == pytest.approx(11.90e9, rel=1e-3)
    assert arch.weight_bytes("bf16") / GiB == pytest.approx(22.2, abs=0.05)
    assert arch.weight_bytes("fp8") / GiB == pytest.approx(11.1, abs=0.1)
    assert 5.6 < arch.weight_bytes("nf4") / GiB < 5.9
    assert arch.adapter_params(16) == 190 * 16 * (3072 + 3072)  # the authors' 2K adapter (docs/adapter-formats.md)
    hidden = Tokens(16384, 512).total * 3072 * 2  # one hidden state at 2K ≈ 99 MiB
    assert hidden / 2**20 == pytest.approx(99, abs=0.5)


def test_table_names_the_phase_that_sets_the_peak():
    two_k = estimate(plan_config(task="generate", width=2048, height=2048))  # model offload: T5-XXL bf16 first
    assert two_k.peak_phase == "text encoding"
    four_k = estimate(plan_config(task="generate", width=4096, height=4096))
    assert four_k.peak_phase == "denoising"
    table = four_k.table()
    for needle in (
        "text encoding",
        "denoising",
        "VAE decode",
        "transformer weights (nf4)",
        "activations",
        "CUDA context",
        "allocator reserve",
        "peak",
        "in denoising",
    ):
        assert needle in table
    assert four_k.peak == max(four_k.totals())
    train = estimate(plan_config(task="train", width=2048, height=2048, validation=False))
    assert train.phases == ("forward", "backward", "optimizer step") and train.peak_phase == "backward"
    assert "optimizer states (prodigy)" in train.table() and "gradients (fp32)" in train.table()


def test_offload_and_checkpointing_lower_the_peak():
    peaks = [
        estimate(plan_config(task="generate", width=4096, height=4096, quant="bf16", offload=m)).peak
        for m in ("none", "model", "group", "sequential")
    ]
    assert peaks == sorted(peaks, reverse=True)
    train = [
        estimate(plan_config(task="train", width=2048, height=2048, checkpointing=c, validation=False)).peak
        for c in ("off", "on", "cpu")
    ]
    assert train == sorted(train, reverse=True)


def test_speed_model_orders_each_option():
    def seconds(**kw) -> float:
        return expected_seconds(plan_config(**kw))

    offloads = [seconds(width=1024, height=1024, offload=m) for m in ("none", "model", "group", "sequential")]
    assert offloads == sorted(offloads)
    quants = [seconds(quant=q) for q in ("bf16", "fp8", "nf4")]
    assert quants == sorted(quants)
    ckpt = [seconds(task="train", checkpointing=c) for c in ("off", "on", "cpu")]
    assert ckpt == sorted(ckpt)


# ---- --vram --------------------------------------------------------------------------------------------------------
def test_vram_picks_bf16_when_it_fits_and_nf4_when_not():
    picks = {
        vram: best("generate", 1024, 1024, vram, offload="none", blocks_to_swap=0)  # all resident
        for vram in (48, 24, 16)
    }
    assert {vram: r.best.config.memory.quant for vram, r in picks.items()} == {48: "bf16", 24: "fp8", 16: "nf4"}
    assert all(c.peak <= vram * GiB for vram, r in picks.items() for c in r.fitting)
    assert not any(c.config.memory.quant == "bf16" for c in picks[24].fitting)
    small_host = best("generate", 4096, 4096, 24, ram_gib=8)  # the fastest plan parks more than 8 GiB
    roomy_host = best("generate", 4096, 4096, 24)
    assert small_host.best and all(c.estimate.host <= 8 * GiB for c in small_host.fitting)
    assert roomy_host.best.estimate.host > 8 * GiB and small_host.best.seconds >= roomy_host.best.seconds
    train = best("train", 2048, 2048, 16, checkpointing="cpu", validation=False, blocks_to_swap=0)
    assert train.best.config.memory.quant == "nf4"
    assert best("train", 2048, 2048, 48, checkpointing="cpu", validation=False).best.config.memory.quant == "bf16"


def test_impossible_request_says_what_it_would_need():
    result = best("generate", 4096, 4096, 3)
    assert result.best is None and result.largest_fitting_size is not None
    message = result.impossible()
    assert message.startswith("nothing fits in 3 GiB for generate at 4096x4096: the smallest peak is")
    assert f"{result.smallest.peak / GiB:.1f} GiB" in message and "fits up to" in message
    w, h = result.largest_fitting_size
    assert estimate(result.smallest.config.replace(width=w, height=h), 3).peak <= 3 * GiB


def test_unknown_plan_option_is_rejected_with_the_valid_ones():
    with pytest.raises(UraeError, match="unknown plan option.*offlaod.*use .*offload"):
        best("generate", 2048, 2048, 24, offlaod="group")
    with pytest.raises(UraeError, match="unknown offload 'disk': use one of none, model, group, sequential"):
        estimate(plan_config(offload="disk"))


# ---- command line ---------------------------------------------------------------------------------------------------
def test_cli_table_and_vram(capsys):
    assert main(["plan", "--task", "generate", "--resolution", "4096"]) == 0
    assert "peak" in capsys.readouterr().out
    assert main(["plan", "--task", "train", "--resolution", "2048", "--vram", "24"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fits in 24 GiB") and "run: urae-lite train RECIPE memory.quant=" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--resolution", "4096", "--vram", "3"], "nothing fits in 3 GiB"),
        (["--resolution", "1000"], "width 1000 is not a positive multiple of 16"),
        (["--vram", "0"], "--vram must be a positive number"),
    ],
)
def test_cli_impossible_and_bad_values_exit_2(capsys, args, needle):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("urae-lite: error:") and needle in err


def test_cli_unknown_choice_lists_the_valid_values(capsys):
    assert main(["plan", "--task", "train", "--checkpointing", "sometimes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown checkpointing 'sometimes': use one of on, off, cpu" in err


def test_memory_benchmark_dry_run_without_a_gpu(capsys, monkeypatch):
    """benchmarks/memory.py: --help and --dry-run (the planner's estimates for its matrix) work on the CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as when run as a script: its folder is on sys.path
    spec = importlib.util.spec_from_file_location("urae_bench_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0 and "--dry-run" in capsys.readouterr().out
    bench.main(["--dry-run", "--offload", "model", "--quants", "nf4", "--configs", "4k-nf4", "--modes", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[:4] for l in lines[1:]] == [["generate", "nf4", "model", f"{s}²"] for s in (1024, 2048, 4096)] + [
        ["train", "4k-nf4", "checkpointing", "cpu"]
    ]
    assert all(l.rstrip().endswith("GiB") for l in lines[1:])


# ---- plans of the recipes users run ---------------------------------------------------------------------------------
def _recipe_config(path, overrides=()) -> PlanConfig:
    """The PlanConfig a recipe describes, by the tests' own reading of the loaded recipe."""
    from urae_lite.train.config import load_recipe

    cfg = load_recipe(path, ["data.dir=d", "output_dir=o", "adapter.base_adapters=[a.safetensors]", *overrides])
    return recipe_plan_config(cfg)


@pytest.mark.parametrize(
    "args,recipe,changes",
    [
        (["--resolution", "4096"], "train_4k_minor.yaml", {}),
        (["--adapter", "minor"], "train_4k_minor.yaml", {}),
        ([], "train_2k_lora.yaml", {}),
        (["--resolution", "4096", "--adapter", "lora"], "train_2k_lora.yaml", {"width": 4096, "height": 4096}),
        (["--resolution", "4096", "--checkpointing", "on"], "train_4k_minor.yaml", {"checkpointing": "on"}),
    ],
)
def test_train_plan_defaults_come_from_the_shipped_recipe(capsys, args, recipe, changes):
    """`plan --task train --resolution 4096` answers for the 4K recipe (checkpointing cpu), not the planner's own
    defaults; options given on the command line still win."""
    from urae_lite.presets import RECIPES

    assert main(["plan", "--task", "train", "--json", *args]) == 0
    got = json.loads(capsys.readouterr().out)
    want = estimate(PlanConfig.from_dict({**_recipe_config(RECIPES / recipe).as_dict(), **changes}))
    assert got == json.loads(json.dumps(want.as_dict()))


def test_train_plan_of_a_given_recipe_with_overrides(capsys, tmp_path):
    from urae_lite.presets import RECIPES

    recipe = tmp_path / "mine.yaml"
    text = (RECIPES / "train_2k_lora.yaml").read_text()
    recipe.write_text(text.replace("resolution: 2048", "resolution: 1536").replace("quant: nf4", "quant: fp8"))
    overrides = ["memory.checkpointing=off", "adapter.rank=32"]
    assert main(["plan", "--task", "train", "--recipe", str(recipe), *overrides, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = _recipe_config(recipe, overrides)
    assert (want.width, want.memory.quant, want.memory.checkpointing, want.rank) == (1536, "fp8", "off", 32)
    assert got == json.loads(json.dumps(estimate(want).as_dict()))
    # with --vram the search keeps what the overrides set and tries the rest
    assert main(["plan", "--task", "train", "--recipe", str(recipe), *overrides, "--vram", "1000", "--json"]) == 0
    fitting = json.loads(capsys.readouterr().out)["fitting"]
    assert fitting and all(c["config"]["checkpointing"] == "off" and c["config"]["rank"] == 32 for c in fitting)
    assert {c["config"]["quant"] for c in fitting} == set(QUANT_FORMATS)


def test_recipe_options_are_refused_for_generation(capsys):
    assert main(["plan", "--task", "generate", "--recipe", "x.yaml"]) == 2
    assert "add --task train" in capsys.readouterr().err
