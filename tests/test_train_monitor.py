"""Watching a run (urae_lite/train/monitor.py, charts.py, steering.py): log.jsonl fields, TensorBoard events read back
with TensorBoard's own reader, loss.png and the samples.png contact sheet, SAMPLE_NOW, the minutes timer, and
validation sampled with the recipe's high-resolution and memory settings."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from train_utils import REPO, RESOLUTION, make_dataset, one_thread, recipe_overrides  # noqa: F401

from urae_lite import token_chunking
from urae_lite.errors import UraeError
from urae_lite.hires import ProportionalAttnProcessor
from urae_lite.train import steering, validation
from urae_lite.train.cache import build_cache
from urae_lite.train.charts import HEADER_HEIGHT, LABEL_WIDTH, contact_sheet, sheet_columns
from urae_lite.train.config import ValidationConfig, load_recipe
from urae_lite.train.loop import train

RECIPE_2K = REPO / "recipes" / "train_2k_lora.yaml"
FAST = {"memory.quant": "bf16", "training.precision": "fp32"}
PROMPTS = ["a red flower in a garden", "a blue car on a wet street at night, reflections"]
SIZE = 48  # validation.size below data.resolution (64): the smaller size is honoured


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tiny_flux):
    folder = make_dataset(tmp_path_factory.mktemp("monitor") / "data", sizes=[(64, 64), (80, 48), (48, 80)])
    build_cache(folder, str(tiny_flux), RESOLUTION, max_sequence_length=32, progress=False)
    return folder


def debiased_ema(values: list[float], w: float = 0.9) -> float:
    """TensorBoard's smoothing of the last value, in closed form: Σ w^(n-i)(1-w)x_i / (1 - w^n)."""
    n = len(values)
    return sum(w ** (n - i) * (1 - w) * x for i, x in enumerate(values, 1)) / (1 - w**n)


