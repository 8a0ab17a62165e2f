"""One command for a session that has a GPU: kernel tests, kernel timings, and generate / train at 2K and 4K on
full-size FLUX.1-dev (random weights, NF4 and FP8) with the memory planner's estimate beside every measured peak.

On the device machine (the image has torch, triton, transformers, peft, accelerate and safetensors; diffusers,
bitsandbytes, optimum-quanto and prodigyopt come from .whl/; the checkout itself is not pip-installed):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/gpu_check.py

Options: `--budget-s 480` (seconds for the whole run), `--only SLICE,...` (e.g. a second call for what the first one
skipped: `--only train-4096-nf4 --budget-s 540`; the other slices keep their results from the file), `--out DIR`,
`--commit SHA` (recorded when the copy on the device has no .git for provenance.py to read).
`python benchmarks/gpu_check.py --dry-run --out DIR` runs the same slices on the tiny model on the CPU (about
3 minutes on 2 cores; its children are forks of the parent, which has done the slow imports once).

Slices, most important first; each heavy one runs in a fresh process so peak counters and the allocator start
empty: the compiled kernel tests (pytest tests/test_kernels*.py), `benchmarks/kernels.py --quick`, then generate
(`benchmarks/generate.py`, model offload, 2 steps) and train (`benchmarks/train.py --one`, the recipe's
`checkpointing=cpu`, 1 warm-up + 2 steps): 2K NF4 generate, 2K NF4 train, 4K NF4 generate, the FP8 rows, 4K train,
then the consumer-card goals (benchmarks/gpu_goals.py), each run exactly as `urae-lite plan --vram N --ram 24` picks
it at run time (quant, offload, T5 quant, block swap, token chunks; checkpointing and its stride):
`goal-generate-4096-8g`, `goal-train-2048-8g`, `goal-train-4096-12g`. Their rows add `goal`: the card, the pick, the
planner's card total, and whether the measured reserved peak + the memory outside the allocator fits the card.
A default run seldom reaches them (they are last and slow: 52-56 blocks streamed per step, T5-XXL saved and reloaded
for NF4): measure them with `--only goal-generate-4096-8g,goal-train-2048-8g --budget-s 540`, then
`--only goal-train-4096-12g --budget-s 580`. The dry run plans them for the full-size model but runs them on the tiny
one with its block share swapped and no offload (`dry_run_changes` in the row).
A slice whose expected time does not fit what is left of the budget is skipped and recorded with the reason; each
child has a timeout inside the budget. Expected times come from this device's previous result file when there is
one, else from defaults, scaled by how the finished slices compared with theirs.

Every row records torch.cuda max_memory_allocated / max_memory_reserved, seconds per step and the planner's
estimate for the same configuration (`urae_lite.plan.estimate`: allocated, allocated + allocator reserve, and the
card total with the CUDA context) with the ratios estimate / measured. The JSON (device, versions, command, git
commit, rows, summary) goes to benchmarks/results/gpu_check_<device>.json or into `--out DIR`, rewritten atomically
after every slice so a killed run still leaves its results. Exit status 1 when a slice failed (not when one was
skipped), 2 when a signal stopped the run.

A plain checkout lacks what the install's package-dir mapping provides (`urae_lite.kernels` is the top-level
kernels/ folder, `urae_lite.recipes` is recipes/). gpu_check adds both with an importlib finder, in itself and, through
a temporary sitecustomize.py first on PYTHONPATH, in every process below it: the scripts, pytest and the tests' own
workers (`map_checkout_everywhere`). With an install present the install's mapping wins.
"""

from __future__ import annotations

