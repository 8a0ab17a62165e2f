"""Ready memory profiles for 8, 12, 16 and 24 GiB cards in the shipped presets and recipes, and the memory status page.

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
import contextlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import PROFILES_KEY, read_yaml
from ..presets import RECIPES, load_preset
from .estimate import PlanConfig, estimate
from .recipe import plan_fields, recipe_overrides, recipe_plan_fields, shipped_recipe
from .search import SEARCHED, PlanResult, best_config, generate_options, train_overrides

CARDS_GIB = (8, 12, 16, 24)
HOST_RAM_GIB = 24  # a 32 GB desktop: what is left for offloaded weights, swapped blocks and checkpoints
GENERATE_PRESETS = (
    "generate_dev_2k.yaml",
    "generate_dev_4k.yaml",
    "generate_schnell_2k.yaml",
    "generate_schnell_4k.yaml",
)
TRAIN_RECIPES = ("train_2k_lora.yaml", "train_4k_minor.yaml")


@dataclass(frozen=True)
class Job:
    """A shipped preset or recipe as the planner sees it: the task, the size and the options it fixes."""

    file: Path
    task: str
    width: int
    height: int
    fixed: dict

    def plan(self, vram_gib: float) -> PlanResult:
        return best_config(self.task, self.width, self.height, vram_gib, HOST_RAM_GIB, **self.fixed)


def shipped_jobs() -> list[Job]:
    """Every preset and recipe that ships with profiles."""
    from ..train.config import load_recipe

    jobs = []
    for name in GENERATE_PRESETS:
        variant = "schnell" if "schnell" in name else "dev"
        s = load_preset(RECIPES / name, variant)
        jobs.append(
            Job(
                RECIPES / name,
                "generate",
                s.width,
                s.height,
                {"variant": variant, "steps": s.steps, "vae_tiling": s.vae_tiling},
            )
        )
    for name in TRAIN_RECIPES:
        fields = plan_fields(load_recipe(RECIPES / name, require_paths=False))
        width, height = fields.pop("width"), fields.pop("height")
        fixed = {k: v for k, v in fields.items() if k not in SEARCHED["train"]}
        jobs.append(Job(RECIPES / name, "train", width, height, fixed))
    return jobs


def profile_settings(task: str, pick: PlanConfig) -> dict:
    """The searched options of a plan as the preset (generate option names) or recipe (dotted keys) spells them."""
    fields = {name: getattr(pick, name) for name in SEARCHED[task]}
    if task == "generate":
        return fields
    return dict(override.split("=", 1) for override in recipe_overrides(fields))


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


# ---- the memory status page ---------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]  # the repository (the page and the README are not installed)
STATUS_PAGE = ROOT / "docs" / "memory-status.md"
README = ROOT / "README.md"
FAKE_RESULTS = ROOT / "benchmarks" / "results" / "memory_fake.json"
BEGIN = "<!-- memory-status: written by `python -m urae_lite.plan.profiles`; edit urae_lite/plan/profiles.py -->"
END = "<!-- /memory-status -->"
BAND = 0.05  # the fake-tensor measurement's goal: every phase within ±5% of the planner's allocated bytes
GOALS = (  # the consumer-card goals: (job, `urae-lite plan` arguments)
    ("4K generation in 8 GiB", "--task generate --resolution 4096 --vram 8"),
    ("2K LoRA training in 8 GiB", "--task train --resolution 2048 --vram 8"),
    ("4K minor-component training in 12 GiB", "--task train --resolution 4096 --vram 12"),
)
STATUS_JOBS = (  # the page's table: (job, `urae-lite plan` arguments); --vram rows get `--ram 24`
    ("generate 2048², 2K adapter (rank 16)", "--task generate --resolution 2048 --t5-quant nf4"),
    ("generate 4096², 2K + 4K adapter (rank 48)", "--task generate --resolution 4096 --t5-quant nf4"),
    ("generate 4096², 2K + 4K adapter (rank 48)", GOALS[0][1]),
    ("train 2048², LoRA r16 (the 2K recipe)", "--task train --resolution 2048"),
    ("train 2048², LoRA r16 (the 2K recipe)", GOALS[1][1]),
    ("train 4096², minor r16 (the 4K recipe)", "--task train --resolution 4096"),
    ("train 4096², minor r16 (the 4K recipe)", GOALS[2][1]),
    ("train 4096², minor r16 (the 4K recipe)", "--task train --resolution 4096 --vram 8"),
)


def plan_arguments(arguments: str) -> list[str]:
    """`urae-lite plan` arguments as the page shows them: a `--vram` search gets the desktop's host memory."""
    return [*arguments.split(), *(["--ram", str(HOST_RAM_GIB)] if "--vram" in arguments else [])]


