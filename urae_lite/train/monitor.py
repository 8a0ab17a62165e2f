"""What a run shows while it trains: `log.jsonl`, TensorBoard (`training.log_with`), the progress bar's numbers,
and after each validation `loss.png` and `samples.png` (urae_lite/train/charts.py).

One record per logged step holds the loss, the scheduled LR and the LR actually applied (Prodigy: d·lr), the
pre-clip gradient norm, the step's seconds, peak GPU memory (CUDA) and the process's resident host memory;
TensorBoard gets the same numbers under `train/...` and the validation images under `validation/NN`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import psutil
import torch

from ..errors import UraeError
from ..report import GiB
from .charts import contact_sheet, loss_chart, matplotlib_missing, read_log, validation_steps

logger = logging.getLogger("urae_lite.train")

SMOOTHING = 0.9  # the weight of the running average: TensorBoard's default smoothing slider, debiased the same way
LOG_WITH = (None, "tensorboard")
TENSORBOARD_DIR = "tensorboard"
#: the scalars written to TensorBoard per logged step: tag -> log.jsonl field
SCALARS = {
    "train/loss": "loss",
    "train/loss_smoothed": "loss_smoothed",
    "train/lr": "effective_lr",
    "train/grad_norm": "grad_norm",
    "train/seconds_per_step": "seconds",
    "memory/peak_vram_gib": "peak_vram_gib",
    "memory/host_ram_gib": "host_ram_gib",
}


def require_tensorboard() -> None:
    """One line naming the extra when TensorBoard is missing (torch.utils.tensorboard's own error is a traceback)."""
    try:
        import tensorboard  # noqa: F401
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UraeError(
            'training.log_with=tensorboard needs TensorBoard: pip install "urae-lite[tensorboard]" '
            "(or leave training.log_with unset)"
        ) from None


def tensorboard_writer(log_dir: Path, purge_step: int | None):
    """torch's SummaryWriter into `log_dir`; `purge_step`: events from that step on (a killed run's) are dropped."""
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=purge_step)


def step_record(optimizer: torch.optim.Optimizer, scheduler, device: torch.device, step: int, loss: float,
                grad_norm: float, seconds: float) -> dict:  # fmt: skip
    """The log.jsonl line of one optimizer step (before smoothing, which needs the run's history)."""
    group = optimizer.param_groups[0]
    lr = scheduler.get_last_lr()[0]
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "seconds": round(seconds, 4)}
    if "d" in group:  # Prodigy's adapted step size: the LR it actually applies is d·lr
        record["prodigy_d"] = group["d"]
    record["effective_lr"] = group["d"] * lr if "d" in group else lr
    if device.type == "cuda":
        record["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 3)
    record["host_ram_gib"] = round(psutil.Process().memory_info().rss / GiB, 3)
    return record


class RunMonitor:
    """The main process's view of the run: appends to log.jsonl, feeds TensorBoard and the progress bar, and
    redraws the charts after each validation. `plan_peak_gib`: the planner's peak for this run, if planned."""

    def __init__(self, output_dir: Path, log_with: str | None, start_step: int, prompts: list[str],
                 plan_peak_gib: float | None = None):  # fmt: skip
        self.out, self.prompts, self.plan_peak_gib = output_dir, prompts, plan_peak_gib
        self.log = output_dir / "log.jsonl"
        self.average, self.count = 0.0, 0
        for record in read_log(self.log, start_step):  # a resumed run smooths on from its history
            self._smooth(record["loss"])
        self.writer, self.draw_loss = None, True
        if log_with == "tensorboard":  # events after the resumed step (the killed run's) are dropped
            self.writer = tensorboard_writer(output_dir / TENSORBOARD_DIR, start_step + 1 if start_step else None)

    def step(self, record: dict, write: bool) -> dict:
        """Adds the smoothed loss to `record`; writes it (log.jsonl, TensorBoard) when `write` (log_every)."""
        record["loss_smoothed"] = self._smooth(record["loss"])
        if write:
            with open(self.log, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.writer is not None:
                for tag, key in SCALARS.items():
                    if key in record:
                        self.writer.add_scalar(tag, record[key], record["step"])
        return record

    def _smooth(self, loss: float) -> float:
        """Exponential moving average of the losses so far with the zero-start bias removed (TensorBoard's
        smoothing), one step at a time: the one smoothing of the run (log, TensorBoard, progress bar, loss.png)."""
        self.average = SMOOTHING * self.average + (1 - SMOOTHING) * loss
        self.count += 1
        return self.average / (1 - SMOOTHING**self.count)

    def postfix(self, record: dict) -> dict[str, str]:
        """The progress bar's numbers (tqdm adds the ETA): smoothed loss, s/step, peak GPU memory vs the plan."""
        shown = {"loss": f"{record['loss_smoothed']:.4f}", "s/step": f"{record['seconds']:.2f}"}
        if "peak_vram_gib" in record:
            plan = f"/{self.plan_peak_gib:.1f} planned" if self.plan_peak_gib is not None else ""
            shown["vram"] = f"{record['peak_vram_gib']:.1f}{plan} GiB"
        return shown

    def validation(self, step: int, images: list[Path], peak_vram_gib: float | None = None) -> None:
        """After a validation: its images (and its peak GPU memory, CUDA) to TensorBoard, loss.png and samples.png
        redrawn."""
        folder = self.out / "validation"
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            for i, path in enumerate(images):
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(f"validation/{i:02d}", pixels, step, dataformats="HWC")
            if peak_vram_gib is not None:
                self.writer.add_scalar("memory/validation_peak_vram_gib", peak_vram_gib, step)
            self.writer.flush()
        if self.draw_loss and matplotlib_missing():
            logger.warning('loss.png is not drawn: it needs matplotlib (pip install "urae-lite[train]")')
            self.draw_loss = False  # said once
        if self.draw_loss:
            loss_chart(read_log(self.log, step), validation_steps(folder, step), self.out / "loss.png")
        contact_sheet(folder, self.prompts, step, self.out / "samples.png")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
