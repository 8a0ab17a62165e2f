"""What each slice of benchmarks/gpu_check.py runs and what its row records; gpu_check schedules them.

Slices, most important first: the compiled kernel tests (pytest tests/test_kernels*.py), `benchmarks/kernel_bench.py
--quick`, then generate (`benchmarks/generate.py`, model offload) and train (`benchmarks/train.py --one`, the
recipe's `checkpointing=cpu`, 1 warm-up step) at 2K and 4K, NF4 and FP8, then the consumer-card goals
(benchmarks/gpu_goals.py), each run as `urae-lite plan --vram N --ram 24` picks it at run time. Beside every measured
peak goes the planner's estimate for the same configuration (`urae_lite.plan.estimate`).

In the dry run (the tiny model on the CPU) generate.py, which needs CUDA, is stood in for by this file:
`python benchmarks/gpu_slices.py tiny-generate QUANT SIZE STEPS [t5_quant=Q blocks_to_swap=N token_chunks=N] OUT`
runs the same pipeline stages with the same preset and adapter rank at the stand-in side TINY_SIZE[SIZE].
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gpu_goals
from gpu_children import ChildResult, child_env, run_child

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
GiB = 2**30
OFFLOAD = "model"  # generate: the CUDA default (staged)
TRAIN_MODE = "cpu"  # train: the recipes' checkpointing default
STEPS = 2
TINY_SIZE = {2048: 64, 4096: 128}  # the tiny model's stand-in sides in --dry-run (as train.py --tiny)
DRY_KERNEL_TESTS = "nf4_dequantize or gemm_lowrank"  # the interpreter is slow: a quick subset
DRY_RUN_SKIPS = {"kernel-bench": "times compiled Triton kernels on CUDA: nothing to measure on the CPU"}


@dataclass
class Context:
    dry_run: bool
    work: Path  # temporary folder for child outputs
    vram_gib: float | None
    steps: int = STEPS

    def run(self, target: str, args: list[str], env: dict, timeout_s: float, fresh: bool = False) -> ChildResult:
        """gpu_children.run_child: the dry run forks (its imports are done), unless `fresh` asks for a new
        interpreter (Triton reads TRITON_INTERPRET once, when it is first imported)."""
        return run_child(self.work, target, args, env, timeout_s, fork=self.dry_run and not fresh)


@dataclass(frozen=True)
class Slice:
    name: str
    task: str  # kernel-tests | kernel-bench | generate | train
    size: int | None = None
    quant: str | None = None  # goal slices: the planner's pick (None until asked)
    vram_gib: float | None = None  # goal slices: the card the plan is for

    @property
    def cost_key(self):
        return self.name if self.vram_gib else (self.task, self.size) if self.size else self.task

    def goal_config(self):
        """Goal slices: the PlanConfig the planner picks (asked once per process; UraeError when nothing fits)."""
        return gpu_goals.goal_pick(self.task, self.size, self.vram_gib).config


def slices() -> list[Slice]:
    """Most important first: kernels, 2K NF4, 4K NF4 generate, the FP8 rows, 4K train, the consumer-card goals."""
    heavy = [
        ("generate", 2048, "nf4"),
        ("train", 2048, "nf4"),
        ("generate", 4096, "nf4"),
        ("generate", 2048, "fp8"),
        ("train", 2048, "fp8"),
        ("generate", 4096, "fp8"),
        ("train", 4096, "nf4"),
        ("train", 4096, "fp8"),
    ]
    return [
        Slice("kernel-tests", "kernel-tests"),
        Slice("kernel-bench", "kernel-bench"),
        *(Slice(f"{t}-{s}-{q}", t, s, q) for t, s, q in heavy),
        *(Slice(gpu_goals.goal_name(t, s, v), t, s, vram_gib=v) for t, s, v in gpu_goals.GOALS),
    ]


def train_config(sl: Slice) -> str:
    """benchmarks/train.py's config name for a train slice (a goal's: the recipe and size, its quant comes with the
    plan's `memory.quant=` override)."""
    return f"{sl.size // 1024}k-{'nf4' if sl.vram_gib else sl.quant}"