def plan_command(arguments: str) -> tuple[PlanConfig, int | None]:
    """The configuration `urae-lite plan ARGUMENTS --json` plans (with `--vram`: its pick) and the card, if any."""
    from ..cli import main

    argv = plan_arguments(arguments)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if main(["plan", *argv, "--json"]) != 0:
            raise RuntimeError(f"urae-lite plan {' '.join(argv)} failed")
    result = json.loads(out.getvalue())
    card = int(argv[argv.index("--vram") + 1]) if "--vram" in argv else None
    return PlanConfig(**(result["fitting"][0] if card else result)["config"]), card


def resolved(cfg: PlanConfig, card: int | None) -> PlanConfig:
    """`cfg` with the adapter rank and the VAE tiling `auto` picks on `card` (None: a card the plan just fits)
    spelled out, so that equal plans compare equal."""
    cfg = cfg.replace(rank=cfg.adapter_rank)
    if cfg.task == "generate" and cfg.vae_tiling == "auto":
        tiled = estimate(cfg, card).allocated()[-1] == estimate(cfg.replace(vae_tiling="on")).allocated()[-1]
        cfg = cfg.replace(vae_tiling="on" if tiled else "off")
    return cfg


def fake_row_config(row: dict) -> PlanConfig:
    """The configuration a row of benchmarks/results/memory_fake.json measured (benchmarks/memory_fake.py): its
    `plan_config`, or for rows written before it was recorded, the preset / recipe options the row lists."""
    if "plan_config" in row:
        return PlanConfig(**row["plan_config"])
    o, size = row["options"], row["width"]
    base = {"width": size, "height": row["height"], "quant": row["quant"]}
    if row["task"] == "generate":
        memory = {k: o[k] for k in ("offload", "t5_quant", "blocks_to_swap", "token_chunks")}
        tiling = o["vae_tiling"].split(" -> ")[-1]
        return PlanConfig(task="generate", rank=o["adapter_rank"], vae_tiling=tiling, **base, **memory)
    fields = recipe_plan_fields(shipped_recipe(size))
    memory = {k: o[k] for k in ("checkpointing", "blocks_to_swap", "token_chunks", "checkpoint_every")}
    return PlanConfig(task="train", **{**fields, **base, **memory, "adapter": o["recipe"]})


@dataclass(frozen=True)
class FakeRow:
    """One measured phase of the fake-tensor benchmark beside the current planner."""

    config: PlanConfig
    phase: str
    measured: int
    planned: int  # the current planner's allocated bytes
    stored: int  # the planner's bytes when the row was written

    @property
    def ratio(self) -> float:
        return self.measured / self.planned


def fake_rows(path: Path = FAKE_RESULTS) -> tuple[dict, list[FakeRow]]:
    """(the file's header, its rows against the current planner)."""
    data = json.loads(path.read_text())
    rows = []
    for row in data["rows"]:
        cfg = fake_row_config(row)
        est = estimate(cfg)
        planned = dict(zip(est.phases, est.allocated()))
        rows.append(FakeRow(cfg, row["phase"], row["measured_bytes"], planned[row["phase"]], row["planner_bytes"]))
    return {k: v for k, v in data.items() if k != "rows"}, rows


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def settings_text(cfg: PlanConfig) -> str:
    """The plan's memory settings as the command line spells them."""
    if cfg.task == "generate":
        options = generate_options(cfg) + [f"--vae-tiling {cfg.vae_tiling}"]
        return " ".join(options)
    defaults = ("training.blocks_to_swap=0", "training.token_chunks=1", "training.checkpoint_every=1")
    return " ".join(o for o in train_overrides(cfg) if o not in defaults)