def test_a_watched_run_logs_tensorboard_draws_charts_and_samples_on_request(
    tiny_flux, small_data, tmp_path, monkeypatch
):
    """4 steps, validation every 2 steps, SAMPLE_NOW created during step 1, NTK 10 + proportional attention + 2 token
    chunks: validations after steps 1, 2, 4 (exactly one extra), through the trained model with those settings."""
    out = tmp_path / "run"
    overrides = recipe_overrides(
        tiny_flux,
        small_data,
        out,
        **FAST,
        **{
            "training.log_with": "tensorboard",
            "validation.every": 2,
            "validation.steps": 1,
            "validation.size": SIZE,
            "validation.prompts": json.dumps(PROMPTS),
            "optimizer.d0": 1e-3,
            "hires.ntk": 10,
            "hires.proportional_attention": "true",
            "memory.token_chunks": 2,
        },
    )
    seen = []  # per validation sample: the sampled model's settings and how many chunked passes ran
    original_sample, original_chunks = validation.sample_latents, token_chunking._run_chunks
    chunk_calls = []
    monkeypatch.setattr(token_chunking, "_run_chunks", lambda *a: chunk_calls.append(1) or original_chunks(*a))

    def spy(model, t5, pooled, height, width, *args):
        before = len(chunk_calls)
        result = original_sample(model, t5, pooled, height, width, *args)
        processors = {type(p) for p in model.attn_processors.values()}
        seen.append((model.pos_embed.theta, processors, (height, width), len(chunk_calls) - before))
        return result

    monkeypatch.setattr(validation, "sample_latents", spy)
    published, replace = [], os.replace  # an atomic write is a rename of a finished temp file (safetensors_io)
    monkeypatch.setattr(os, "replace", lambda src, dst: published.append(Path(dst)) or replace(src, dst))

    def on_step(step: int) -> None:
        if step == 1:
            (out / "SAMPLE_NOW").write_text("")

    train(load_recipe(RECIPE_2K, overrides), progress=False, on_step=on_step)
    steps = [1, 2, 4]
    assert sorted(p.name for p in (out / "validation").glob("step-*")) == [f"step-{s:08d}" for s in steps]
    assert not (out / "SAMPLE_NOW").exists()
    pictures = [out / "validation" / f"step-{s:08d}" / f"{i:02d}.png" for s in steps for i in range(len(PROMPTS))]
    assert {out / "config.yaml", out / "loss.png", out / "samples.png", *pictures} <= set(published)
    # part 3: every validation image sampled by the model with the recipe's NTK, attention and token chunks
    assert len(seen) == len(steps) * len(PROMPTS)
    for theta, processors, size, chunked in seen:
        assert theta == 10000 * 10 and processors == {ProportionalAttnProcessor} and size == (SIZE, SIZE)
        assert chunked > 0

    # log.jsonl: today's fields plus effective LR (Prodigy d·lr), host RAM and the smoothed loss
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for i, r in enumerate(log):
        assert {"loss", "lr", "grad_norm", "seconds", "prodigy_d", "effective_lr", "host_ram_gib"} <= set(r)
        assert r["effective_lr"] == r["prodigy_d"] * r["lr"] and r["host_ram_gib"] > 0.05
        assert r["loss_smoothed"] == pytest.approx(debiased_ema([x["loss"] for x in log[: i + 1]]), rel=1e-12)

    # TensorBoard's own reader: the scalars at every step, the validation images at the validation steps
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    want = {"train/loss", "train/loss_smoothed", "train/lr", "train/grad_norm", "train/seconds_per_step"}
    assert want | {"memory/host_ram_gib"} <= set(tags["scalars"])
    for tag, key in (("train/loss", "loss"), ("train/lr", "effective_lr"), ("train/grad_norm", "grad_norm")):
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == [1, 2, 3, 4]
        # TensorBoard stores float32: one rounding, relative 2^-24
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in log], rel=2**-23)
    assert set(tags["images"]) == {"validation/00", "validation/01"}
    for i in range(len(PROMPTS)):
        images = events.Images(f"validation/{i:02d}")
        assert [e.step for e in images] == steps

        decoded = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
        assert np.array_equal(decoded, np.asarray(Image.open(out / "validation" / "step-00000004" / f"{i:02d}.png")))

    # loss.png: a 640x320 chart; samples.png: label column + one cell per step, header row + one row per prompt
    with Image.open(out / "loss.png") as chart:
        assert chart.format == "PNG" and chart.size == (640, 320)
        pixels = np.asarray(chart.convert("RGB"))
        assert (pixels != 255).any(axis=-1).mean() > 0.02  # axes, lines and labels, not a blank canvas
    sheet = np.asarray(Image.open(out / "samples.png").convert("RGB"))
    assert sheet.shape == (HEADER_HEIGHT + SIZE * len(PROMPTS), LABEL_WIDTH + SIZE * len(steps), 3)
    for c, step in enumerate(steps):
        for r in range(len(PROMPTS)):
            cell = sheet[HEADER_HEIGHT + r * SIZE : HEADER_HEIGHT + (r + 1) * SIZE, LABEL_WIDTH + c * SIZE :][:, :SIZE]
            png = np.asarray(Image.open(out / "validation" / f"step-{step:08d}" / f"{r:02d}.png").convert("RGB"))
            assert np.array_equal(cell, png), (step, r)
        header = sheet[:HEADER_HEIGHT, LABEL_WIDTH + c * SIZE : LABEL_WIDTH + (c + 1) * SIZE]
        assert (header < 128).any()  # the step is written above its column
    for r in range(len(PROMPTS)):
        assert (sheet[HEADER_HEIGHT + r * SIZE : HEADER_HEIGHT + (r + 1) * SIZE, :LABEL_WIDTH] < 128).any()


def test_contact_sheet_of_a_long_run_keeps_first_last_and_shrinks_big_cells(tmp_path):
    """12 evenly spaced columns of 40 validations, the first and last among them; 512² images become 256² cells."""
    from PIL import Image

    steps = list(range(250, 10001, 250))
    assert sheet_columns(steps)[0] == 250 and sheet_columns(steps)[-1] == 10000 and len(sheet_columns(steps)) == 12
    assert sheet_columns(steps[:5]) == steps[:5]
    for step in (10, 20):
        folder = tmp_path / f"step-{step:08d}"
        folder.mkdir()
        Image.new("RGB", (512, 384), (step, 0, 0)).save(folder / "00.png")
    (tmp_path / "step-00000030").mkdir()  # past the resumed step: left out
    sheet = Image.open(contact_sheet(tmp_path, ["p"], 20, tmp_path / "sheet.png"))
    assert sheet.size == (LABEL_WIDTH + 2 * 256, HEADER_HEIGHT + 192)
    assert sheet.getpixel((LABEL_WIDTH + 256 + 100, HEADER_HEIGHT + 100)) == (20, 0, 0)