# ---- the planner ------------------------------------------------------------------------------------------------
def plan_config(sl: Slice, rank: int | None = None, vae_tiling: str | None = None, memory: dict | None = None):
    """The PlanConfig of what the slice runs: generate.py's preset (the 4K preset forces the tiled VAE decode) and
    adapter rank (16 at 2K, 48 at 4K), or train.py's recipe (2K LoRA, 4K minor) with no validation; `memory` (the
    settings `gpu_goals.memory_options` names: quant, offload, T5 quant, block swap, token chunks, checkpointing and
    its stride) replaces the slice's, and defaults to the planner's pick for a goal slice."""
    from urae_lite import MemorySettings
    from urae_lite.plan import PlanConfig
    from urae_lite.presets import preset_memory  # the preset's `memory:` section (no public reader)

    if memory is None and sl.vram_gib:
        memory = gpu_goals.memory_options(sl.goal_config())
    quant = sl.quant or "nf4"
    if sl.task == "generate":
        preset = preset_memory("4k" if sl.size >= 4096 else "2k", "dev")
        cfg = PlanConfig(
            task="generate",
            width=sl.size,
            height=sl.size,
            rank=rank or (48 if sl.size >= 4096 else 16),
            steps=STEPS,
            memory=MemorySettings(quant=quant, offload=OFFLOAD, vae_tiling=vae_tiling or preset.vae_tiling),
        )
    else:
        cfg = PlanConfig(
            task="train",
            width=sl.size,
            height=sl.size,
            adapter="lora" if sl.size < 4096 else "minor",
            validation=False,
            memory=MemorySettings(quant=quant, checkpointing=TRAIN_MODE),
        )
    return cfg.with_memory(**(memory or {}))


def planner_entry(sl: Slice, vram_gib: float | None, rank: int | None = None, vae_tiling: str | None = None) -> dict:
    """Allocated (comparable to max_memory_allocated), + the allocator reserve (comparable to max_memory_reserved),
    and the card total with the CUDA context, at the peak phase; and each phase's allocated bytes."""
    from urae_lite.plan import constants as C  # the CUDA context the card total adds (no public name)
    from urae_lite.plan import estimate

    est = estimate(plan_config(sl, rank, vae_tiling), vram_gib)
    return {
        "config": est.config.summary(),
        "allocated_gib": round(est.peak_allocated / GiB, 3),
        "reserved_gib": round((est.peak - C.CUDA_CONTEXT) / GiB, 3),
        "total_gib": round(est.peak / GiB, 3),
        "peak_phase": est.peak_phase,
        "phases": {p: round(a / GiB, 3) for p, a in zip(est.phases, est.allocated())},
    }


def planner_or_note(row: dict, sl: Slice, vram_gib: float | None, **measured_settings) -> dict | None:
    """planner_entry, or None with the error noted in the row: a planner bug must not cost the measurements."""
    try:
        return planner_entry(sl, vram_gib, **measured_settings)
    except Exception as e:  # noqa: BLE001
        row["planner_error"] = f"{type(e).__name__}: {e}"
        return None


def ratios(planner: dict | None, measured: dict) -> dict | None:
    """Estimate / measured for allocated and reserved peaks (None where nothing was measured)."""
    if not planner:
        return None
    out = {}
    for key in ("allocated", "reserved"):
        m = measured.get(f"peak_{key}_gib")
        out[key] = round(planner[f"{key}_gib"] / m, 3) if m else None
    return out


