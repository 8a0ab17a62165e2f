"""`python benchmarks/memory.py --fake`: the planner against the real code's live tensor bytes on fake tensors.

No GPU: full-size FLUX.1-dev, T5-XXL, CLIP-L and the VAE run on the CPU under FakeTensorMode
(urae_lite/measure/fake.py), the adapted linears through the kernels' `torch.ops.urae_lite` custom ops
(URAE_LITE_KERNELS=on, their fake implementations), with what CUDA would allocate where the CPU path differs
(autocast's fp32 norms, the fused RMSNorm, the kernels' held buffer: urae_lite/measure/fake_cuda.py), and every
phase's peak of live device storage bytes is put beside the planner's allocated-bytes estimate for the same
configuration. Rows: generate 1024², 2048², 4096² (presets 2k / 4k, `model` offload, one denoising step) and
train 2048² (2K LoRA recipe) and 4096² (4K minor recipe), NF4 and FP8; then the memory options' rows (memory_rows:
block swap, token chunking, NF4 T5, checkpoint segments, as `urae-lite plan --vram` picks them). --only, --quants and
--sizes pick a slice.
Writes JSON (rows + provenance) and a chart of measured vs planned per row; then run
`python -m urae_lite.plan.profiles` to refresh docs/memory-status.md and the README's summary, which read the JSON
against the current planner (tests/test_plan_profiles.py fails until they match).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
SIZES = (1024, 2048, 4096)
TRAIN_SIZES = (2048, 4096)
QUANTS = ("nf4", "fp8")
OUT = ROOT / "benchmarks" / "results" / "memory_fake.json"


# Rows beyond the base matrix, (task, size, quant, memory options): first the plans `urae-lite plan --task T
# --resolution R --vram V --ram 24` picks when the benchmark runs (memory_rows: the three goal jobs, generate 4096² and
# train 2048² at 8 GiB, train 4096² at 12 GiB, and train 4096² at 8 GiB), then FIXED_ROWS: the smallest-peak 4096²
# training plan, generation at 4096² with 4 token chunks and the 4K recipe without them (it ships with 4). Options
# not named are the base rows' (recipe / preset defaults).
FIXED_ROWS = (
    ("train", 4096, "nf4", {"checkpointing": "cpu", "blocks_to_swap": 57, "token_chunks": 16, "checkpoint_every": 2}),
    ("generate", 4096, "nf4", {"token_chunks": 4}),
    ("generate", 4096, "fp8", {"token_chunks": 4}),
    ("train", 4096, "nf4", {"token_chunks": 1}),
    ("train", 4096, "fp8", {"token_chunks": 1}),
)
GENERATE_DEFAULTS = {"offload": "model"}  # the base rows' generation memory: the CUDA default, staged


def memory_rows() -> list[tuple]:
    """The `--vram` picks of docs/memory-status.md's table (urae_lite.plan.status.STATUS_JOBS), as the planner
    makes them now, then FIXED_ROWS."""
    from urae_lite.memory import searched
    from urae_lite.plan.status import STATUS_JOBS, plan_command

    picked = []
    for _, arguments in STATUS_JOBS:
        if "--vram" in arguments:
            cfg, _ = plan_command(arguments)
            memory = {k: getattr(cfg.memory, k) for k in searched(cfg.task) if k != "quant"}
            picked.append((cfg.task, cfg.width, cfg.memory.quant, memory))
    return [*picked, *FIXED_ROWS]


def generate_rows(quant: str, sizes: tuple[int, ...], memory: dict | None = None) -> list[dict]:
    """Measured and planned bytes per phase of generation at each size (one fake pipeline per adapter rank);
    `memory`: MemorySettings over the preset's (default: `model` offload, bf16 T5, no swap, no chunks)."""
    from urae_lite.measure.fake import fake_mode, fake_pipeline, forget_fake_workspaces, generate_rank, measure_generate
    from urae_lite.plan import PlanConfig, estimate
    from urae_lite.presets import preset_memory

    rows = []
    for rank in sorted({generate_rank(s) for s in sizes}):
        for size in [s for s in sizes if generate_rank(s) == rank]:
            preset = preset_memory("4k" if size >= 4096 else "2k", "dev").replace(
                **{**GENERATE_DEFAULTS, **(memory or {})}
            )
            cfg = PlanConfig(task="generate", width=size, height=size, rank=rank, memory=preset.replace(quant=quant))
            tiling = resolved_tiling(cfg)
            cfg = cfg.with_memory(vae_tiling=tiling)
            with fake_mode():
                pipe = fake_pipeline(cfg.memory, rank)
                phases = measure_generate(pipe, size)
            forget_fake_workspaces()
            m = cfg.memory
            options = {
                **m.for_task("generate"),
                "adapter_rank": rank,
                "vae_tiling": f"{preset.vae_tiling} -> {tiling}",
                "denoising_steps": 1,
                "kernels": os.environ.get("URAE_LITE_KERNELS"),
                "rms_norm": "CUDA's fused kernel (urae_lite/measure/fake_cuda.py)",
            }
            if tiling == "on":
                options["vae_home"] = "host (the tiled decode's full-size maps)"
            if m.blocks_to_swap:
                options["swapped_blocks"] = "host copies not counted (block_swap.py's window on the device)"
            rows += pair("generate", size, quant, options, phases, estimate(cfg))
    return rows


