"""The memory status page (docs/memory-status.md) and the README's summary of it, generated from the planner and the
committed fake-tensor measurement (benchmarks/results/memory_fake.json), so neither can go stale: tests check that
both are what this module writes now (`python -m urae_lite.plan.profiles` rewrites them)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..memory import searched
from .constants import HOST_RAM_GIB
from .estimate import estimate
from .job import PlanConfig
from .recipe import recipe_file_job, shipped_recipe

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
    return PlanConfig.from_dict((result["fitting"][0] if card else result)["config"]), card


def resolved(cfg: PlanConfig, card: int | None) -> PlanConfig:
    """`cfg` with the adapter rank and the VAE tiling `auto` picks on `card` (None: a card the plan just fits)
    spelled out, so that equal plans compare equal."""
    cfg = cfg.replace(rank=cfg.adapter_rank)
    if cfg.task == "generate" and cfg.memory.vae_tiling == "auto":
        tiled = estimate(cfg, card).allocated()[-1] == estimate(cfg.with_memory(vae_tiling="on")).allocated()[-1]
        cfg = cfg.with_memory(vae_tiling="on" if tiled else "off")
    return cfg


def fake_row_config(row: dict) -> PlanConfig:
    """The configuration a row of benchmarks/results/memory_fake.json measured (benchmarks/memory_fake.py): its
    `plan_config`, or for rows written before it was recorded, the preset / recipe options the row lists."""
    if "plan_config" in row:
        return PlanConfig.from_dict(row["plan_config"])
    o, size = row["options"], row["width"]
    base = {"width": size, "height": row["height"], "quant": row["quant"]}
    if row["task"] == "generate":
        memory = {k: o[k] for k in ("offload", "t5_quant", "blocks_to_swap", "token_chunks")}
        tiling = o["vae_tiling"].split(" -> ")[-1]
        return PlanConfig.from_dict(
            {"task": "generate", "rank": o["adapter_rank"], "vae_tiling": tiling, **base, **memory}
        )
    recipe = recipe_file_job(shipped_recipe(size))
    memory = {k: o[k] for k in ("checkpointing", "blocks_to_swap", "token_chunks", "checkpoint_every")}
    return recipe.replace(width=size, height=row["height"], adapter=o["recipe"]).with_memory(
        quant=row["quant"], **memory
    )


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
        return cfg.memory.describe("generate", [*searched("generate"), "vae_tiling"], skip_defaults=True)
    return cfg.memory.describe("train", searched("train"), skip_defaults=True)


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