def _spread(rows: list[FakeRow]) -> str:
    lo, hi = min(r.ratio for r in rows), max(r.ratio for r in rows)
    return f"{lo:.3f}–{hi:.3f}×"


def _goal_summary(goals: list[FakeRow]) -> str:
    """How close the goal plans' rows are, or that the measurement has none (a pick it did not measure)."""
    if not goals:
        return "no row measures the goal plans the planner picks now (rerun the benchmark)"
    return (
        f"the {len(goals)} rows of the goal plans within {max(abs(r.ratio - 1) for r in goals):.1%} ({_spread(goals)})"
    )


@dataclass(frozen=True)
class Status:
    """What the page and the README's summary say, computed from the planner and the committed measurement."""

    table: list[tuple[str, str, PlanConfig, int | None]]  # job, arguments, resolved plan, card
    header: dict
    rows: list[FakeRow]

    def matching(self, cfg: PlanConfig) -> list[FakeRow]:
        return [r for r in self.rows if r.config == cfg]

    @property
    def goal_rows(self) -> list[FakeRow]:
        goals = {a for _, a in GOALS}
        return [r for _, a, cfg, _ in self.table if a in goals for r in self.matching(cfg)]

    @property
    def stale(self) -> list[FakeRow]:
        return [r for r in self.rows if r.planned != r.stored]


def status() -> Status:
    table = []
    for job, arguments in STATUS_JOBS:
        cfg, card = plan_command(arguments)
        table.append((job, arguments, resolved(cfg, card), card))
    header, rows = fake_rows()
    return Status(table, header, rows)


def render_page(st: Status) -> str:
    """docs/memory-status.md: the planner's table for the README's jobs and the fake-tensor measurement's summary."""
    lines = [
        "# Memory status: planner estimates and their fake-tensor check",
        "",
        BEGIN,
        "",
        _wrap(
            "Full-size FLUX.1-dev, from the planner as `urae-lite plan` computes it now (**estimates, not yet "
            f"measured on a GPU**). A `--vram` row is the planner's pick for that card with `--ram {HOST_RAM_GIB}` "
            "(a 32 GB desktop); the settings are spelled as `generate` and `train` take them. Peak: what the card "
            "must hold (allocated + allocator reserve + CUDA context). Fake tensors: measured / planner allocated "
            "bytes in the peak phase, from the benchmark below (— where it has no row)."
        ),
        "",
        "| job | `urae-lite plan` | settings | planner peak | phase | host memory | fake tensors |",
        "|---|---|---|---|---|---|---|",
    ]
    for job, arguments, cfg, _card in st.table:
        est = estimate(cfg)
        row = [r for r in st.matching(cfg) if r.phase == est.peak_phase]
        measured = f"{row[0].ratio:.3f}×" if row else "—"
        lines.append(
            f"| {job} | `{' '.join(plan_arguments(arguments))}` | `{settings_text(cfg)}` | {_gib(est.peak)} | "
            f"{est.peak_phase} | {_gib(est.host)} | {measured} |"
        )
    h, rows, goals = st.header, st.rows, st.goal_rows
    inside = [r for r in rows if abs(r.ratio - 1) <= BAND]
    lines += [
        "",
        "## Fake-tensor measurement",
        "",
        _wrap(
            "`python benchmarks/memory.py --fake` ([JSON](../benchmarks/results/memory_fake.json), "
            "[chart](../benchmarks/results/memory_fake.png)) ran the real pipeline, the kernels' custom ops and the "
            f"Trainer at full size on fake tensors at commit `{h.get('git_commit', '?')[:7]}` (torch "
            f"{h.get('torch', '?')}, {h.get('seconds', 0) / 60:.0f} min) and counted the live device bytes of every "
            f"phase. Against the current planner: **{len(inside)} of {len(rows)} rows within ±{BAND:.0%}** "
            f"(measured/planner {_spread(rows)}); {_goal_summary(goals)}."
        ),
        "",
    ]
    if st.stale:
        lines += [
            _wrap(
                f"**{len(st.stale)} rows were written by an older planner**: their stored planner bytes differ from "
                "the current planner's (the ratios above use the current planner). Rerun the benchmark to refresh "
                "them:"
            ),
            "",
        ]
        lines += [
            f"* {r.config.summary()}, {r.phase}: stored {_gib(r.stored)}, now {_gib(r.planned)}" for r in st.stale
        ]
    else:
        lines.append("Every row's stored planner bytes equal the current planner's.")
    outside = [r for r in rows if abs(r.ratio - 1) > BAND]
    if outside:
        lines += ["", "Outside the band:", ""]
        lines += [f"* {r.config.summary()}, {r.phase}: {r.ratio:.3f}×" for r in outside]
    lines += [
        "",
        _wrap(
            "In the test suite, tests/test_plan_measured.py runs the three goal plans and every shipped profile "
            "(`profiles:` of the presets and recipes) through the same harness with the same ±5% band, and checks "
            "that each fits its card with the planner's allocator reserve and CUDA context on top."
        ),
        "",
        END,
        "",
    ]
    return "\n".join(lines)