import argparse
import glob
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
GiB = 2**30
PACKAGE_DIRS = {"kernels": ROOT / "kernels", "recipes": ROOT / "recipes"}  # urae_lite.<name> once installed
EXTRA_LIBRARIES = ("peft", "accelerate", "safetensors", "optimum-quanto", "prodigyopt", "numpy")
OFFLOAD = "model"  # generate: the CUDA default (staged)
TRAIN_MODE = "cpu"  # train: the recipes' checkpointing default
STEPS = 2
TINY_SIZE = {2048: 64, 4096: 128}  # the tiny model's stand-in sides in --dry-run (as train.py --tiny)
DRY_KERNEL_TESTS = "nf4_dequantize or gemm_lowrank"  # the interpreter is slow: a quick subset
DRY_RUN_SKIPS = {"kernel-bench": "times compiled Triton kernels on CUDA: nothing to measure on the CPU"}
MARGIN_S = 15.0  # kept back from the budget for the last JSON write and the table
TAIL_LINES = 30
# Expected seconds per slice, process start included (GPU: H100/H200 guesses until a result file exists).
GPU_COST = {
    "kernel-tests": 120,
    "kernel-bench": 90,
    ("generate", 2048): 120,
    ("generate", 4096): 200,
    ("train", 2048): 120,
    ("train", 4096): 480,
    "goal-generate-4096-8g": 300,  # + saving and reloading T5-XXL for NF4, 52 blocks streamed per step
    "goal-train-2048-8g": 200,
    "goal-train-4096-12g": 540,
}
DRY_COST = {
    "kernel-tests": 40,
    "kernel-bench": 0,
    ("generate", 2048): 15,
    ("generate", 4096): 20,
    ("train", 2048): 15,
    ("train", 4096): 20,
    "goal-generate-4096-8g": 15,
    "goal-train-2048-8g": 15,
    "goal-train-4096-12g": 45,  # token chunks: every chunk recomputed alone
}
# What the dry run's forked children import, imported once before the first fork.
WARM_IMPORTS = (
    "prodigyopt",
    "urae_lite.pipeline",
    "urae_lite.train.loop",
    "urae_lite.train.model",
    "urae_lite.train.optim",
    "urae_lite.train.config",
    "urae_lite.train.samples",
)


# ---- a plain checkout imports like an install ---------------------------------------------------------------------
class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds urae_lite.kernels / urae_lite.recipes in the checkout's kernels/ and recipes/ (pyproject's package-dir,
    which PYTHONPATH cannot express). Last in sys.meta_path, so an install's own mapping still wins, and agnostic to
    which folder urae_lite itself came from (the scripts put the checkout first on sys.path)."""

    def find_spec(self, fullname, path=None, target=None):
        folder = PACKAGE_DIRS.get(fullname.removeprefix("urae_lite.")) if fullname.startswith("urae_lite.") else None
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def add_checkout_finder() -> None:
    """Idempotent and lazy: nothing is imported here, so Triton still reads TRITON_INTERPRET when the kernels are
    first imported. The checkout goes on sys.path only where nothing else provides urae_lite."""
    if importlib.util.find_spec("urae_lite") is None:
        sys.path.append(str(ROOT))
    if not any(type(f).__name__ == "CheckoutFinder" for f in sys.meta_path):
        sys.meta_path.append(CheckoutFinder())


# Installs the finder in every Python process started below gpu_check (scripts, pytest, the tests' own workers),
# then runs the sitecustomize it hides, if any.
SITECUSTOMIZE = """\"\"\"Written by benchmarks/gpu_check.py for one run: the checkout imports as an install would.\"\"\"
import importlib.machinery, importlib.util, os, sys

_spec = importlib.util.spec_from_file_location("_urae_gpu_check", {script!r})
_module = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
_module.add_checkout_finder()
_here = os.path.dirname(os.path.abspath(__file__))
_hidden = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _hidden is not None:
    _hidden.loader.exec_module(importlib.util.module_from_spec(_hidden))
"""


def map_checkout_everywhere(folder: Path) -> None:
    """This process and every process started below it find urae_lite.kernels / urae_lite.recipes in the checkout
    (`folder` holds the sitecustomize.py that PYTHONPATH hands down)."""
    add_checkout_finder()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(script=str(Path(__file__).resolve())))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)


def run_here(argv: list[str]) -> None:
    """What `python SCRIPT ARGS` or `python -m pytest ARGS` does, in this (forked) process."""
    if argv[0] == "pytest":
        import pytest

        raise SystemExit(pytest.main(argv[1:]))
    import runpy

    sys.argv = argv
    sys.path.insert(0, str(Path(argv[0]).parent))
    runpy.run_path(argv[0], run_name="__main__")


def child_argv(target: str, args: list[str]) -> list[str]:
    """The command line of a fresh child: `target` is "pytest" or a script path."""
    return [sys.executable, *(["-m", "pytest"] if target == "pytest" else [target]), *args]


def goals():
    """benchmarks/gpu_goals.py, imported on first use: every child process runs this file from its sitecustomize,
    with no benchmarks/ on sys.path."""
    import gpu_goals

    return gpu_goals


# ---- slices ------------------------------------------------------------------------------------------------------
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
        return goals().goal_pick(self.task, self.size, self.vram_gib).config


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
        *(Slice(goals().goal_name(t, s, v), t, s, vram_gib=v) for t, s, v in goals().GOALS),
    ]


def train_config(sl: Slice) -> str:
    """benchmarks/train.py's config name for a train slice (a goal's: the recipe and size, its quant comes with the
    plan's `quant=` override)."""
    return f"{sl.size // 1024}k-{'nf4' if sl.vram_gib else sl.quant}"