# ---- rows -------------------------------------------------------------------------------------------------------
def base_row(sl: Slice, ctx: Context) -> dict:
    """A pending row: the planner's estimate is known before anything runs."""
    row = {
        "slice": sl.name,
        "task": sl.task,
        "resolution": sl.size,
        "quant": sl.quant,
        "status": "pending",
        "model": None,
        "measured": None,
        "planner": None,
        "ratio_estimate_to_measured": None,
    }
    if sl.vram_gib:
        try:
            row["goal"] = gpu_goals.goal_record(sl.task, sl.size, sl.vram_gib)
            row["quant"] = row["goal"]["config"]["quant"]
        except Exception as e:  # noqa: BLE001 -- noted; running the slice then fails with the same error
            row["goal"] = {"vram_gib": sl.vram_gib, "error": f"{type(e).__name__}: {e}"}
    if sl.size:
        row["model"] = "tiny FLUX on the CPU" if ctx.dry_run else "FLUX.1-dev architecture, random weights"
        row["planner"] = planner_or_note(row, sl, ctx.vram_gib)
    return row


def finish_row(row: dict) -> None:
    """What a measured row adds: estimate / measured, and whether a goal's measurement fits its card."""
    if row.get("planner") and row.get("measured"):
        row["ratio_estimate_to_measured"] = ratios(row["planner"], row["measured"])
    if row.get("goal", {}).get("plan") and row.get("measured"):
        row["goal"] = gpu_goals.measured_fit(row["goal"], row["measured"])


def pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 1 failed, 2 deselected in 4.5s")."""
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln)]
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "deselected": 0}
    for n, what in re.findall(
        r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", summary[-1] if summary else ""
    ):
        counts["errors" if what.startswith("error") else what] = int(n)
    return counts


# ---- one slice each: (row fields, the child's result) -----------------------------------------------------------
def kernel_tests(ctx: Context, sl: Slice, timeout_s: float) -> tuple[dict, ChildResult]:
    files = sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / "tests" / "test_kernels*.py")))
    args = [*files, "-q", "-p", "no:cacheprovider"] + (["-k", DRY_KERNEL_TESTS] if ctx.dry_run else [])
    res = ctx.run("pytest", args, child_env(ctx.dry_run, interpret=ctx.dry_run), timeout_s, fresh=True)
    counts = pytest_counts(res.stdout)
    fields = {"command": shlex.join(["python", "-m", "pytest", *args]), "measured": counts, "interpreter": ctx.dry_run}
    if res.rc not in (0, None) or (res.rc == 0 and counts["passed"] == 0):
        fields["status"] = "failed"
        fields["reason"] = (
            f"pytest exit {res.rc}: {counts['failed']} failed, {counts['errors']} errors, {counts['passed']} passed"
        )
    return fields, res


def kernel_bench(ctx: Context, sl: Slice, timeout_s: float) -> tuple[dict, ChildResult]:
    out = ctx.work / "kernels.json"
    command = shlex.join(["python", "benchmarks/kernel_bench.py", "--quick"])
    res = ctx.run(str(BENCH / "kernel_bench.py"), ["--quick", "--out", str(out)], child_env(False), timeout_s)
    if res.rc != 0 or not out.is_file():
        return {
            "command": command,
            "status": "failed",
            "reason": f"kernel_bench.py exit {res.rc}: {res.last_line()}",
        }, res
    result = json.loads(out.read_text())
    return {"command": command, "measured": {"goal": result.get("goal"), "rows": result.get("rows")}}, res


def goal_run_config(ctx: Context, sl: Slice) -> tuple[object | None, dict]:
    """A goal slice's PlanConfig as this run takes it (the dry run's tiny model: `gpu_goals.tiny_plan`) and the
    fields that record the changes; (None, {}) for the other slices."""
    if not sl.vram_gib:
        return None, {}
    cfg = sl.goal_config()
    if not ctx.dry_run:
        return cfg, {}
    from urae_lite.tiny import tiny_transformer_config

    tiny = tiny_transformer_config()
    cfg, changes = gpu_goals.tiny_plan(cfg, tiny["num_layers"] + tiny["num_single_layers"])
    return cfg, {"dry_run_changes": changes}