def test_validation_schedule_steps_minutes_and_sample_now(tmp_path, monkeypatch):
    """every_minutes follows the (monkeypatched) clock and restarts at every validation; SAMPLE_NOW runs one
    validation and is deleted; with validation off it is deleted without one."""
    now = [0.0]
    monkeypatch.setattr(steering, "monotonic", lambda: now[0])
    schedule = steering.ValidationSchedule(ValidationConfig(every=4, every_minutes=1, prompts=["a"]), tmp_path)
    fired = []
    for step in range(1, 9):
        now[0] = 25.0 * step  # 25 s per step
        reason = schedule.due(step)
        if reason:
            fired.append((step, reason))
            schedule.done()
        if step == 6:
            (tmp_path / steering.SAMPLE_NOW).write_text("")
    # 75 s at step 3; step 4 by count (timer restarts at 100 s); SAMPLE_NOW after 7; step 8 by count
    assert fired == [(3, "every_minutes"), (4, "every"), (7, "SAMPLE_NOW"), (8, "every")]
    assert not (tmp_path / steering.SAMPLE_NOW).exists()
    off = steering.ValidationSchedule(ValidationConfig(every=0, every_minutes=0, prompts=["a"]), tmp_path)
    (tmp_path / steering.SAMPLE_NOW).write_text("")
    assert off.due(1) is None and not (tmp_path / steering.SAMPLE_NOW).exists()


def test_log_with_tensorboard_missing_is_one_line(tiny_flux, small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` does when not installed
    monkeypatch.setattr("urae_lite.train.loop.open_cache", lambda *a, **k: pytest.fail("loaded before the check"))
    overrides = recipe_overrides(tiny_flux, small_data, tmp_path / "run", **{"training.log_with": "tensorboard"})
    with pytest.raises(UraeError, match=r'needs TensorBoard: pip install "urae-lite\[tensorboard\]"'):
        train(load_recipe(RECIPE_2K, overrides), progress=False)
    from urae_lite.cli import main

    assert main(["train", str(RECIPE_2K), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "urae-lite[tensorboard]" in err[0]
    with pytest.raises(UraeError, match="training.log_with=wandb is not one of tensorboard"):
        load_recipe(RECIPE_2K, [*overrides, "training.log_with=wandb"])
    assert not Path(tmp_path / "run").exists()


def test_loss_chart_draws_the_logged_smoothing_on_whole_steps():
    """The smoothed line is the log's `loss_smoothed` (made by the monitor, the one smoothing), not a second
    computation; three steps get whole-number ticks, not 1.25, 1.5, ..."""
    from urae_lite.train.charts import loss_figure

    records = [{"step": s, "loss": 0.5 + 0.1 * s, "loss_smoothed": 2.0 - 0.3 * s} for s in (1, 2, 3)]
    figure = loss_figure(records, [2])
    loss, smoothed = figure.axes[0].lines[:2]
    assert list(loss.get_ydata()) == [r["loss"] for r in records]
    assert list(smoothed.get_xdata()) == [1, 2, 3] and list(smoothed.get_ydata()) == [
        r["loss_smoothed"] for r in records
    ]
    figure.canvas.draw()
    assert all(tick == int(tick) for tick in figure.axes[0].get_xticks())


def test_without_matplotlib_loss_png_is_skipped_with_one_warning(tmp_path, monkeypatch, caplog):
    from urae_lite.train.monitor import RunMonitor

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` does when not installed
    monitor = RunMonitor(tmp_path, None, 0, ["p"])
    for step in (1, 2):
        monitor.step({"step": step, "loss": 1.0}, write=True)
        monitor.validation(step, [])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and 'pip install "urae-lite[train]"' in warnings[0]
    assert not (tmp_path / "loss.png").exists()
