"""`python benchmarks/memory.py --fake`: the planner against the real code's live tensor bytes on fake tensors.

No GPU: full-size FLUX.1-dev, T5-XXL, CLIP-L and the VAE run on the CPU under FakeTensorMode
(urae_lite/plan/fake.py), the adapted linears through the kernels' `torch.ops.urae_lite` custom ops
(URAE_LITE_KERNELS=on, their fake implementations), with what CUDA would allocate where the CPU path differs
(autocast's fp32 norms, the fused RMSNorm, the kernels' held buffer: urae_lite/plan/fake_cuda.py), and every
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
GENERATE_DEFAULTS = {"offload": "model", "t5_quant": "bf16", "blocks_to_swap": 0, "token_chunks": 1}
TRAIN_OPTIONS = ("checkpointing", "blocks_to_swap", "token_chunks", "checkpoint_every")  # recipe `training.` keys


def memory_rows() -> list[tuple]:
    """The `--vram` picks of docs/memory-status.md's table (urae_lite.plan.profiles.STATUS_JOBS), as the planner
    makes them now, then FIXED_ROWS."""
    from urae_lite.plan.profiles import STATUS_JOBS, plan_command

    picked = []
    for _, arguments in STATUS_JOBS:
        if "--vram" in arguments:
            cfg, _ = plan_command(arguments)
            keys = tuple(GENERATE_DEFAULTS) if cfg.task == "generate" else TRAIN_OPTIONS
            picked.append((cfg.task, cfg.width, cfg.quant, {k: getattr(cfg, k) for k in keys}))
    return [*picked, *FIXED_ROWS]


def generate_rows(quant: str, sizes: tuple[int, ...], memory: dict | None = None) -> list[dict]:
    """Measured and planned bytes per phase of generation at each size (one fake pipeline per adapter rank);
    `memory`: offload, t5_quant, blocks_to_swap, token_chunks (default: `model` offload, bf16 T5, neither)."""
    from urae_lite.plan import PlanConfig, estimate
    from urae_lite.plan.fake import fake_mode, fake_pipeline, forget_fake_workspaces, generate_rank, measure_generate
    from urae_lite.presets import load_preset

    m = {**GENERATE_DEFAULTS, **(memory or {})}
    rows = []
    for rank in sorted({generate_rank(s) for s in sizes}):
        with fake_mode():
            pipe = fake_pipeline(
                quant, rank, token_chunks=m["token_chunks"], blocks_to_swap=m["blocks_to_swap"], t5_quant=m["t5_quant"]
            )
            for size in [s for s in sizes if generate_rank(s) == rank]:
                preset = load_preset("4k" if size >= 4096 else "2k", "dev").vae_tiling
                cfg = PlanConfig(
                    task="generate", width=size, height=size, quant=quant, rank=rank, vae_tiling=preset, **m
                )
                tiling = resolved_tiling(cfg)
                est = estimate(cfg.replace(vae_tiling=tiling))
                options = {
                    **m,
                    "adapter_rank": rank,
                    "vae_tiling": f"{preset} -> {tiling}",
                    "denoising_steps": 1,
                    "kernels": os.environ.get("URAE_LITE_KERNELS"),
                    "rms_norm": "CUDA's fused kernel (urae_lite/plan/fake_cuda.py)",
                }
                if tiling == "on":
                    options["vae_home"] = "host (the tiled decode's full-size maps)"
                if m["blocks_to_swap"]:
                    options["swapped_blocks"] = "host copies not counted (block_swap.py's window on the device)"
                phases = measure_generate(pipe, size, tiling, offload=m["offload"])
                rows += pair("generate", size, quant, options, phases, est)
        forget_fake_workspaces()
    return rows


def resolved_tiling(cfg) -> str:
    """`auto` as the planner resolves it (card unknown): the decode estimate equals the tiled or the plain one."""
    from urae_lite.plan import estimate

    if cfg.vae_tiling != "auto":
        return cfg.vae_tiling
    decode = estimate(cfg).allocated()[-1]
    return "on" if decode == estimate(cfg.replace(vae_tiling="on")).allocated()[-1] else "off"


def train_rows(quant: str, size: int, memory: dict | None = None) -> list[dict]:
    """One training step's phases with the size's recipe; `memory`: recipe `training.` options (checkpointing,
    blocks_to_swap, token_chunks, checkpoint_every) over the recipe's own."""
    from urae_lite.plan import PlanConfig, estimate
    from urae_lite.plan.fake import fake_mode, forget_fake_workspaces, measure_train, train_recipe

    overrides = tuple(f"training.{k}={v}" for k, v in (memory or {}).items())
    with fake_mode():
        cfg = train_recipe(size, quant, overrides)
        phases, options = measure_train(cfg, size)
    forget_fake_workspaces()
    t = cfg.training
    m = {k: getattr(t, k) for k in TRAIN_OPTIONS}
    est = estimate(
        PlanConfig(
            task="train", width=size, height=size, quant=quant, adapter=cfg.adapter.kind, rank=cfg.adapter.rank, **m
        )
    )
    options = {
        "recipe": cfg.adapter.kind,
        **m,
        "saved_tensors": "host (save_on_cpu copies on the uncounted meta device)"
        if t.checkpointing == "cpu"
        else "device",
        "autocast": "cpu bf16 with CUDA autocast's dtype policy (urae_lite/plan/fake_cuda.py)",
        **options,
    }
    if t.blocks_to_swap:
        options["swapped_blocks"] = "host copies not counted (block_swap.py's window on the device)"
    return pair("train", size, quant, options, phases, est)


def pair(task: str, size: int, quant: str, options: dict, phases, est) -> list[dict]:
    """One row per measured phase, beside the planner's allocated bytes for that phase and its card total, with the
    planner's configuration (`plan_config`: what urae_lite.plan.profiles.fake_row_config reads back)."""
    import dataclasses

    planned = dict(zip(est.phases, est.allocated()))
    plan_config = {k: v for k, v in dataclasses.asdict(est.config).items() if k != "transformer_config"}
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
    """The row's memory options that differ from the base rows, shortly: ' swap56 chunks4 t5nf4 every2'."""
    tags = {"blocks_to_swap": "swap", "token_chunks": "chunks", "checkpoint_every": "every"}
    out = [
        f"{short}{options[k]}"
        for k, short in tags.items()
        if options.get(k, 0) > 1 or (k == "blocks_to_swap" and options.get(k))
    ]
    if options.get("t5_quant") == "nf4":
        out.append("t5nf4")
    if options.get("offload") not in (None, "model"):
        out.append(f"offload-{options['offload']}")
    return "".join(f" {t}" for t in out)


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