# ---- the planner ------------------------------------------------------------------------------------------------
def plan_config(sl: Slice, rank: int | None = None, vae_tiling: str | None = None, memory: dict | None = None):
    """The PlanConfig of what the slice runs: generate.py's preset (the 4K preset forces the tiled VAE decode) and
    adapter rank (16 at 2K, 48 at 4K), or train.py's recipe (2K LoRA, 4K minor) with no validation; `memory` (the
    options `gpu_goals.memory_options` names: quant, offload, T5 quant, block swap, token chunks, checkpointing and
    its stride) replaces the slice's, and defaults to the planner's pick for a goal slice."""
    from urae_lite.plan import PlanConfig
    from urae_lite.presets import load_preset

    if memory is None and sl.vram_gib:
        memory = goals().memory_options(sl.goal_config())
    if sl.task == "generate":
        preset = load_preset("4k" if sl.size >= 4096 else "2k", "dev")
        cfg = PlanConfig(
            task="generate",
            width=sl.size,
            height=sl.size,
            quant=sl.quant or "nf4",
            offload=OFFLOAD,
            rank=rank or (48 if sl.size >= 4096 else 16),
            vae_tiling=vae_tiling or preset.vae_tiling,
            steps=STEPS,
        )
    else:
        cfg = PlanConfig(
            task="train",
            width=sl.size,
            height=sl.size,
            quant=sl.quant or "nf4",
            checkpointing=TRAIN_MODE,
            adapter="lora" if sl.size < 4096 else "minor",
            validation=False,
        )
    return cfg.replace(**(memory or {}))


def planner_entry(sl: Slice, vram_gib: float | None, rank: int | None = None, vae_tiling: str | None = None) -> dict:
    """Allocated (comparable to max_memory_allocated), + the allocator reserve (comparable to max_memory_reserved),
    and the card total with the CUDA context, at the peak phase; and each phase's allocated bytes."""
    from urae_lite.plan import constants as C
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


# ---- children -----------------------------------------------------------------------------------------------------
@dataclass
class Context:
    dry_run: bool
    work: Path  # temporary folder for child outputs
    vram_gib: float | None
    steps: int = STEPS


@dataclass
class ChildResult:
    rc: int | None  # None: killed at its timeout
    wall_s: float
    stdout: str
    stderr: str

    def tail(self, n: int = TAIL_LINES) -> str:
        return "\n".join((self.stdout + "\n" + self.stderr).strip().splitlines()[-n:])

    def last_line(self) -> str:
        return ((self.stderr or self.stdout).strip().splitlines() or ["no output"])[-1][:300]


def run_child(
    ctx: Context, target: str, args: list[str], env: dict, timeout_s: float, fresh: bool = False
) -> ChildResult:
    """Run `target args` (a script, or "pytest") with stdout/stderr in files (no pipe to fill), killed at
    `timeout_s`. On the GPU each child is a fresh interpreter: its own CUDA context, allocator and peak counters.
    The dry run forks this process instead, which has imported torch and diffusers already: the CPU has no counters
    to keep apart, and those imports cost ~30 s per child on a small machine. `fresh` forces a new interpreter
    (Triton reads TRITON_INTERPRET once, when it is first imported)."""
    out, err = ctx.work / "stdout.txt", ctx.work / "stderr.txt"
    start = time.monotonic()
    if ctx.dry_run and not fresh:
        rc = _run_forked([target, *args], env, timeout_s, out, err)
    else:
        with out.open("w") as fo, err.open("w") as fe:
            try:
                rc = subprocess.run(
                    child_argv(target, args), cwd=ROOT, env=env, stdout=fo, stderr=fe, timeout=timeout_s, check=False
                ).returncode
            except subprocess.TimeoutExpired:
                rc = None
    return ChildResult(rc, time.monotonic() - start, out.read_text(errors="replace"), err.read_text(errors="replace"))