def render_summary(st: Status) -> str:
    """The README's short block: the goal picks and the measurement's summary."""
    plans = {a: cfg for _, a, cfg, _ in st.table}
    picks = ", ".join(
        f"{job} (peak {_gib(estimate(plans[a]).peak)}, host {_gib(estimate(plans[a]).host)})" for job, a in GOALS
    )
    rows = st.rows
    inside = sum(abs(r.ratio - 1) <= BAND for r in rows)
    stale = f"; {len(st.stale)} rows come from an older planner" if st.stale else ""
    text = (
        f"**Memory status** (full-size FLUX.1-dev; planner estimates, not yet measured on a GPU; the planner's table "
        f"and the details: [docs/memory-status.md](docs/memory-status.md)). The goals as `urae-lite plan --vram N "
        f"--ram {HOST_RAM_GIB}` picks them: {picks}. The fake-tensor measurement: {inside} of {len(rows)} rows "
        f"within ±{BAND:.0%} of the planner ({_spread(rows)}), {_goal_summary(st.goal_rows)}{stale}."
    )
    return f"{BEGIN}\n{_wrap(text)}\n{END}"


def _wrap(text: str) -> str:
    """A paragraph wrapped as the repository's Markdown is (at most 118 columns), never inside a `code span`."""
    import re
    import textwrap

    glued = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\0"), text)
    return textwrap.fill(glued, width=118, break_long_words=False, break_on_hyphens=False).replace("\0", " ")


def readme_with(summary: str, text: str) -> str:
    """`text` (README.md) with its memory-status block replaced by `summary`."""
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not (sep and sep2):
        raise ValueError(f"README.md has no {BEGIN} ... {END} block")
    return head + summary + tail


def stale_texts(st: Status | None = None) -> list[str]:
    """The generated texts (the page, README's block) that differ from what this module writes now."""
    st = status() if st is None else st
    problems = []
    if not STATUS_PAGE.is_file() or STATUS_PAGE.read_text() != render_page(st):
        problems.append(f"{STATUS_PAGE.relative_to(ROOT)} differs from the planner and the measurement")
    if README.read_text() != readme_with(render_summary(st), README.read_text()):
        problems.append("README.md's memory-status block differs from the planner and the measurement")
    return problems


def write_texts(st: Status | None = None) -> None:
    from ..safetensors_io import atomic_write_text

    st = status() if st is None else st
    atomic_write_text(STATUS_PAGE, render_page(st))
    atomic_write_text(README, readme_with(render_summary(st), README.read_text()))


def main(argv: list[str] | None = None) -> int:
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
        problems += stale_texts()
    else:
        write_texts()
        print(f"wrote {STATUS_PAGE.relative_to(ROOT)} and README.md's memory-status block")
    print("\n".join(problems) or ("profiles and memory status match the planner" if args.check else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