def generate(ctx: Context, sl: Slice, timeout_s: float) -> tuple[dict, ChildResult]:
    out = ctx.work / "generate.json"
    goal, fields = goal_run_config(ctx, sl)
    quant = goal.memory.quant if goal else sl.quant
    if ctx.dry_run:  # benchmarks/generate.py needs CUDA; the same pipeline stages on the tiny model instead
        target, out_args = BENCH / "gpu_slices.py", [str(out)]
        memory = [f"{k}={getattr(goal.memory, k)}" for k in TINY_MEMORY] if goal else []
        args = ["tiny-generate", quant, str(sl.size), str(ctx.steps), *memory]
    else:
        target, out_args = BENCH / "generate.py", ["--out", str(out)]
        memory = gpu_goals.generate_args(goal) if goal else ["--offload", OFFLOAD]
        args = ["--quants", quant, "--sizes", str(sl.size), "--steps", str(ctx.steps), *memory, "--skip-vae"]
    fields["command"] = shlex.join(["python", str(target.relative_to(ROOT)), *args])
    res = ctx.run(str(target), args + out_args, child_env(ctx.dry_run), timeout_s)
    if res.rc != 0 or not out.is_file():
        return {**fields, "status": "failed", "reason": f"exit {res.rc}: {res.last_line()}"}, res
    return {**fields, **generate_fields(sl, json.loads(out.read_text())["rows"][0], ctx)}, res


def generate_fields(sl: Slice, row: dict, ctx: Context) -> dict:
    """A generate.py row -> measured peaks (max over stages, and per stage beside the planner's phases), with the
    planner asked again for the adapter rank and VAE tiling the row reports."""
    from memory import STAGES

    fields: dict = {}
    planner = planner_or_note(fields, sl, ctx.vram_gib, rank=row.get("adapter_rank"), vae_tiling=row.get("vae_tiling"))
    phases = (planner or {}).get("phases", {})
    stages = {
        STAGES.get(k, k): {
            "seconds": round(v["seconds"], 3),
            "peak_allocated_gib": v.get("peak_allocated_gib"),
            "peak_reserved_gib": v.get("peak_reserved_gib"),
            "estimated_allocated_gib": phases.get(STAGES.get(k, k)),
        }
        for k, v in row.get("stages", {}).items()
    }
    measured = {
        "peak_allocated_gib": row.get("peak_allocated_gib"),
        "peak_reserved_gib": row.get("peak_reserved_gib"),
        "outside_allocator_gib": row.get("outside_allocator_gib"),
        "seconds_per_step": row.get("seconds_per_step"),
        "adapter_rank": row.get("adapter_rank"),
        "image_size": row.get("size"),
        **{k: row.get(k) for k in ("quant", "t5_quant", "blocks_to_swap", "token_chunks")},
        "stages": stages,
    }
    fields.update(measured=measured, planner=planner)
    if "error" in row:
        fields.update(status="failed", reason=row["error"])
    return fields


def train(ctx: Context, sl: Slice, timeout_s: float) -> tuple[dict, ChildResult]:
    goal, fields = goal_run_config(ctx, sl)
    memory = gpu_goals.train_args(goal) if goal else ["--modes", TRAIN_MODE]
    args = ["--one", train_config(sl), *memory, "--steps", str(ctx.steps), "--warmup", "1"]
    args += ["--tiny"] if ctx.dry_run else []
    fields["command"] = shlex.join(["python", "benchmarks/train.py", *args])
    res = ctx.run(str(BENCH / "train.py"), args, child_env(ctx.dry_run), timeout_s)
    found = [ln for ln in res.stdout.splitlines() if ln.startswith("ROWS ")]
    if res.rc != 0 or not found:
        return {**fields, "status": "failed", "reason": f"exit {res.rc}: {res.last_line()}"}, res
    (row,) = json.loads(found[-1][5:])
    measured = {
        "peak_allocated_gib": row.get("peak_allocated_gib"),
        "peak_reserved_gib": row.get("peak_reserved_gib"),
        "outside_allocator_gib": row.get("outside_allocator_gib"),
        "seconds_per_step": row.get("s_per_step"),
        "load_s": row.get("load_s"),
        "kind": row.get("kind"),
        "image_size": row.get("resolution"),
        "checkpointing": row.get("mode"),
        **{k: row.get(k) for k in ("quant", "blocks_to_swap", "token_chunks", "checkpoint_every")},
    }
    fields["measured"] = measured
    if "error" in row:
        fields.update(status="failed", reason=row["error"])
    return fields, res