def _run_forked(argv: list[str], env: dict, timeout_s: float, out: Path, err: Path) -> int | None:
    """run_here(argv) in a forked child; its exit code, or None when killed at the timeout."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's loop
        code = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.environ.clear()
            os.environ.update(env)
            os.chdir(ROOT)
            run_here(argv)
            code = 0
        except SystemExit as e:  # as the interpreter would report it
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 -- the child reports anything, as the interpreter would
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
            time.sleep(0.05)
    except BaseException:  # stopped (SIGTERM, Ctrl-C) while waiting: take the child along
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise


def child_env(dry_run: bool, interpret: bool = False) -> dict:
    """The GPU children never interpret Triton (benchmarks/kernels.py refuses to); the dry run's kernel tests must."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if dry_run:
        env.setdefault("OMP_NUM_THREADS", "2")
    return env


def pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 1 failed, 2 deselected in 4.5s")."""
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln)]
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "deselected": 0}
    for n, what in re.findall(
        r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", summary[-1] if summary else ""
    ):
        counts["errors" if what.startswith("error") else what] = int(n)
    return counts


# ---- one slice each ---------------------------------------------------------------------------------------------
def kernel_tests(ctx: Context, sl: Slice, timeout_s: float) -> tuple[dict, ChildResult]:
    files = sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / "tests" / "test_kernels*.py")))
    args = [*files, "-q", "-p", "no:cacheprovider"] + (["-k", DRY_KERNEL_TESTS] if ctx.dry_run else [])
    res = run_child(ctx, "pytest", args, child_env(ctx.dry_run, interpret=ctx.dry_run), timeout_s, fresh=True)
    counts = pytest_counts(res.stdout)
    fields = {"command": shlex.join(["python", "-m", "pytest", *args]), "measured": counts, "interpreter": ctx.dry_run}
    if res.rc not in (0, None) or (res.rc == 0 and counts["passed"] == 0):
        fields["status"] = "failed"
        fields["reason"] = (
            f"pytest exit {res.rc}: {counts['failed']} failed, {counts['errors']} errors, {counts['passed']} passed"
        )
    return fields, res


def kernel_bench(ctx: Context, sl: Slice, timeout_s: float) -> tuple[dict, ChildResult]:
    args = ["--quick", "--out", str(ctx.work / "kernels.json")]
    command = shlex.join(["python", "benchmarks/kernels.py", "--quick"])
    res = run_child(ctx, str(BENCH / "kernels.py"), args, child_env(False), timeout_s)
    out = ctx.work / "kernels.json"
    if res.rc != 0 or not out.is_file():
        return {"command": command, "status": "failed", "reason": f"kernels.py exit {res.rc}: {res.last_line()}"}, res
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
    cfg, changes = goals().tiny_plan(cfg, tiny["num_layers"] + tiny["num_single_layers"])
    return cfg, {"dry_run_changes": changes}


def generate(ctx: Context, sl: Slice, timeout_s: float) -> tuple[dict, ChildResult]:
    out = ctx.work / "generate.json"
    goal, fields = goal_run_config(ctx, sl)
    quant = goal.quant if goal else sl.quant
    if ctx.dry_run:  # benchmarks/generate.py needs CUDA; the same pipeline stages on the tiny model instead
        target, out_args = BENCH / "gpu_check.py", [str(out)]
        memory = [f"{k}={getattr(goal, k)}" for k in ("t5_quant", "blocks_to_swap", "token_chunks")] if goal else []
        args = ["tiny-generate", quant, str(sl.size), str(ctx.steps), *memory]
    else:
        target, out_args = BENCH / "generate.py", ["--out", str(out)]
        memory = goals().generate_args(goal) if goal else ["--offload", OFFLOAD]
        args = ["--quants", quant, "--sizes", str(sl.size), "--steps", str(ctx.steps), *memory, "--skip-vae"]
    fields["command"] = shlex.join(["python", str(target.relative_to(ROOT)), *args])
    res = run_child(ctx, str(target), args + out_args, child_env(ctx.dry_run), timeout_s)
    if res.rc != 0 or not out.is_file():
        return {**fields, "status": "failed", "reason": f"exit {res.rc}: {res.last_line()}"}, res
    return {**fields, **generate_fields(sl, json.loads(out.read_text())["rows"][0], ctx)}, res


