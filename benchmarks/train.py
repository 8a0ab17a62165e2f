"""Peak VRAM and seconds per step of URAE adapter training on full-size FLUX.1-dev (random weights, one GPU).

    python benchmarks/train.py [--configs 2k-nf4,2k-fp8,4k-nf4,4k-fp8] [--modes on,cpu] [--steps 3] [--warmup 1]
                               [--set memory.blocks_to_swap=56 --set memory.quant=fp8 ...]

Weights are streamed from `urae_lite.tiny.iter_random_transformer_tensors(flux_dev_config(), device="cuda")`
into the loader's own skeleton (`empty_transformer` + `fill_transformer`): same shapes, quantization, adapters and
memory as a real FLUX.1-dev download (weight values change neither memory nor speed). Each config is a
recipe (recipes/train_2k_lora.yaml or train_4k_minor.yaml) with its quant and checkpointing mode overridden:

* 2k-*: 2048² (16384 image + 512 text tokens), a fresh rank-16 LoRA on the 190 authors' targets, Prodigy.
* 4k-*: 4096² (65536 + 512 tokens), minor-component rank 16 initialised by SVD (on the GPU, while streaming) of
  base + a random rank-16 2K LoRA that stays frozen in the same branch; NTK 10, proportional attention, Prodigy.
* modes: `on` = block checkpointing, `cpu` = checkpointing with block inputs in pinned host memory, `off` = none.
* `--set KEY=VALUE` (repeatable): recipe overrides after the config's, e.g. the memory options `urae-lite plan
  --vram N` prints (`memory.quant=`, `memory.blocks_to_swap=`, `memory.token_chunks=`, `memory.checkpoint_every=`);
  token chunks, checkpoint segments and block swap are set up as train/model.py sets them up.

Batches are synthetic (VAE posterior mean/std, T5 512x4096, pooled CLIP 768) with the real shapes, built by the
training code's own `build_sample`; steps run through the training `Trainer` (bf16 autocast, fp32 loss, clipping,
Prodigy update). Each (resolution, quant) runs in a fresh process, so peaks never mix; its modes share the loaded
model and reset the peak counters between them. Results merge into benchmarks/results/train_<device>.json (keyed
by config and mode), so configs can be measured in separate invocations. Goals (README): 2K ≤ 16 GiB, 4K ≤ 24 GiB.
`--tiny` runs the same code on the tiny test transformer on the CPU: a smoke test of this script, not a measurement.

Time: loading streams 12 B random parameters (a 4K config also runs 190 SVDs of 3072² on the GPU); a 4K step is
tens of seconds. Where one call is limited (e.g. 10 minutes), measure `--configs 2k-nf4,2k-fp8` in one call and
each 4K config in its own, e.g. `--configs 4k-nf4 --steps 2`: the results file accumulates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from provenance import provenance, result_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> (recipe, resolution, quant)
    "2k-nf4": ("train_2k_lora.yaml", 2048, "nf4"),
    "2k-fp8": ("train_2k_lora.yaml", 2048, "fp8"),
    "4k-nf4": ("train_4k_minor.yaml", 4096, "nf4"),
    "4k-fp8": ("train_4k_minor.yaml", 4096, "fp8"),
}
GOAL_GIB = {2048: 16.0, 4096: 24.0}
TINY_RESOLUTION = {2048: 64, 4096: 128}
GiB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--modes", default="on,cpu", help="checkpointing modes to measure: on, cpu, off")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per mode (mean reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first also autotunes kernels)")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/train_<device>.json)")
    p.add_argument("--tiny", action="store_true", help="smoke-test this script on the tiny model on the CPU")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override after the config's (repeatable), e.g. memory.blocks_to_swap=56",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config in this process, print its rows
    return p.parse_args(argv)


def _random_2k_adapter(config: dict, folder: Path, rank: int = 16) -> Path:
    """A rank-16 LoRA on the authors' targets with non-zero B, standing in for a trained 2K adapter."""
    import torch

    from urae_lite import save_adapter
    from urae_lite.adapter_io import LoraFactors  # save_adapter's input as factors: no public name
    from urae_lite.loader import empty_transformer
    from urae_lite.targets import adapter_target_names

    model = empty_transformer(config)
    factors = {}
    gen = torch.Generator().manual_seed(0)
    for name in adapter_target_names(model):
        layer = model.get_submodule(name)
        factors[name] = LoraFactors(
            torch.randn(rank, layer.in_features, generator=gen) * layer.in_features**-0.5,
            torch.randn(layer.out_features, rank, generator=gen) * 0.01,
        )
    return save_adapter(factors, folder / "random_2k.safetensors")


