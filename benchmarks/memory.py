"""The memory planner against measurement: peak GPU memory of generation and training on full-size FLUX.1-dev.

    python benchmarks/memory.py                      # the whole matrix on a CUDA GPU
    python benchmarks/memory.py --only train --configs 4k-nf4 --modes cpu   # one slice of it
    python benchmarks/memory.py --dry-run            # the planner's estimates for the matrix, no GPU needed
    python benchmarks/memory.py --fake --out F.json  # no GPU: live bytes of the real code on fake tensors

The measurements are made by the feature benchmarks, each slice in a fresh process so peak counters and the
allocator start empty: benchmarks/generate.py (the real UraePipeline stages with the real offload mechanisms:
random full-size T5-XXL, CLIP-L and VAE, the transformer streamed from
`urae_lite.tiny.iter_random_transformer_tensors(flux_dev_config(), device="cuda")` into `empty_transformer` +
`fill_transformer(..., LoadSpec(quant, "cuda"))`) and benchmarks/train.py (the real Trainer steps on the same
streamed model, recipes' adapters, Prodigy). Matrix:

* generate 1024², 2048², 4096² -- NF4, FP8 and bf16 with `model` offload; NF4 with `none`, `group`, `sequential`;
* train 2048² (LoRA r16) and 4096² (minor r16 over a 2K LoRA) -- NF4 and FP8, checkpointing `on` and `cpu`.

Every measured phase (text encoding, denoising, VAE decode; a training step) gets the planner's estimate for the same
configuration on a card of this GPU's size: `urae_lite.plan.estimate`. Recorded per row: torch.cuda
max_memory_allocated and max_memory_reserved, seconds per step, the estimate (allocated, and the card total with
the allocator reserve and the CUDA context) and the error. The README's goal is the allocated estimate within ±10% of
the measured allocated peak on every row. Results merge into benchmarks/results/memory_<device>.json (keyed by row),
with device, versions, command and git commit, and the chart memory_<device>.png: peak GiB against resolution per
mode, measured (solid) and estimated (dashed), with the 12/16/24/48 GB card sizes.

Time on an H100: each generation slice loads the transformer once per quant and runs the three sizes (~3-6 min for
`model` with three quants); each training config loads once and steps both modes (a 4K config ~3-5 min). Where one
call is limited to 10 minutes, run slices: `--only generate --offload model`, `--only generate --offload none group
sequential`, `--only train --configs 2k-nf4,2k-fp8`, then each 4K config alone; the results file accumulates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import provenance, result_path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
SIZES = (1024, 2048, 4096)
GENERATE = {"model": ("nf4", "fp8", "bf16"), "none": ("nf4",), "group": ("nf4",), "sequential": ("nf4",)}
TRAIN = {"2k-nf4": (2048, "nf4"), "2k-fp8": (2048, "fp8"), "4k-nf4": (4096, "nf4"), "4k-fp8": (4096, "fp8")}
MODES = ("on", "cpu")
STAGES = {"text_encoders": "text encoding", "denoise": "denoising", "vae_decode": "VAE decode"}  # generate.py's names
CARDS_GB = (12, 16, 24, 48)
TOLERANCE = 0.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("generate", "train"), help="one half of the matrix (default: both)")
    p.add_argument(
        "--offload",
        nargs="+",
        choices=list(GENERATE),
        default=list(GENERATE),
        help="generate: offload modes to measure",
    )
    p.add_argument(
        "--quants",
        nargs="+",
        choices=("nf4", "fp8", "bf16"),
        help="generate: restrict every offload mode's quants to these",
    )
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="generate: square image sides")
    p.add_argument("--configs", default=",".join(TRAIN), help=f"train: comma-separated subset of {', '.join(TRAIN)}")
    p.add_argument("--modes", default=",".join(MODES), help="train: checkpointing modes (on, cpu, off)")
    p.add_argument("--steps", type=int, default=3, help="denoising steps per generation / optimizer steps per mode")
    p.add_argument("--dry-run", action="store_true", help="print the planner's estimates for the matrix and exit")
    p.add_argument(
        "--fake",
        action="store_true",
        help="no GPU: measure live tensor bytes of the real code at full "
        "size on fake tensors (benchmarks/memory_fake.py); default --out benchmarks/results/memory_fake.json",
    )
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/memory_<device>.json)")
    args = p.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in TRAIN]
    unknown += [m for m in args.modes.split(",") if m not in ("on", "cpu", "off")]
    if unknown:
        p.error(f"unknown config or mode {unknown[0]!r}: configs {', '.join(TRAIN)}; modes on, cpu, off")
    return args


# ---- the matrix and its estimates --------------------------------------------------------------------------------
def generate_slices(args: argparse.Namespace) -> list[tuple[str, tuple[str, ...]]]:
    if args.only == "train":
        return []
    return [(mode, tuple(args.quants) if args.quants else GENERATE[mode]) for mode in args.offload]


def train_slices(args: argparse.Namespace) -> list[str]:
    return [] if args.only == "generate" else args.configs.split(",")


def plan_generate(quant: str, offload: str, size: int, rank: int, vram_gib: float | None):
    from urae_lite import MemorySettings
    from urae_lite.plan import PlanConfig, estimate

    memory = MemorySettings(quant=quant, offload=offload)
    return estimate(PlanConfig(task="generate", width=size, height=size, rank=rank, memory=memory), vram_gib)


def plan_train(config: str, mode: str):
    from urae_lite import MemorySettings
    from urae_lite.plan import PlanConfig, estimate

    size, quant = TRAIN[config]
    kind = "lora" if size < 4096 else "minor"  # benchmarks/train.py runs the 2K LoRA and 4K minor recipes
    memory = MemorySettings(quant=quant, checkpointing=mode)
    return estimate(PlanConfig(task="train", width=size, height=size, adapter=kind, validation=False, memory=memory))


def dry_run(args: argparse.Namespace) -> None:
    """The matrix's estimates per phase (allocated GiB) and the card total, without a GPU."""
    print(f"{'row':34} {'phase peaks, allocated GiB':52} {'card total':>10}")
    for offload, quants in generate_slices(args):
        for quant in quants:
            for size in args.sizes:
                est = plan_generate(quant, offload, size, default_rank(offload, size, args.sizes), None)
                phases = "  ".join(f"{p} {a / GiB:5.2f}" for p, a in zip(est.phases, est.allocated()))
                print(f"{f'generate {quant} {offload} {size}²':34} {phases:52} {est.peak / GiB:7.2f} GiB")
    for config in train_slices(args):
        for mode in args.modes.split(","):
            est = plan_train(config, mode)
            phases = "  ".join(f"{p} {a / GiB:5.2f}" for p, a in zip(est.phases, est.allocated()))
            print(f"{f'train {config} checkpointing {mode}':34} {phases:52} {est.peak / GiB:7.2f} GiB")