def generate_fields(sl: Slice, row: dict, ctx: Context) -> dict:
    """A generate.py row -> measured peaks (max over stages, and per stage beside the planner's phases), with the
    planner asked again for the adapter rank and VAE tiling the row reports."""
    from memory import STAGES

    fields: dict = {}
    planner = planner_or_note(
        fields, sl, ctx.vram_gib, rank=row.get("adapter_rank"), vae_tiling=row.get("settings", {}).get("vae_tiling")
    )
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
    memory = goals().train_args(goal) if goal else ["--modes", TRAIN_MODE]
    args = ["--one", train_config(sl), *memory, "--steps", str(ctx.steps), "--warmup", "1"]
    args += ["--tiny"] if ctx.dry_run else []
    fields["command"] = shlex.join(["python", "benchmarks/train.py", *args])
    res = run_child(ctx, str(BENCH / "train.py"), args, child_env(ctx.dry_run), timeout_s)
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
def tiny_generate(quant: str, size: int, steps: int, **memory) -> dict:
    """generate.py's row, made on the tiny model on the CPU: the same pipeline stages, preset and adapter rank at
    the stand-in side TINY_SIZE[size], with `memory` (t5_quant, blocks_to_swap, token_chunks) as load_pipeline
    takes them; no CUDA, so the peaks are None."""
    from generate import PROMPT, adapter_rank, add_adapter_rank

    import urae_lite
    from urae_lite.presets import load_preset

    preset = "4k" if size >= 4096 else "2k"
    pipe = urae_lite.load_pipeline("tiny", quant=quant, preset=preset, device="cpu", progress=False, **memory)
    add_adapter_rank(pipe.transformer, 48 if size >= 4096 else 16, "urae")
    s = load_preset(preset, "dev").replace(width=TINY_SIZE[size], height=TINY_SIZE[size], steps=steps)
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
        "stages": stages,
        "seconds_per_step": gaps[len(gaps) // 2] if gaps else None,
        "adapter_rank": adapter_rank(pipe.transformer),
        "peak_allocated_gib": None,
        "peak_reserved_gib": None,
        **{"t5_quant": "bf16", "blocks_to_swap": 0, "token_chunks": 1, **memory},
    }


def tiny_generate_main(argv: list[str]) -> None:
    """`QUANT SIZE STEPS [t5_quant=Q blocks_to_swap=N token_chunks=N] OUT`."""
    (quant, size, steps), options, out = argv[:3], argv[3:-1], argv[-1]
    memory = {k: v if k == "t5_quant" else int(v) for k, v in (o.split("=", 1) for o in options)}
    row = tiny_generate(quant, int(size), int(steps), **memory)
    Path(out).write_text(json.dumps({"device": "cpu-tiny", "rows": [row]}, indent=1))


# ---- budget -----------------------------------------------------------------------------------------------------
@dataclass
class Budget:
    """Seconds left, and how this machine's slices compare with their expected times so far."""

    total_s: float
    start: float = field(default_factory=time.monotonic)
    expected_done: float = 0.0
    actual_done: float = 0.0

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start) - MARGIN_S

    def scale(self) -> float:
        """Actual / expected over the finished slices, bounded: one odd slice must not skip or admit everything."""
        return min(2.0, max(0.5, self.actual_done / self.expected_done)) if self.expected_done else 1.0

    def record(self, expected_s: float, wall_s: float) -> None:
        self.expected_done += expected_s
        self.actual_done += wall_s


def decide(budget: Budget, expected_s: float) -> tuple[float | None, bool, str | None]:
    """(timeout, whether the budget rather than the slice's own cap sets it, None) to run; (None, _, reason) to
    skip. The cap (4x expected, at least +180 s) stops a hung child from eating the rest of the budget."""
    expected = expected_s * budget.scale()
    left = budget.left()
    if expected > left:
        return None, True, f"expected {expected:.0f} s, {max(left, 0):.0f} s left of the {budget.total_s:.0f} s budget"
    cap = max(4 * expected, expected + 180)
    return min(cap, left), left < cap, None


