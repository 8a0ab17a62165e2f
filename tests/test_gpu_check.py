"""benchmarks/gpu_check.py stays runnable without a GPU: its dry run on the tiny model (the package installed, as
on the device) writes the report a GPU session relies on, its budget and pytest parsing behave, and a slice ends with
every process it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
HEAVY = [
    f"{task}-{size}-{quant}" for task in ("generate", "train") for size in (2048, 4096) for quant in ("nf4", "fp8")
]
GOALS = {  # slice -> (urae-lite plan arguments, card GiB)
    "goal-generate-4096-8g": (["--resolution", "4096"], 8),
    "goal-train-2048-8g": (["--task", "train", "--resolution", "2048"], 8),
    "goal-train-4096-12g": (["--task", "train", "--resolution", "4096"], 12),
}
# one slice of each kind (every runner and parser, no kernels) and the quick goal slices (block swap, token chunks,
# T5 NF4 and FP8 on the tiny model); the 4K goal training is the slow one
RAN = ["generate-2048-nf4", "train-2048-nf4", "goal-generate-4096-8g", "goal-train-2048-8g"]
# A slice's child that starts a grandchild, writes both pids, then exits or hangs (argv: PID_FILE exit|hang).
SPAWNER = """import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
if sys.argv[2] == "hang":
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def bench_path():
    """benchmarks/ importable as the scripts import each other (gpu_check, gpu_slices, gpu_children, ...)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        yield
    finally:
        sys.path.remove(str(SCRIPT.parent))


@pytest.fixture(scope="module")
def gpu_check(bench_path):
    import gpu_check

    return gpu_check


@pytest.fixture(scope="module")
def gpu_slices(bench_path):
    import gpu_slices

    return gpu_slices


@pytest.fixture(scope="module")
def gpu_children(bench_path):
    import gpu_children

    return gpu_children


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run (urae_lite installed, as on the device), four slices run; its exit, output folder and report."""
    out = tmp_path_factory.mktemp("gpu_check")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--only", ",".join(RAN)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    files = sorted(out.glob("gpu_check_*.json"))
    report = json.loads(files[0].read_text()) if len(files) == 1 else None
    return result, files, report


def test_dry_run_exits_0_and_writes_one_report(dry_run):
    result, files, report = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(files) == 1 and report is not None
    assert not list(files[0].parent.glob("*.tmp"))  # written atomically
    assert "generate-2048-nf4" in result.stdout and "wrote" in result.stdout


def test_report_records_device_versions_command_and_commit(dry_run):
    _, _, report = dry_run
    assert report["device"] and report["dry_run"] is True and report["complete"] is True
    assert report["versions"]["torch"] and "diffusers" in report["versions"]
    assert "gpu_check.py" in report["command"] and "--dry-run" in report["command"]
    assert "git_commit" in report


def test_every_heavy_row_has_the_planner_estimate_and_it_grows_with_resolution(dry_run):
    _, _, report = dry_run
    rows = {r["slice"]: r for r in report["rows"]}
    assert set(HEAVY) <= set(rows) and {"kernel-tests", "kernel-bench"} <= set(rows)
    for name in HEAVY:
        p = rows[name]["planner"]
        assert 0 < p["allocated_gib"] < p["reserved_gib"] < p["total_gib"], name
        assert p["phases"] and p["peak_phase"] in p["phases"]
    for task in ("generate", "train"):
        for quant in ("nf4", "fp8"):
            small, large = rows[f"{task}-2048-{quant}"]["planner"], rows[f"{task}-4096-{quant}"]["planner"]
            assert large["allocated_gib"] > small["allocated_gib"]