def default_rank(offload: str, size: int, sizes: list[int]) -> int:
    """The adapter rank benchmarks/generate.py attaches when its row does not record one (see its main())."""
    grow = offload in ("none", "model") and min(sizes) < 4096
    return 48 if size >= 4096 or not grow else 16


# ---- measurement (one fresh process per slice) -------------------------------------------------------------------
def run_script(script: str, options: list[str]) -> tuple[dict | None, str]:
    """Run benchmarks/<script> writing to a temporary JSON; (its result or None, the last line it printed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script), *options, "--out", str(out)],
            capture_output=True,
            text=True,
        )
        print(done.stdout, end="", flush=True)
        last = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]
        if done.returncode or not out.is_file():
            return None, f"{script} exit {done.returncode}: {last}"
        return json.loads(out.read_text()), last


def compare(measured: dict[str, dict], predicted: dict[str, int], est) -> dict:
    """Measured (allocated, reserved) peaks per phase beside the estimated allocated bytes, and the errors."""
    phases = {}
    for phase, m in measured.items():
        phases[phase] = {
            "measured_allocated_gib": round(m["peak_allocated_gib"], 3),
            "measured_reserved_gib": round(m["peak_reserved_gib"], 3),
            "estimated_allocated_gib": round(predicted[phase] / GiB, 3),
            "error": round(predicted[phase] / GiB / m["peak_allocated_gib"] - 1, 4),
        }
    peak_phase = max(phases, key=lambda p: phases[p]["measured_allocated_gib"])
    return {
        "phases": phases,
        "measured_peak_gib": phases[peak_phase]["measured_allocated_gib"],
        "measured_reserved_gib": max(v["measured_reserved_gib"] for v in phases.values()),
        "measured_peak_phase": peak_phase,
        "estimated_peak_gib": round(est.peak_allocated / GiB, 3),
        "estimated_card_gib": round(est.peak / GiB, 3),
        "estimated_peak_phase": est.peak_phase,
        "error": round(est.peak_allocated / GiB / phases[peak_phase]["measured_allocated_gib"] - 1, 4),
        "worst_phase_error": max((v["error"] for v in phases.values()), key=abs),
        "within_tolerance": all(abs(v["error"]) <= TOLERANCE for v in phases.values()),
    }


def measure_generate(offload: str, quants: tuple[str, ...], args, vram_gib: float) -> list[dict]:
    options = [
        "--quants",
        *quants,
        "--sizes",
        *map(str, args.sizes),
        "--steps",
        str(max(2, args.steps)),
        "--offload",
        offload,
        "--skip-vae",
    ]
    result, last = run_script("generate.py", options)
    if result is None:
        return [
            {
                "key": f"generate {q} {offload} {s}",
                "task": "generate",
                "quant": q,
                "offload": offload,
                "resolution": s,
                "error": last,
            }
            for q in quants
            for s in args.sizes
        ]
    rows = []
    for r in result["rows"]:
        row = {
            "key": f"generate {r['quant']} {offload} {r['size']}",
            "task": "generate",
            "quant": r["quant"],
            "offload": offload,
            "resolution": r["size"],
            "adapter_rank": r.get("adapter_rank"),
            "seconds_per_step": r.get("seconds_per_step"),
        }
        if "error" in r or not r.get("stages"):
            row["error"] = r.get("error", "no stage measured")
        else:
            rank = r.get("adapter_rank") or default_rank(offload, r["size"], args.sizes)
            est = plan_generate(r["quant"], offload, r["size"], rank, vram_gib)
            row.update(
                compare({STAGES[k]: v for k, v in r["stages"].items()}, dict(zip(est.phases, est.allocated())), est)
            )
        rows.append(row)
    return rows


def measure_train(config: str, args) -> list[dict]:
    modes = args.modes.split(",")
    result, last = run_script(
        "train.py", ["--configs", config, "--modes", ",".join(modes), "--steps", str(args.steps), "--warmup", "1"]
    )
    by_mode = {r["mode"]: r for r in (result or {}).get("rows", []) if r.get("config") == config}
    rows = []
    for mode in modes:
        r = by_mode.get(mode, {"error": last})
        size, quant = TRAIN[config]
        row = {
            "key": f"train {config} {mode}",
            "task": "train",
            "quant": quant,
            "checkpointing": mode,
            "resolution": size,
            "seconds_per_step": r.get("s_per_step"),
        }
        if "error" in r or "peak_allocated_gib" not in r:
            row["error"] = r.get("error", "no peak measured")
        else:
            est = plan_train(config, mode)  # train.py measures the peak of whole steps: all phases at once
            row.update(compare({"step": r}, {"step": est.peak_allocated}, est))
        rows.append(row)
    return rows


# ---- results -----------------------------------------------------------------------------------------------------
def chart(rows: list[dict], device: str, path: Path) -> None:
    """Peak GiB vs resolution per mode: measured solid, estimated dashed, card sizes as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = {}
    for r in rows:
        if "error" in r:
            continue
        mode = r.get("offload") or f"checkpointing {r.get('checkpointing')}"
        series.setdefault(f"{r['task']} {r['quant']} {mode}", []).append(r)
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, (label, points) in enumerate(sorted(series.items())):
        points.sort(key=lambda r: r["resolution"])
        x = [r["resolution"] for r in points]
        color = f"C{i % 10}"
        ax.plot(x, [r["measured_peak_gib"] for r in points], "o-", color=color, label=label)
        ax.plot(x, [r["estimated_peak_gib"] for r in points], "x--", color=color, alpha=0.7)
    for gb in CARDS_GB:
        ax.axhline(gb, color="grey", lw=0.8, ls=":")
        ax.annotate(f"{gb} GB", (1.0, gb), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(SIZES, [f"{s}²" for s in SIZES])
    ax.set_xlabel("resolution")
    ax.set_ylabel("peak GiB (torch allocated)")
    ax.set_title(f"urae-lite peak memory on {device}: measured (solid) vs planner (dashed)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.dry_run:
        dry_run(args)
        return
    if args.fake:
        from memory_fake import main_fake

        main_fake(args)
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/memory.py measures on a CUDA GPU; --dry-run prints the estimates without one")
    device = torch.cuda.get_device_name()
    vram_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    out = args.out or result_path("memory", device)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    rows = {r["key"]: r for r in previous.get("rows", [])}
    for offload, quants in generate_slices(args):
        rows.update({r["key"]: r for r in measure_generate(offload, quants, args, vram_gib)})
    for config in train_slices(args):
        rows.update({r["key"]: r for r in measure_train(config, args)})
    ordered = sorted(rows.values(), key=lambda r: (r["task"], r["key"]))
    measured = [r for r in ordered if "error" not in r]
    for r in ordered:
        print(
            f"{r['key']:32} "
            + (
                r["error"]
                if "error" in r
                else f"measured {r['measured_peak_gib']:6.2f} GiB ({r['measured_peak_phase']}), estimated "
                f"{r['estimated_peak_gib']:6.2f} GiB: {r['error']:+.1%}, worst phase {r['worst_phase_error']:+.1%}"
            )
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": device,
                "device_memory_gib": round(vram_gib, 2),
                **provenance(),
                "tolerance": TOLERANCE,
                "rows_within_tolerance": sum(r["within_tolerance"] for r in measured),
                "rows_measured": len(measured),
                "rows": ordered,
            },
            indent=1,
        )
        + "\n"
    )
    chart(ordered, device, out.with_suffix(".png"))
    print(
        f"wrote {out} and {out.with_suffix('.png')}: {sum(r['within_tolerance'] for r in measured)} of "
        f"{len(measured)} measured rows within ±{TOLERANCE:.0%} in every phase"
    )


if __name__ == "__main__":
    main()
