"""Ready memory profiles for 8, 12, 16 and 24 GiB cards in the shipped presets and recipes, and the memory status page
(urae_lite/plan/status.py).

A profile is what `--vram N` picks for the preset's or recipe's own job on an N GiB card in a desktop with 24 GiB of
host memory for offloaded weights and checkpoints: the planner's fastest plan that fits. The profiles are written
into the YAML files (`profiles:` at the end) by

    python -m urae_lite.plan.profiles          # rewrite the profiles: sections and the memory status page
    python -m urae_lite.plan.profiles --check  # exit 1 when a shipped profile or the page differs from the planner

The same command writes docs/memory-status.md (the planner's peaks for the README's jobs and the consumer-card goals,
and the summary of the fake-tensor measurement in benchmarks/results/memory_fake.json against the current planner)
and the short summary between the `memory-status` markers in README.md. tests/test_plan_profiles.py checks that
every shipped profile is still the planner's pick and that both texts are what this module writes now, so none of
them can go stale when the planner changes; tests/test_plan_measured.py measures the goals and every profile.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import PROFILES_KEY, read_yaml
from ..memory import searched
from ..presets import RECIPES, load_preset, preset_memory
from .constants import HOST_RAM_GIB
from .job import PlanConfig
from .recipe import recipe_file_job
from .search import PlanResult, best_config

CARDS_GIB = (8, 12, 16, 24)
GENERATE_PRESETS = (
    "generate_dev_2k.yaml",
    "generate_dev_4k.yaml",
    "generate_schnell_2k.yaml",
    "generate_schnell_4k.yaml",
)
TRAIN_RECIPES = ("train_2k_lora.yaml", "train_4k_minor.yaml")


@dataclass(frozen=True)
class Job:
    """A shipped preset or recipe as the planner sees it: the job it runs, its memory settings the search may change."""

    file: Path
    config: PlanConfig

    @property
    def task(self) -> str:
        return self.config.task

    def plan(self, vram_gib: float) -> PlanResult:
        return best_config(self.config, vram_gib, HOST_RAM_GIB)


def shipped_jobs() -> list[Job]:
    """Every preset and recipe that ships with profiles."""
    jobs = []
    for name in GENERATE_PRESETS:
        variant = "schnell" if "schnell" in name else "dev"
        s = load_preset(RECIPES / name, variant)
        job = PlanConfig(
            task="generate",
            width=s.width,
            height=s.height,
            variant=variant,
            steps=s.steps,
            memory=preset_memory(RECIPES / name, variant),
        )
        jobs.append(Job(RECIPES / name, job))
    for name in TRAIN_RECIPES:
        jobs.append(Job(RECIPES / name, recipe_file_job(RECIPES / name)))
    return jobs


def profile_settings(task: str, pick: PlanConfig) -> dict:
    """The searched memory settings of a plan, by name (a preset's and a recipe's `profiles:` alike)."""
    return {name: getattr(pick.memory, name) for name in searched(task)}


def card_plans(job: Job) -> dict[int, PlanResult]:
    """Card GiB -> the planner's search for the job on that card: one search each, shared by the profile settings
    and the peaks `render` comments them with."""
    return {card: job.plan(card) for card in CARDS_GIB}


def computed_profiles(job: Job, plans: dict[int, PlanResult] | None = None) -> dict[int, dict | str]:
    """Card GiB -> the settings the planner picks, or the one-line reason nothing fits (`plans`: card_plans(job))."""
    plans = card_plans(job) if plans is None else plans
    return {
        card: profile_settings(job.task, result.best.config) if result.best else result.impossible()
        for card, result in plans.items()
    }


def shipped_profiles(job: Job) -> dict[int, dict]:
    from ..config import profiles

    return profiles(read_yaml(job.file, "profiles"), str(job.file))


def render(job: Job, plans: dict[int, PlanResult]) -> str:
    """The `profiles:` section in YAML for `plans` (card_plans(job)), with the planner's peak for each card as a
    comment."""
    lines = [
        f"{PROFILES_KEY}:  # --vram N: the planner's fastest plan for N GiB with {HOST_RAM_GIB} GiB of host "
        f"memory (python -m urae_lite.plan.profiles)"
    ]
    for card, settings in computed_profiles(job, plans).items():
        if isinstance(settings, str):
            lines.append(f"  # {card}: none fits: {settings}")
            continue
        best = plans[card].best
        body = ", ".join(f"{k}: {_yaml_value(v)}" for k, v in settings.items())
        lines.append(
            f"  {card}: {{{body}}}  # peak {best.peak / 2**30:.1f} GiB, host {best.estimate.host / 2**30:.1f} GiB"
        )
    return "\n".join(lines) + "\n"


def _yaml_value(value) -> str:
    return f'"{value}"' if value in ("on", "off") else str(value)  # YAML 1.1 would read on/off as booleans


def write(job: Job) -> None:
    """Replace the file's `profiles:` section (always the last one) with the planner's current picks."""
    from ..safetensors_io import atomic_write_text

    text = job.file.read_text()
    head = text.split(f"\n{PROFILES_KEY}:", 1)[0].rstrip("\n")
    atomic_write_text(job.file, f"{head}\n\n{render(job, card_plans(job))}")


def stale(job: Job) -> list[str]:
    """Cards whose shipped profile differs from the planner's pick (or is missing)."""
    shipped = {card: {k: str(v) for k, v in s.items()} for card, s in shipped_profiles(job).items()}
    problems = []
    for card, settings in computed_profiles(job).items():
        want = None if isinstance(settings, str) else {k: str(v) for k, v in settings.items()}
        if shipped.get(card) != want:
            problems.append(f"{job.file.name} {card} GiB: shipped {shipped.get(card)}, planner picks {want}")
    return problems


def main(argv: list[str] | None = None) -> int:
    from . import status

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check: exit 1 when a profile or the status page is stale")
    args = p.parse_args(argv)
    problems = []
    for job in shipped_jobs():
        if args.check:
            problems += stale(job)
        else:
            write(job)
            print(f"wrote profiles of {job.file.name}")
    if args.check:
        problems += status.stale_texts()
    else:
        status.write_texts()
        print(f"wrote {status.STATUS_PAGE.relative_to(status.ROOT)} and README.md's memory-status block")
    print("\n".join(problems) or ("profiles and memory status match the planner" if args.check else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