def resolved_tiling(cfg) -> str:
    """`auto` as the planner resolves it (card unknown): the decode estimate equals the tiled or the plain one."""
    from urae_lite.plan import estimate

    if cfg.memory.vae_tiling != "auto":
        return cfg.memory.vae_tiling
    decode = estimate(cfg).allocated()[-1]
    return "on" if decode == estimate(cfg.with_memory(vae_tiling="on")).allocated()[-1] else "off"


def train_rows(quant: str, size: int, memory: dict | None = None) -> list[dict]:
    """One training step's phases with the size's recipe; `memory`: `memory.` recipe settings (checkpointing,
    blocks_to_swap, token_chunks, checkpoint_every) over the recipe's own."""
    from urae_lite.measure.fake import fake_mode, forget_fake_workspaces, measure_train, train_recipe
    from urae_lite.memory import recipe_overrides
    from urae_lite.plan import estimate
    from urae_lite.plan.recipe import recipe_job

    with fake_mode():
        cfg = train_recipe(size, quant, tuple(recipe_overrides(memory or {})))
        phases, options = measure_train(cfg, size)
    forget_fake_workspaces()
    m = cfg.memory
    options = {
        "recipe": cfg.adapter.kind,
        **m.for_task("train"),
        "saved_tensors": "host (save_on_cpu copies on the uncounted meta device)"
        if m.checkpointing == "cpu"
        else "device",
        "autocast": "cpu bf16 with CUDA autocast's dtype policy (urae_lite/measure/fake_cuda.py)",
        **options,
    }
    if m.blocks_to_swap:
        options["swapped_blocks"] = "host copies not counted (block_swap.py's window on the device)"
    return pair("train", size, quant, options, phases, estimate(recipe_job(cfg)))


def pair(task: str, size: int, quant: str, options: dict, phases, est) -> list[dict]:
    """One row per measured phase, beside the planner's allocated bytes for that phase and its card total, with the
    planner's configuration (`plan_config`: what urae_lite.plan.status.fake_row_config reads back)."""
    planned = dict(zip(est.phases, est.allocated()))
    plan_config = est.config.as_dict()
    rows = []
    for ph in phases:
        rows.append(
            {
                "task": task,
                "width": size,
                "height": size,
                "quant": quant,
                "plan_config": plan_config,
                "options": options,
                "phase": ph.name,
                "measured_bytes": ph.peak,
                "planner_bytes": planned[ph.name],
                "planner_total_bytes": est.peak,
                "ratio": round(ph.peak / planned[ph.name], 4),
            }
        )
        print(
            f"{task:8} {size:5}² {quant:4}{memory_tag(options):22} {ph.name:15} measured {ph.peak / GiB:6.2f} "
            f"GiB  planner {planned[ph.name] / GiB:6.2f} GiB  ratio {ph.peak / planned[ph.name]:.3f}",
            flush=True,
        )
    return rows


def memory_tag(options: dict) -> str:
    """The row's memory settings that differ from their defaults (the quant and the VAE tiling are shown apart), as
    ' blocks_to_swap=56 token_chunks=4'."""
    from urae_lite.memory import MemorySettings

    defaults = {**MemorySettings().as_dict(), **GENERATE_DEFAULTS}
    shown = [k for k in defaults if k not in ("quant", "vae_tiling") and k in options and options[k] != defaults[k]]
    return "".join(f" {k}={options[k]}" for k in shown)


def chart(rows: list[dict], path: Path) -> None:
    """Measured (bars) vs planned allocated (markers) GiB for every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['task'][:3]} {r['width']} {r['quant']}{memory_tag(r['options'])} {r['phase']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(10, len(rows) * 0.32), 6))
    ax.bar(x, [r["measured_bytes"] / GiB for r in rows], color="C0", label="measured (fake tensors, live bytes)")
    ax.plot(
        x, [r["planner_bytes"] / GiB for r in rows], "_", color="C3", markersize=14, mew=2, label="planner (allocated)"
    )
    ax.set_xticks(list(x), labels, rotation=90, fontsize=7)
    ax.set_ylabel("peak GiB")
    ax.set_title("urae-lite on full-size FLUX.1-dev: fake-tensor measurement vs planner, per phase")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_fake(args) -> None:
    """Run the fake matrix (generate and/or train, per --only / --quants / --sizes) and write JSON + chart."""
    os.environ.setdefault("URAE_LITE_KERNELS", "on")  # the fused path a GPU runs (fake impls of the custom ops)
    start = time.perf_counter()
    quants = [q for q in (args.quants or QUANTS) if q in QUANTS]
    rows: list[dict] = []
    for quant in quants:
        if args.only != "train":
            rows += generate_rows(quant, tuple(sorted(s for s in args.sizes if s in SIZES)))
        if args.only != "generate":
            for size in TRAIN_SIZES:
                if size in args.sizes:
                    rows += train_rows(quant, size)
    for task, size, quant, memory in memory_rows():
        if args.only in (None, task) and quant in quants and size in args.sizes:
            rows += generate_rows(quant, (size,), memory) if task == "generate" else train_rows(quant, size, memory)
    out = args.out or OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": "cpu (FakeTensorMode; fake CPU tensors stand for the GPU)",
                **provenance(),
                "seconds": round(time.perf_counter() - start, 1),
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    try:
        chart(rows, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no chart")
    print(f"wrote {out} ({len(rows)} rows, {time.perf_counter() - start:.0f} s)")
