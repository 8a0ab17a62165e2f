"""One command for a session that has a GPU: kernel tests, kernel timings, and generate / train at 2K and 4K on
full-size FLUX.1-dev (random weights, NF4 and FP8) with the memory planner's estimate beside every measured peak.

On the device machine (the image has torch, triton, transformers, peft, accelerate, safetensors, setuptools and pip;
diffusers, bitsandbytes, optimum-quanto and prodigyopt come from .whl/), with the checkout installed in place:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        export PYTHONPATH=/tmp/site && python3 -m pip install -q --no-deps --no-build-isolation -e . && \
        python3 benchmarks/gpu_check.py

Options: `--budget-s 480` (seconds for the whole run), `--only SLICE,...` (e.g. a second call for what the first one
skipped: `--only train-4096-nf4 --budget-s 540`; the other slices keep their results from the file), `--out DIR`,
`--commit SHA` (recorded when the copy on the device has no .git for provenance.py to read).
`python benchmarks/gpu_check.py --dry-run --out DIR` runs the same slices on the tiny model on the CPU (about
3 minutes on 2 cores; its children are forks of the parent, which has done the slow imports once).

This file is the scheduler: the budget, the children's timeouts, the JSON and the table. What each slice runs is in
benchmarks/gpu_slices.py, how a child process is run and ended in benchmarks/gpu_children.py. Slices, most important
first; each heavy one runs in a fresh process so peak counters and the allocator start empty: the compiled kernel
tests, `benchmarks/kernel_bench.py --quick`, then generate (model offload, 2 steps) and train (`checkpointing=cpu`,
1 warm-up + 2 steps): 2K NF4 generate, 2K NF4 train, 4K NF4 generate, the FP8 rows, 4K train, then the consumer-card
goals (benchmarks/gpu_goals.py), each run exactly as `urae-lite plan --vram N --ram 24` picks it at run time (quant,
offload, T5 quant, block swap, token chunks; checkpointing and its stride): `goal-generate-4096-8g`,
`goal-train-2048-8g`, `goal-train-4096-12g`. Their rows add `goal`: the card, the pick, the planner's card total, and
whether the measured reserved peak + the memory outside the allocator fits the card. A default run seldom reaches
them (they are last and slow: 52-56 blocks streamed per step, T5-XXL saved and reloaded for NF4): measure them with
`--only goal-generate-4096-8g,goal-train-2048-8g --budget-s 540`, then `--only goal-train-4096-12g --budget-s 580`.
The dry run plans them for the full-size model but runs them on the tiny one with its block share swapped and no
offload (`dry_run_changes` in the row).

A slice whose expected time does not fit what is left of the budget is skipped and recorded with the reason; each
child has a timeout inside the budget, and at its end (timeout or not) its whole process group is killed, so no
compile worker outlives its slice. Expected times come from this device's previous result file when there is one,
else from defaults, scaled by how the finished slices compared with theirs.

Every row records torch.cuda max_memory_allocated / max_memory_reserved, seconds per step and the planner's
estimate for the same configuration (`urae_lite.plan.estimate`: allocated, allocated + allocator reserve, and the
card total with the CUDA context) with the ratios estimate / measured. The JSON (device, versions, command, git
commit, rows, summary) goes to benchmarks/results/gpu_check_<device>.json or into `--out DIR`, rewritten atomically
after every slice so a killed run still leaves its results. Exit status 1 when a slice failed (not when one was
skipped), 2 when a signal stopped the run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpu_slices import DRY_RUN_SKIPS, RUNNERS, STEPS, Context, Slice, base_row, finish_row, ratios, slices

GiB = 2**30
EXTRA_LIBRARIES = ("peft", "accelerate", "safetensors", "optimum-quanto", "prodigyopt", "numpy")
MARGIN_S = 15.0  # kept back from the budget for the last JSON write and the table
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
    finish_row(row)


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
    args = parse_args(sys.argv[1:] if argv is None else argv)
    budget = Budget(args.budget_s)
    from provenance import provenance

    with tempfile.TemporaryDirectory(prefix="urae_gpu_check_") as work:
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
