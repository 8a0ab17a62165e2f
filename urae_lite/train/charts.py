"""The pictures a run keeps up to date in its output folder: `loss.png` and the `samples.png` contact sheet.

Both are drawn from what the run already wrote (`log.jsonl`, `validation/step-N/NN.png`), so a resumed run draws
the same pictures as one that never stopped, and both are written atomically (a viewer never sees half a file).
matplotlib draws on its Agg canvas without pyplot (no global figure state, no display needed).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from ..safetensors_io import atomic_write_bytes

STEP_FOLDER = re.compile(r"^step-(\d{8})$")
MAX_COLUMNS = 12  # a sheet of a long run shows 12 evenly spaced validations, the first and the last among them
MAX_CELL = 256  # cells are at most this many pixels a side (2K/4K validation images are shrunk to fit)
LABEL_WIDTH = 200  # the prompt column
HEADER_HEIGHT = 24  # the step row
LINE_HEIGHT = 14
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def matplotlib_missing() -> bool:
    """loss.png needs matplotlib (the `train` extra); samples.png only pillow."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def read_log(path: Path, upto: int) -> list[dict]:
    """The log's records up to step `upto` (lines cut short by a kill are skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "loss" in record and record.get("step", upto + 1) <= upto:
                records.append(record)
    return records


def validation_steps(folder: Path, upto: int) -> list[int]:
    """Steps with a validation folder, up to `upto` (a resumed run ignores what the killed run got past)."""
    if not folder.is_dir():
        return []
    steps = [int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := STEP_FOLDER.match(p.name))]
    return sorted(s for s in steps if s <= upto)


def loss_figure(records: list[dict], marks: list[int]):
    """matplotlib Figure: loss per step (faint), the smoothed loss as logged (`loss_smoothed`, smoothed by the
    monitor: the chart shows the log's numbers) and a dashed line at each validation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    logged = [r for r in records if "loss_smoothed" in r]
    smoothed = [r["step"] for r in logged], [r["loss_smoothed"] for r in logged]
    ax.plot(*smoothed, color="tab:blue", linewidth=1.8, label="smoothed")
    for i, step in enumerate(marks):
        ax.axvline(step, color="tab:orange", linestyle="--", linewidth=0.8, label="validation" if i == 0 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 1.5
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    return figure


def loss_chart(records: list[dict], marks: list[int], path: Path) -> Path | None:
    """`path` <- `loss_figure` as a PNG; None without records. Needs matplotlib (see `matplotlib_missing`)."""
    if not records:
        return None
    buffer = io.BytesIO()
    loss_figure(records, marks).savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def sheet_columns(steps: list[int], limit: int = MAX_COLUMNS) -> list[int]:
    """At most `limit` of the steps, evenly spaced, always the first and the last."""
    if len(steps) <= limit:
        return steps
    return [steps[round(i * (len(steps) - 1) / (limit - 1))] for i in range(limit)]


def cell_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """A validation image's cell: its own size, shrunk (aspect kept) to at most MAX_CELL a side."""
    w, h = image_size
    scale = min(1.0, MAX_CELL / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _label(draw, xy: tuple[int, int], text: str, width: int, height: int, font) -> None:
    """`text` wrapped to `width` pixels from `xy`, as many lines as `height` holds (the rest is left out)."""
    x, y = xy
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width - 8 or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    for i, text_line in enumerate(lines[: max(1, height // LINE_HEIGHT)]):
        draw.text((x + 4, y + i * LINE_HEIGHT), text_line, fill=INK, font=font)


def contact_sheet(folder: Path, prompts: list[str], upto: int, path: Path) -> Path | None:
    """`path` <- the validation images of `folder` (validation/step-N/NN.png): prompts in rows, steps in columns,
    the prompts written on the left and the steps on top. None when there is no validation yet."""
    from PIL import Image, ImageDraw, ImageFont

    columns = sheet_columns(validation_steps(folder, upto))
    if not columns or not prompts:
        return None
    first = folder / f"step-{columns[0]:08d}" / "00.png"
    with Image.open(first) as image:
        cw, ch = cell_size(image.size)
    sheet = Image.new("RGB", (LABEL_WIDTH + cw * len(columns), HEADER_HEIGHT + ch * len(prompts)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, prompt in enumerate(prompts):  # labels first: a word wider than the column is covered by the cells
        _label(draw, (0, HEADER_HEIGHT + r * ch + 4), prompt, LABEL_WIDTH, ch - 4, font)
    for c, step in enumerate(columns):
        x = LABEL_WIDTH + c * cw
        draw.text((x + 4, 6), f"step {step}", fill=INK, font=font)
        for r in range(len(prompts)):
            cell = folder / f"step-{step:08d}" / f"{r:02d}.png"
            if cell.is_file():
                with Image.open(cell) as image:
                    sheet.paste(image.convert("RGB").resize((cw, ch), Image.LANCZOS), (x, HEADER_HEIGHT + r * ch))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    return atomic_write_bytes(path, buffer.getvalue())