RUNNERS = {"kernel-tests": kernel_tests, "kernel-bench": kernel_bench, "generate": generate, "train": train}


# ---- the tiny stand-in for generate.py (--dry-run child) ---------------------------------------------------------
TINY_MEMORY = ("t5_quant", "blocks_to_swap", "token_chunks")  # what a goal's pick changes on the tiny model


def tiny_generate(quant: str, size: int, steps: int, **memory) -> dict:
    """generate.py's row, made on the tiny model on the CPU: the same pipeline stages, preset and adapter rank at
    the stand-in side TINY_SIZE[size], with `memory` (TINY_MEMORY) over the preset's memory settings; no CUDA, so
    the peaks are None."""
    from generate import PROMPT, adapter_rank, add_adapter_rank

    import urae_lite

    preset = "4k" if size >= 4096 else "2k"
    swap = memory.pop("blocks_to_swap", 0)
    pipe = urae_lite.load_pipeline(
        "tiny", memory={"quant": quant, **memory}, preset=preset, device="cpu", progress=False
    )
    add_adapter_rank(pipe.transformer, 48 if size >= 4096 else 16, "urae")
    if swap:  # the adapters first, then the swap, as a load with adapter files does
        pipe.reconfigure(pipe.memory.replace(blocks_to_swap=swap))
    s = pipe.defaults.replace(width=TINY_SIZE[size], height=TINY_SIZE[size], steps=steps)
    ends: list[float] = []
    handle = pipe.transformer.register_forward_hook(lambda *_: ends.append(time.perf_counter()))
    stages: dict[str, dict] = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        result = fn()
        stages[name] = {"seconds": time.perf_counter() - start, "peak_allocated_gib": None, "peak_reserved_gib": None}
        return result

    embeds = timed("text_encoders", lambda: pipe.encode(PROMPT, s))
    packed = timed("denoise", lambda: pipe.denoise(embeds, s, seed=0))
    timed("vae_decode", lambda: pipe.decode(packed, s))
    handle.remove()
    gaps = sorted(b - a for a, b in itertools.pairwise(ends))
    return {
        "quant": quant,
        "size": s.width,
        "steps": steps,
        "settings": s.as_dict(),
        "vae_tiling": pipe.memory.vae_tiling,
        "stages": stages,
        "seconds_per_step": gaps[len(gaps) // 2] if gaps else None,
        "adapter_rank": adapter_rank(pipe.transformer),
        "peak_allocated_gib": None,
        "peak_reserved_gib": None,
        **{k: getattr(pipe.memory, k) for k in TINY_MEMORY},
    }


def tiny_generate_main(argv: list[str]) -> None:
    """`QUANT SIZE STEPS [t5_quant=Q blocks_to_swap=N token_chunks=N] OUT`."""
    (quant, size, steps), options, out = argv[:3], argv[3:-1], argv[-1]
    memory = {k: v if k == "t5_quant" else int(v) for k, v in (o.split("=", 1) for o in options)}
    row = tiny_generate(quant, int(size), int(steps), **memory)
    Path(out).write_text(json.dumps({"device": "cpu-tiny", "rows": [row]}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] != ["tiny-generate"]:
        sys.exit(f"usage: python {sys.argv[0]} tiny-generate QUANT SIZE STEPS [SETTING=VALUE ...] OUT")
    tiny_generate_main(sys.argv[2:])
