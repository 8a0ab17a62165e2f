"""The shipped memory profiles (recipes' and presets' `profiles:`), the memory status texts and the consumer-card
goals' choices. Whether the goal plans and the profiles fit their cards is measured, not asked of the planner:
tests/test_plan_measured.py."""

from __future__ import annotations

import json

import pytest
from plan_utils import best

from urae_lite.cli import main
from urae_lite.plan import estimate
from urae_lite.plan.profiles import HOST_RAM_GIB, shipped_jobs, stale
from urae_lite.plan.status import BAND, GOALS, STATUS_JOBS, fake_rows, stale_texts, status

REGENERATE = "python -m urae_lite.plan.profiles"


@pytest.fixture(scope="module")
def jobs():
    return shipped_jobs()


def test_every_shipped_profile_is_the_planners_pick(jobs):
    """`python -m urae_lite.plan.profiles` wrote them; a planner change that moves a pick must rewrite them."""
    assert {job.file.name for job in jobs} >= {"train_2k_lora.yaml", "train_4k_minor.yaml", "generate_dev_4k.yaml"}
    problems = [p for job in jobs for p in stale(job)]
    assert problems == [], f"run `{REGENERATE}`"


@pytest.fixture(scope="module")
def memory_status():
    return status()


def test_memory_status_page_and_readme_summary_are_current(memory_status):
    """docs/memory-status.md and README.md's memory-status block are what the planner and the committed fake-tensor
    measurement (benchmarks/results/memory_fake.json) say now: any planner change that moves a number fails here."""
    assert stale_texts(memory_status) == [], f"run `{REGENERATE}`"


def test_memory_status_reads_the_goal_rows_of_the_measurement(memory_status):
    """The summary's goal rows are the benchmark's rows of the three `--vram` picks, every phase of each (a
    benchmark whose goal rows went missing, or a pick the benchmark no longer measures, fails here)."""
    picks = {args: cfg for _, args, cfg, _ in memory_status.table}
    for _, args in GOALS:
        phases = [r.phase for r in memory_status.matching(picks[args])]
        assert phases == list(estimate(picks[args]).phases), (
            f"benchmarks/results/memory_fake.json has {phases or 'no rows'} for `urae-lite plan {args}`'s pick "
            f"({picks[args].summary()}): rerun `python benchmarks/memory.py --fake` (it measures the current picks), "
            f"then `{REGENERATE}`"
        )
    assert len({a for _, a in STATUS_JOBS}) == len(STATUS_JOBS)


def test_committed_fake_measurement_is_within_the_band_of_the_current_planner():
    """Every row of benchmarks/results/memory_fake.json (77 phases measured at full size), read back as the
    configuration it measured, is within ±5% of what the planner says now: a planner change that moves away from
    the measurement fails here without re-measuring. (Rows whose stored planner bytes differ from the current
    planner's are listed as stale on docs/memory-status.md.)"""
    header, rows = fake_rows()
    assert header["command"].startswith("python benchmarks/memory.py --fake") and len(rows) > 50
    for r in rows:
        assert r.phase in estimate(r.config).phases, (r.config.summary(), r.phase)
    outside = [(r.config.summary(), r.phase, round(r.ratio, 3)) for r in rows if abs(r.ratio - 1) > BAND]
    assert outside == []


def _plan_json(capsys, task: str, resolution: int, vram: float) -> dict:
    argv = ["plan", "--task", task, "--resolution", str(resolution), "--vram", str(vram), "--ram", str(HOST_RAM_GIB)]
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("task,resolution,vram", [("train", 2048, 8), ("train", 4096, 12), ("generate", 4096, 8)])
def test_consumer_card_goals_pick_the_recipes_job_fast_enough(capsys, task, resolution, vram):
    """The goal commands plan the recipe of the size (the 2K LoRA, the 4K minor-component adapter; generation with
    the 2K + converted 4K adapter, rank 48), and their pick is at most 1.3x the time of the fastest plan for a
    24 GiB card by the planner's speed model: a ranking model, not a measurement (no GPU has timed either)."""
    pick = _plan_json(capsys, task, resolution, vram)["fitting"][0]
    fastest_24 = best(task, resolution, resolution, 24, HOST_RAM_GIB).best
    assert pick["expected_seconds"] <= 1.3 * fastest_24.seconds
    if task == "train":
        assert pick["config"]["adapter"] == ("minor" if resolution == 4096 else "lora")
        assert pick["config"]["rank"] == 16
    if task == "generate":
        assert pick["config"]["rank"] is None and fastest_24.config.adapter_rank == 48