def expected_cost(sl: Slice, dry_run: bool, known: dict[str, float]) -> float:
    """This device's previous wall time for the slice, else the defaults."""
    return known.get(sl.name) or (DRY_COST if dry_run else GPU_COST)[sl.cost_key]


# ---- the report ---------------------------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader (or a kill mid-write) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def summary(rows: list[dict], started: float) -> dict:
    """Slice names by status (pending / running only while the run goes on, or in the file of a killed run)."""
    by = {
        s: [r["slice"] for r in rows if r["status"] == s]
        for s in ("passed", "failed", "skipped", "timed_out", "pending", "running")
    }
    return {**by, "counts": {k: len(v) for k, v in by.items()}, "wall_s": round(time.monotonic() - started, 1)}


def versions(prov: dict) -> dict:
    """provenance.py's libraries (and CUDA), plus the rest of what the GPU image or .whl/ provides."""
    out = {k: v for k, v in prov.items() if k not in ("command", "git_commit")}
    for dist in EXTRA_LIBRARIES:
        try:
            out.setdefault(dist, importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            out.setdefault(dist, None)
    out["python"] = sys.version.split()[0]
    return out


def warm_imports() -> None:
    """The dry run's heavy imports, once, so each forked slice starts with them done."""
    import importlib

    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:  # the child that needs it reports it
            pass


def device_info(dry_run: bool) -> tuple[str, float | None]:
    """(device name, memory GiB); the dry run has no card, so the planner is asked without a card size."""
    if dry_run:
        return "cpu (dry run)", None
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_check.py needs a CUDA GPU; --dry-run runs the same slices on the CPU")
    return torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / GiB


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
            row["goal"] = goals().goal_record(sl.task, sl.size, sl.vram_gib)
            row["quant"] = row["goal"]["config"]["quant"]
        except Exception as e:  # noqa: BLE001 -- noted; running the slice then fails with the same error
            row["goal"] = {"vram_gib": sl.vram_gib, "error": f"{type(e).__name__}: {e}"}
    if sl.size:
        row["model"] = "tiny FLUX on the CPU" if ctx.dry_run else "FLUX.1-dev architecture, random weights"
        row["planner"] = planner_or_note(row, sl, ctx.vram_gib)
    return row


def previous_results(path: Path) -> dict:
    """The result file this run will replace ({} if none): its rows serve --only and the expected times."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---- output ----------------------------------------------------------------------------------------------------
def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def goal_note(row: dict) -> str:
    """A goal row's card and whether what was measured fits it ('' for the other rows)."""
    goal = row.get("goal")
    if not goal:
        return ""
    if "plan" not in goal:
        return f"{goal['vram_gib']:g} GiB goal: no plan ({goal.get('error', '')})"
    fit = {True: "fits", False: "does NOT fit", None: "fit not measured"}[goal["fits"]]
    card = f" ({goal['measured_card_gib']:.2f} GiB)" if goal["measured_card_gib"] is not None else ""
    return f"{goal['vram_gib']:g} GiB goal: {fit}{card}; plan {goal['plan']}"


def progress_line(row: dict, elapsed: float) -> str:
    m, p = row.get("measured") or {}, row.get("planner") or {}
    parts = [f"[{elapsed:5.0f} s] {row['slice']:21} {row['status']:9}"]
    if row.get("wall_s") is not None:
        parts.append(f"{row['wall_s']:6.1f} s")
    if "passed" in m:
        parts.append(f"{m['passed']} passed, {m['failed']} failed, {m['skipped']} skipped")
    if (m.get("goal") or {}).get("ratio"):
        parts.append(f"fused NF4 fwd+bwd {m['goal']['ratio']:.3f}x floor")
    if p:
        peaks = f"{fmt(m.get('peak_allocated_gib'))}/{fmt(m.get('peak_reserved_gib'))}"
        parts.append(
            f"peak {peaks} GiB, planner {p['allocated_gib']:.2f}/{p['reserved_gib']:.2f}, "
            f"{fmt(m.get('seconds_per_step'), '.3f')} s/step"
        )
    if row.get("goal"):
        parts.append(goal_note(row))
    if row.get("reason"):
        parts.append(f"({row['reason']})")
    return "  ".join(parts)


def table(rows: list[dict]) -> str:
    head = (
        f"{'slice':21} {'status':9} {'wall s':>7} {'s/step':>7} {'alloc':>6} {'resv':>6} {'est alloc':>9} "
        f"{'est resv':>8} {'est card':>8} {'est/meas':>8}  note"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        m, p, q = r.get("measured") or {}, r.get("planner") or {}, r.get("ratio_estimate_to_measured") or {}
        lines.append(
            f"{r['slice']:21} {r['status']:9} {fmt(r.get('wall_s'), '.1f'):>7} "
            f"{fmt(m.get('seconds_per_step'), '.3f'):>7} {fmt(m.get('peak_allocated_gib')):>6} "
            f"{fmt(m.get('peak_reserved_gib')):>6} {fmt(p.get('allocated_gib')):>9} "
            f"{fmt(p.get('reserved_gib')):>8} {fmt(p.get('total_gib')):>8} "
            f"{fmt(q.get('allocated'), '.3f'):>8}  {(r.get('reason') or goal_note(r))[:70]}"
        )
    return "\n".join(lines) + "\n(GiB. est: the planner's allocated, + allocator reserve, + CUDA context)"


# ---- main -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, help="seconds for the whole run (default 480; 240 with --dry-run)")
    p.add_argument(
        "--out",
        type=Path,
        help="folder for gpu_check_<device>.json (default benchmarks/results; --dry-run: a temporary folder)",
    )
    p.add_argument("--only", help=f"comma-separated slices to run: {', '.join(s.name for s in slices())}")
    p.add_argument("--steps", type=int, default=STEPS, help="denoising / timed optimizer steps per heavy slice")
    p.add_argument("--dry-run", action="store_true", help="the same slices on the tiny model on the CPU")
    p.add_argument("--commit", help="git commit to record where git cannot tell (a copy of the checkout without .git)")
    args = p.parse_args(argv)
    names = [s.name for s in slices()]
    args.selected = args.only.split(",") if args.only else names
    if unknown := [n for n in args.selected if n not in names]:
        p.error(f"unknown slice {unknown[0]!r}: use {', '.join(names)}")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.budget_s is None:
        args.budget_s = 240.0 if args.dry_run else 480.0
    return args


class Terminated(BaseException):
    """SIGTERM/SIGHUP: raised in the main thread so the running child is killed and the JSON written (a
    BaseException, so the per-slice `except Exception` does not swallow it)."""


def _terminate(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def run_slice(sl: Slice, row: dict, ctx: Context, budget: Budget, known: dict[str, float]) -> None:
    """Run (or skip) one slice and fill its row in place."""
    if ctx.dry_run and sl.task in DRY_RUN_SKIPS:
        row.update(status="skipped", reason=DRY_RUN_SKIPS[sl.task])
        return
    expected = expected_cost(sl, ctx.dry_run, known)
    row["expected_s"] = round(expected * budget.scale(), 1)
    timeout, budget_bound, reason = decide(budget, expected)
    if timeout is None:
        row.update(status="skipped", reason=reason)
        return
    row.update(status="running", timeout_s=round(timeout, 1))
    start = time.monotonic()
    try:
        fields, res = RUNNERS[sl.task](ctx, sl, timeout)
    except Exception as e:  # noqa: BLE001 -- e.g. a child's result in an unexpected shape: the next slices still run
        fields, res = {"status": "failed", "reason": f"gpu_check: {type(e).__name__}: {e}"}, None
    row.update(fields)
    row["wall_s"] = round(time.monotonic() - start, 1)
    row["output_tail"] = res.tail() if res else None
    if res and res.rc is None:
        row["status"] = "timed_out" if budget_bound else "failed"
        row["reason"] = f"killed at {timeout:.0f} s: " + (
            "the budget ran out" if budget_bound else f"over 4x its expected {expected:.0f} s, hung?"
        )
    if row["status"] == "running":
        row["status"] = "passed"
    budget.record(expected, row["wall_s"])
    if row.get("planner") and row.get("measured"):
        row["ratio_estimate_to_measured"] = ratios(row["planner"], row["measured"])
    if row.get("goal", {}).get("plan") and row.get("measured"):
        row["goal"] = goals().measured_fit(row["goal"], row["measured"])


def output_path(args: argparse.Namespace, device: str) -> Path:
    """benchmarks/results/gpu_check_<device>.json, or that name in --out (the dry run: a temporary folder, so it
    never leaves a CPU file among the GPU results)."""
    from provenance import result_path

    default = result_path("gpu_check", device)
    out_dir = args.out or (Path(tempfile.gettempdir()) / "urae_gpu_check" if args.dry_run else None)
    return out_dir / default.name if out_dir else default


def initial_rows(ctx: Context, selected: list[str], previous: dict) -> list[dict]:
    """Every slice, pending with its planner estimate; one not selected by --only keeps its previous result (beside
    today's estimate)."""
    kept = {r["slice"]: r for r in previous.get("rows", []) if r.get("status") in ("passed", "failed")}
    rows = []
    for sl in slices():
        row = base_row(sl, ctx)
        if sl.name in selected:
            pass
        elif sl.name in kept:
            origin = kept[sl.name].get("kept_from") or {k: previous.get(k) for k in ("command", "git_commit")}
            row.update(kept[sl.name], kept_from=origin, planner=row["planner"])
            if row["planner"] and row.get("measured"):
                row["ratio_estimate_to_measured"] = ratios(row["planner"], row["measured"])
        else:
            row.update(status="skipped", reason="not selected by --only")
        rows.append(row)
    return rows


def known_costs(previous: dict) -> dict[str, float]:
    """Wall seconds of the slices that passed in this device's previous result file."""
    rows = previous.get("rows", [])
    return {r["slice"]: r["wall_s"] for r in rows if r.get("status") == "passed" and r.get("wall_s")}


def run_all(report: dict, path: Path, ctx: Context, budget: Budget, known: dict[str, float]) -> None:
    """The pending slices in order, the JSON rewritten before and after each; SIGTERM/SIGHUP/Ctrl-C end the run
    with what is done written."""
    rows = report["rows"]

    def save() -> None:
        report["summary"] = summary(rows, budget.start)
        write_json(path, report)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    try:
        for sl, row in zip(slices(), rows, strict=True):
            if row["status"] != "pending":
                continue
            row["status"] = "running"
            save()
            run_slice(sl, row, ctx, budget, known)
            print(progress_line(row, time.monotonic() - budget.start), flush=True)
            save()
        report["complete"] = True
    except (Terminated, KeyboardInterrupt) as e:
        for row in rows:
            if row["status"] in ("running", "pending"):
                row.update(status="skipped", reason=f"gpu_check stopped by {type(e).__name__} {e}".strip())
    finally:
        save()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tiny-generate"]:  # internal: the --dry-run child for one generate slice
        add_checkout_finder()
        tiny_generate_main(argv[1:])
        return 0
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    from provenance import provenance

    with tempfile.TemporaryDirectory(prefix="urae_gpu_check_") as work:
        map_checkout_everywhere(Path(work) / "site")
        device, vram_gib = device_info(args.dry_run)
        path = output_path(args, device)
        previous = previous_results(path)
        prov = provenance()
        report = {
            "device": device,
            "device_memory_gib": round(vram_gib, 2) if vram_gib else None,
            "dry_run": args.dry_run,
            "versions": versions(prov),
            "command": prov["command"],
            "git_commit": prov["git_commit"] or args.commit,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "budget_s": args.budget_s,
            "steps": args.steps,
            "complete": False,
            "rows": [],
        }
        ctx = Context(args.dry_run, Path(work), vram_gib, args.steps)
        if args.dry_run:
            warm_imports()
        report["rows"] = initial_rows(ctx, args.selected, previous)
        print(f"{device} | budget {args.budget_s:.0f} s | {path}", flush=True)
        run_all(report, path, ctx, budget, known_costs(previous))
    print(table(report["rows"]))
    counts = report["summary"]["counts"]
    print(
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
        f"{counts['timed_out']} timed out in {report['summary']['wall_s']:.0f} s; wrote {path}"
    )
    return 1 if counts["failed"] else 0 if report["complete"] else 2  # 2: stopped by a signal before the end


if __name__ == "__main__":
    sys.exit(main())