def test_selected_slices_ran_and_the_others_say_why_not(dry_run):
    _, _, report = dry_run
    summary = report["summary"]
    assert sorted(summary["passed"]) == sorted(RAN) and summary["failed"] == []
    for row in report["rows"]:
        if row["slice"] in RAN:
            assert row["status"] == "passed" and row["wall_s"] > 0 and row["command"]
            assert row["measured"]["peak_allocated_gib"] is None  # no CUDA: no counters
            assert row["measured"]["seconds_per_step"] > 0
        else:
            assert row["status"] == "skipped" and row["reason"]


def cli_pick(args: list[str], vram: float, capsys) -> dict:
    """The configuration `urae-lite plan ARGS --vram VRAM --ram 24 --json` lists first."""
    from urae_lite.cli import main

    capsys.readouterr()
    assert main(["plan", *args, "--vram", str(vram), "--ram", "24", "--json"]) in (0, None)
    return json.loads(capsys.readouterr().out)["fitting"][0]["config"]


def test_goal_slices_come_last_and_run_what_urae_lite_plan_picks(gpu_slices, tmp_path, capsys):
    from urae_lite.memory import searched

    names = [s.name for s in gpu_slices.slices()]
    assert names[-len(GOALS) :] == list(GOALS) and names[: -len(GOALS)] == [
        "kernel-tests",
        "kernel-bench",
        *(n for n in names if n in HEAVY),
    ]
    ctx = gpu_slices.Context(dry_run=False, work=tmp_path, vram_gib=None)
    for sl in gpu_slices.slices()[-len(GOALS) :]:
        args, vram = GOALS[sl.name]
        want = {k: v for k, v in cli_pick(args, vram, capsys).items() if k in searched(sl.task)}
        assert sl.vram_gib == vram and want
        row = gpu_slices.base_row(sl, ctx)
        assert row["goal"]["config"] == want and row["goal"]["vram_gib"] == vram and row["quant"] == want["quant"]
        assert 0 < row["goal"]["planned_card_gib"] <= vram
        cfg = gpu_slices.plan_config(sl)  # the estimate beside the measurement: the same memory options
        assert {k: getattr(cfg.memory, k) for k in want} == want
        assert row["planner"]["config"] == cfg.summary() and row["planner"]["total_gib"] <= vram


def test_goal_options_parse_in_the_gpu_scripts_as_picked(gpu_slices):
    """The command lines a GPU session runs: generate.py / train.py read back the pick's every memory option."""
    import generate
    import gpu_goals
    import train

    from urae_lite.train.config import load_recipe

    for sl in gpu_slices.slices()[-len(GOALS) :]:
        cfg = sl.goal_config()
        picked = gpu_goals.memory_options(cfg)
        if sl.task == "generate":
            args = generate.parse_args(["--quants", cfg.memory.quant, *gpu_goals.generate_args(cfg)])
            got = {"quant": args.quants[0], **{k: getattr(args.memory, k) for k in picked if k != "quant"}}
        else:
            args = train.parse_args(["--one", gpu_slices.train_config(sl), *gpu_goals.train_args(cfg)])
            recipe = load_recipe(REPO / "recipes" / train.CONFIGS[args.one][0], args.overrides, require_paths=False)
            got = {**{k: getattr(recipe.memory, k) for k in picked}, "checkpointing": args.modes}
        assert got == picked, sl.name


def test_goal_fit_is_the_reserved_peak_plus_what_lies_outside_the_allocator(bench_path):
    import gpu_goals

    goal = {"vram_gib": 8.0, "plan": "...", "measured_card_gib": None, "fits": None}
    assert gpu_goals.measured_fit(goal, {"peak_reserved_gib": 7.2, "outside_allocator_gib": 0.7})["fits"] is True
    over = gpu_goals.measured_fit(goal, {"peak_reserved_gib": 7.5, "outside_allocator_gib": 0.7})
    assert over["fits"] is False and over["measured_card_gib"] == pytest.approx(8.2)
    assert gpu_goals.measured_fit(goal, {"peak_reserved_gib": None, "outside_allocator_gib": None})["fits"] is None


