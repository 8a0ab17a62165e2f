"""The shipped memory profiles (recipes' and presets' `profiles:`) and the consumer-card goals, from the planner."""

from __future__ import annotations

import json

import pytest

from urae_lite.cli import main
from urae_lite.plan import best_config
from urae_lite.plan.profiles import CARDS_GIB, HOST_RAM_GIB, shipped_jobs, shipped_profiles, stale

GiB = 2**30


@pytest.fixture(scope="module")
def jobs():
    return shipped_jobs()


def test_every_shipped_profile_is_the_planners_pick(jobs):
    """`python -m urae_lite.plan.profiles` wrote them; a planner change that moves a pick must rewrite them."""
    assert {job.file.name for job in jobs} >= {"train_2k_lora.yaml", "train_4k_minor.yaml", "generate_dev_4k.yaml"}
    problems = [p for job in jobs for p in stale(job)]
    assert problems == []


def test_profiles_fit_their_card_and_a_32gb_desktop(jobs):
    for job in jobs:
        for card in shipped_profiles(job):
            assert card in CARDS_GIB
            best = job.plan(card).best
            assert best.peak <= card * GiB and best.estimate.host <= HOST_RAM_GIB * GiB, (job.file.name, card)


def _plan_json(capsys, task: str, resolution: int, vram: float) -> dict:
    assert (
        main(
            [
                "plan",
                "--task",
                task,
                "--resolution",
                str(resolution),
                "--vram",
                str(vram),
                "--ram",
                str(HOST_RAM_GIB),
                "--json",
            ]
        )
        == 0
    )
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("task,resolution,vram", [("train", 2048, 8), ("train", 4096, 12), ("generate", 4096, 8)])
def test_consumer_card_goals(capsys, task, resolution, vram):
    """2K LoRA training and 4K generation with the rank-48 adapter in 8 GiB, 4K minor-component training in 12 GiB,
    with at most 24 GiB of host memory and at most 1.3x the time of the fastest plan that fits a 24 GiB card."""
    fitting = _plan_json(capsys, task, resolution, vram)["fitting"]
    best = fitting[0]
    assert best["peak_bytes"] <= vram * GiB and best["host_bytes"] <= HOST_RAM_GIB * GiB
    fastest_24 = best_config(task, resolution, resolution, 24, HOST_RAM_GIB).best
    assert best["expected_seconds"] <= 1.3 * fastest_24.seconds
    if task == "train":  # the recipe of the size: the 2K LoRA, the 4K minor-component adapter (rank 16)
        assert best["config"]["adapter"] == ("minor" if resolution == 4096 else "lora")
    if task == "generate":
        assert best["config"]["rank"] is None and fastest_24.config.adapter_rank == 48  # 2K + converted 4K adapter