def _synthetic_sample(config: dict, resolution: int, text_tokens: int, seed: int):
    """A training sample with the real shapes, made by the training code from random cache-like tensors."""
    import torch

    from urae_lite.train.cache import CachedItem
    from urae_lite.train.data import Bucket
    from urae_lite.train.flow import sample_generator
    from urae_lite.train.samples import build_sample

    gen = sample_generator(seed, 0)
    h = w = resolution // 8
    mean, std = torch.randn(16, h, w, generator=gen), torch.rand(16, h, w, generator=gen) * 0.1
    t5 = torch.randn(text_tokens, config["joint_attention_dim"], generator=gen).to(torch.bfloat16)
    pooled = torch.randn(config["pooled_projection_dim"], generator=gen).to(torch.bfloat16)
    item = CachedItem("synthetic", Bucket(resolution, resolution), ("generated_prompt",))
    return build_sample(seed, item, mean, std, "generated_prompt", t5, pooled, 0.5, gen, 0.1159, 0.3611)


def run_one(name: str, modes: list[str], steps: int, warmup: int, tiny: bool, extra: Sequence[str] = ()) -> list[dict]:
    """Load one (resolution, quant) model, then time `steps` optimizer steps per checkpointing mode. `extra`:
    recipe overrides after the config's (a `quant=` there replaces the config's quant)."""
    import torch
    from generate import outside_allocator_gib

    from urae_lite import LoadSpec, MinorSpec
    from urae_lite.flux_configs import flux_dev_config
    from urae_lite.loader import empty_transformer, fill_transformer  # streaming from an iterator: no public entry
    from urae_lite.tiny import iter_random_transformer_tensors, tiny_transformer_config
    from urae_lite.train.checkpoint_segments import enable_checkpoint_segments
    from urae_lite.train.config import load_recipe
    from urae_lite.train.loop import Trainer
    from urae_lite.train.model import prepare_for_training, trainable_parameters
    from urae_lite.train.optim import build_optimizer

    recipe, resolution, quant = CONFIGS[name]
    device = torch.device("cpu" if tiny else "cuda")
    config = tiny_transformer_config() if tiny else flux_dev_config()
    size = TINY_RESOLUTION[resolution] if tiny else resolution
    text_tokens = 32 if tiny else 512
    tmp = Path(tempfile.mkdtemp(prefix="urae_bench_"))
    overrides = [f"data.dir={tmp}", f"output_dir={tmp}", f"memory.quant={quant}", f"data.resolution={size}"]
    minor = None
    if "minor" in recipe:
        overrides.append(f"adapter.base_adapters=[{_random_2k_adapter(config, tmp)}]")
        minor = MinorSpec(16, svd_device=str(device) if device.type == "cuda" else None)
    cfg = load_recipe(ROOT / "recipes" / recipe, overrides + list(extra))
    m = cfg.memory

    start = time.perf_counter()
    # as build_model loads: the swapped blocks are parked in host memory as they arrive
    spec = LoadSpec(
        m.format, device, adapters=cfg.adapter.base_adapters, minor=minor, progress=False, park_blocks=m.blocks_to_swap
    )
    model = fill_transformer(empty_transformer(config), iter_random_transformer_tensors(config, device=device), spec)
    model = prepare_for_training(model, cfg, device)  # token chunks, checkpoint segments, block swap (urae_lite.memory)
    if device.type == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    sample = _synthetic_sample(config, size, text_tokens, seed=1)
    rows = []
    for mode in modes:
        cfg.memory = cfg.memory.replace(checkpointing=mode)
        if mode == "off":
            model.disable_gradient_checkpointing()
        else:
            enable_checkpoint_segments(model, m.checkpoint_every)
        optimizer, scheduler = build_optimizer(cfg, (p for _, p in trainable_parameters(model)))
        trainer = Trainer(model, optimizer, scheduler, cfg, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        row = {
            "config": name,
            "mode": mode,
            "resolution": size,
            "quant": m.quant,
            "kind": cfg.adapter.kind,
            "blocks_to_swap": m.blocks_to_swap,
            "token_chunks": m.token_chunks,
            "checkpoint_every": m.checkpoint_every,
            "overrides": list(extra),
            "tokens": (size // 16) ** 2 + text_tokens,
            "load_s": round(load_s, 1),
            "steps": steps,
            "warmup": warmup,
        }
        try:
            times = []
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                trainer.micro_step(sample)
                trainer.optimizer_step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            row["s_per_step"] = round(sum(times) / len(times), 3)
            row["s_per_step_min"] = round(min(times), 3)
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"CUDA out of memory: {str(e).splitlines()[0]}"
        if device.type == "cuda":
            row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 2)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GiB, 2)
            row["outside_allocator_gib"] = round(outside_allocator_gib(device), 2)
            row["goal_gib"] = GOAL_GIB[resolution]
            row["meets_goal"] = "error" not in row and row["peak_reserved_gib"] <= GOAL_GIB[resolution]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del optimizer, scheduler, trainer
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [n for n in names if n not in CONFIGS] + [m for m in modes if m not in ("on", "cpu", "off")]
    if unknown:
        sys.exit(f"unknown config or mode {unknown[0]!r}: configs {', '.join(CONFIGS)}; modes on, cpu, off")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("benchmarks/train.py needs a CUDA GPU (or --tiny for a CPU smoke test)")
    if not args.tiny:
        import urae_lite.kernels  # noqa: F401 -- the kernels fail to load here, not in the first step
    if args.one:
        print("ROWS " + json.dumps(run_one(args.one, modes, args.steps, args.warmup, args.tiny, args.overrides)))
        return

    device = "cpu-tiny" if args.tiny else torch.cuda.get_device_name()
    out = args.out or result_path("train", device)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    rows = {(r["config"], r["mode"]): r for r in previous.get("rows", [])}
    for name in names:  # one fresh process per model: its peak counters and allocator start empty
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--one",
            name,
            "--modes",
            ",".join(modes),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            *(x for o in args.overrides for x in ("--set", o)),
        ] + (["--tiny"] if args.tiny else [])
        result = subprocess.run(command, capture_output=True, text=True)
        found = [line for line in result.stdout.splitlines() if line.startswith("ROWS ")]
        if result.returncode or not found:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            for mode in modes:
                rows[(name, mode)] = {"config": name, "mode": mode, "error": f"exit {result.returncode}: {tail[0]}"}
        else:
            for row in json.loads(found[-1][5:]):
                rows[(row["config"], row["mode"])] = row
        for mode in modes:
            row = rows[(name, mode)]
            print(
                f"{name:7} {mode:4} "
                + (
                    row.get("error")
                    or f"{row.get('s_per_step', '?')} s/step, peak "
                    f"{row.get('peak_allocated_gib', '?')} GiB allocated / {row.get('peak_reserved_gib', '?')} reserved"
                )
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": device,
                **provenance(),
                "goal_gib": {"2048": GOAL_GIB[2048], "4096": GOAL_GIB[4096]},
                "rows": sorted(rows.values(), key=lambda r: (r["config"], r["mode"])),
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