def test_dry_run_runs_the_goal_plans_on_the_tiny_model_and_says_what_it_changed(dry_run):
    _, _, report = dry_run
    rows = {r["slice"]: r for r in report["rows"]}
    for name in GOALS:
        goal = rows[name]["goal"]
        assert goal["plan"] and goal["config"]["quant"] == rows[name]["quant"]
    for name in (n for n in RAN if n in GOALS):
        row, pick = rows[name], rows[name]["goal"]["config"]
        m, changes = row["measured"], row["dry_run_changes"]
        assert row["goal"]["fits"] is None  # no CUDA, nothing to compare with the card
        assert m["quant"] == pick["quant"] and m["token_chunks"] == pick["token_chunks"]
        assert 0 < m["blocks_to_swap"] <= 4 and "blocks_to_swap" in changes  # the tiny model has 4 blocks
        run_as_picked = ("t5_quant",) if row["task"] == "generate" else ("checkpointing", "checkpoint_every")
        assert {k: m[k] for k in run_as_picked} == {k: pick[k] for k in run_as_picked}
        assert row["planner"]["config"].count(f"{pick['blocks_to_swap']} blocks swapped") == 1


def test_budget_skips_what_does_not_fit_and_bounds_the_timeout(gpu_check):
    budget = gpu_check.Budget(total_s=100.0)
    timeout, _, reason = gpu_check.decide(budget, expected_s=500.0)
    assert timeout is None and "budget" in reason
    timeout, budget_bound, reason = gpu_check.decide(budget, expected_s=10.0)
    assert reason is None and 0 < timeout <= budget.total_s - gpu_check.MARGIN_S and budget_bound
    budget.record(expected_s=10.0, wall_s=100.0)  # this machine is slower than expected ...
    assert budget.scale() == 2.0  # ... by a bounded factor


def test_a_slice_that_breaks_gpu_check_fails_alone(gpu_check, gpu_slices, monkeypatch, tmp_path):
    def broken(ctx, sl, timeout_s):
        raise KeyError("rows")

    monkeypatch.setitem(gpu_slices.RUNNERS, "train", broken)
    sl = next(s for s in gpu_slices.slices() if s.task == "train")
    row = {"slice": sl.name, "status": "pending", "planner": None}
    ctx = gpu_slices.Context(dry_run=True, work=tmp_path, vram_gib=None)
    gpu_check.run_slice(sl, row, ctx, gpu_check.Budget(total_s=600.0), known={})
    assert row["status"] == "failed" and "KeyError" in row["reason"]


def test_pytest_summary_counts(gpu_slices):
    counts = gpu_slices.pytest_counts("....\n3 passed, 1 failed, 2 skipped, 1 error, 5 deselected in 4.50s\n")
    assert counts == {"passed": 3, "failed": 1, "errors": 1, "skipped": 2, "deselected": 5}


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its new parent to reap it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
@pytest.mark.parametrize("ending", ["hang", "exit"])
@pytest.mark.parametrize("fork", [False, True], ids=["fresh", "forked"])
def test_a_slice_ends_with_every_process_it_started(gpu_children, tmp_path, fork, ending):
    """A child killed at its timeout, or one that exits and leaves a worker behind (a compile worker, say): its
    whole process group goes, the grandchild with it, on both paths (a fresh interpreter, and the dry run's fork)."""
    script, pids = tmp_path / "spawner.py", tmp_path / "pids"
    script.write_text(SPAWNER)
    timeout_s = 6.0
    start = time.monotonic()
    res = gpu_children.run_child(tmp_path, str(script), [str(pids), ending], dict(os.environ), timeout_s, fork=fork)
    assert pids.is_file(), res.tail()
    assert (res.rc is None) if ending == "hang" else (res.rc == 0), res.tail()
    assert time.monotonic() - start < timeout_s + 30
    child, grandchild = map(int, pids.read_text().split())
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
    while (running(child) or running(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child) and not running(grandchild)
