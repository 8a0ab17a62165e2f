"""The training loop: cached samples → flow-matching loss → adapter update, with checkpoints, logs, validation.

Several processes (`accelerate launch`, one GPU each) each compute their own samples; gradients of the trainable
factors are averaged with one all-reduce per optimizer step. The model is not wrapped in DDP on purpose: DDP would
broadcast the multi-GiB quantized base buffers, and the adapter gradients are too small (75 MiB) for DDP's
overlapping of communication with the backward pass to matter next to a 2K/4K step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from ..component_files import check_fits
from ..destinations import check_output_dir
from ..errors import UraeError
from ..memory import MemorySettings
from ..model_files import ModelFiles
from ..recovery import MAX_REPLANS, Replanner, announce, out_of_memory, step_down
from ..report import GiB, RunReport
from ..safetensors_io import atomic_write_text
from .cache import open_cache
from .config import TrainConfig
from .data import SkipLog
from .flow import flow_loss
from .model import build_model, export_adapters, load_trainable, save_trainable, trainable_parameters
from .monitor import RunMonitor, require_tensorboard, step_record
from .optim import build_optimizer
from .resume import (
    checkpoint_root,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    partial_dir,
    publish,
    set_rng_state,
    step_name,
    write_rng,
)
from .samples import SampleSource, TrainSample, vae_factors
from .steering import ValidationSchedule, safe_stop
from .validation import run_validation, validation_embeddings

logger = logging.getLogger("urae_lite.train")


class Trainer:
    """One optimizer step = G micro-steps of forward + backward, a gradient all-reduce, clipping, update."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        cfg: TrainConfig,
        device: torch.device,
        accelerator=None,
    ):
        self.model, self.optimizer, self.scheduler, self.cfg = model, optimizer, scheduler, cfg
        self.device, self.accelerator = device, accelerator
        self.params = [p for _, p in trainable_parameters(model)]
        self.input_dtype = model.x_embedder.weight.dtype
        self.guidance = cfg.training.guidance if model.config.guidance_embeds else None

    def forward_loss(self, sample: TrainSample) -> torch.Tensor:
        s = sample.to(self.device)
        t = self.cfg.training
        # With checkpointing, what autograd saves are mostly the block inputs (recent torch, checked on 2.13, saves a
        # checkpoint's inputs through saved-tensor hooks), so this keeps them in host memory instead of the GPU.
        if self.cfg.memory.checkpointing == "cpu" and self.device.type == "cuda":
            from ..pinned import exact_pinned_sizes

            exact_pinned_sizes()  # each saved tensor pinned at its own size, not the next power of two (pinned.py)
        offload = (
            torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
            if self.cfg.memory.checkpointing == "cpu"
            else contextlib.nullcontext()
        )
        guidance = None if self.guidance is None else torch.full((1,), self.guidance, device=self.device)
        with offload, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
            prediction = self.model(
                hidden_states=s.noisy.to(self.input_dtype),
                encoder_hidden_states=s.t5.to(self.input_dtype),
                pooled_projections=s.pooled.to(self.input_dtype),
                timestep=torch.full((1,), s.sigma, device=self.device),
                img_ids=s.img_ids,
                txt_ids=s.txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]
        return flow_loss(prediction, s.target)

    def micro_step(self, sample: TrainSample) -> float:
        loss = self.forward_loss(sample)
        (loss / self.cfg.training.gradient_accumulation).backward()
        return loss.item()

    def reconfigure(self, memory: MemorySettings) -> None:
        """Train with `memory` from now on (an out-of-memory re-plan; the base format stays): the model's mechanisms
        changed where they differ, as `build_model` would have put them."""
        from ..memory import apply

        if memory.quant != self.cfg.memory.quant:
            raise UraeError("the base format is loaded: restart the run to change it")
        apply(self.model, memory, self.device, training=True, previous=self.cfg.memory)
        self.cfg.memory = memory

    def step(
        self, samples: SampleSource, indices: list[int], where: str, replan: Replanner = step_down, n_blocks: int = 57
    ) -> tuple[list[float], float]:
        """One optimizer step (`where`: "training step N") over the samples at `indices` (its micro-steps): (losses,
        pre-clip gradient norm).

        Out of memory in a forward or backward drops the step's gradients, re-plans (`replan`, urae_lite.recovery),
        reconfigures and runs the step again from its start: the samples are the same (drawn by index), the
        optimizer has not moved, so the step is the one the final settings give from the start. Out of memory in the
        update itself, or with several processes (they would no longer run the same settings), stops with advice."""
        world = self.accelerator.num_processes if self.accelerator is not None else 1
        for attempt in range(MAX_REPLANS + 1):
            try:
                losses = [self.micro_step(samples.get(i)) for i in indices]
            except torch.cuda.OutOfMemoryError as e:
                self.optimizer.zero_grad(set_to_none=True)  # a half-accumulated step: gone, it runs again
                torch.cuda.empty_cache()
                oom = out_of_memory(e, "train", where, "transformer", n_blocks, self.device)
                new = replan(self.cfg.memory, oom) if attempt < MAX_REPLANS and world == 1 else None
                if new is None or new == self.cfg.memory:
                    raise UraeError(oom_advice(self.cfg, where, *_cuda_peak(self.device), n_blocks)) from None
                announce(oom, self.cfg.memory, new, attempt + 1)
                self.reconfigure(new)
                continue
            with oom_guard(self.cfg, self.device, where):  # an update half done cannot run again: advice only
                return losses, self.optimizer_step()
        raise AssertionError("unreachable: the last attempt returns or raises")

    def optimizer_step(self) -> float:
        """Average gradients over processes, clip, update; returns the pre-clip gradient norm."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
            for p, g in zip(self.params, torch.split(flat, [g.numel() for g in grads])):
                p.grad = g.view_as(p)
        else:
            for p, g in zip(self.params, grads):
                p.grad = g
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


def oom_advice(
    cfg: TrainConfig, where: str, peak_gib: float | None = None, total_gib: float | None = None, n_blocks: int = 57
) -> str:
    """The out-of-memory message: what ran, what peaked, and which settings use less memory (biggest first)."""
    from ..memory import spell

    m = cfg.memory
    tips = []
    if where == "validation":
        tips += [f"validation.size={max(512, (cfg.validation.size or cfg.data.resolution) // 2)}", "validation.every=0"]
    tips += [f"{spell(name, 'train')}={value}" for name, value in m.lighter("train", n_blocks).items()]
    if "8bit" not in str(cfg.optimizer.get("_component_", "")).lower():
        tips.append("optimizer._component_=bitsandbytes.optim.AdamW8bit optimizer.lr=1e-4")
    peak = f"peak {peak_gib:.1f} of {total_gib:.1f} GiB; " if peak_gib is not None and total_gib is not None else ""
    head = (
        f"CUDA out of memory during {where} ({peak}resolution {cfg.data.resolution}, "
        f"{m.describe('train', ['quant', 'checkpointing'])}, optimizer {cfg.optimizer.get('_component_')})"
    )
    if tips:
        return f"{head}. These settings use less memory, most effective first: {' '.join(tips)}"
    return (
        f"{head}. Every memory saving is already on: train at a lower data.resolution (re-run `urae-lite cache`) "
        f"or use a GPU with more memory (`urae-lite plan --task train --vram N` says what fits)"
    )


@contextlib.contextmanager
def oom_guard(cfg: TrainConfig, device: torch.device, where: str):
    """Turn a CUDA out-of-memory error inside the block into a UraeError with `oom_advice` for `where`."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UraeError(oom_advice(cfg, where, *_cuda_peak(device))) from None


def _cuda_peak(device: torch.device) -> tuple[float | None, float | None]:
    """(peak allocated, card total) in GiB on CUDA, else (None, None)."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.get_device_properties(device).total_memory / GiB


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    return Accelerator(cpu=cfg.device == "cpu", mixed_precision="no")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after the resumed checkpoint (the killed run got further than it saved)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the kill
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _restore(path: Path, trainer: Trainer, cfg: TrainConfig, items: list[str], accelerator) -> int:
    """Load a checkpoint into the trainer; returns its step. The data must be the cache it was trained on."""
    ckpt = load_checkpoint(path, accelerator.process_index)
    state = ckpt["state"]
    if state["items"] != items:
        raise UraeError(
            f"the cache changed since the checkpoint ({len(state['items'])} items then, {len(items)} "
            f"now): resume needs the same data, or start a new run"
        )
    per_step = accelerator.num_processes * cfg.training.gradient_accumulation
    if state["samples_per_step"] != per_step:
        logger.warning(
            "resuming with %d samples per step instead of %d: the sample order will differ from an uninterrupted run",
            per_step,
            state["samples_per_step"],
        )
    try:
        load_trainable(trainer.model, ckpt["trainable"])
    except ValueError as e:
        raise UraeError(f"cannot resume: {e} (was the adapter section of the recipe changed?)") from e
    trainer.optimizer.load_state_dict(ckpt["optimizer"]["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["optimizer"]["scheduler"])
    if ckpt["rng"] is not None:
        set_rng_state(ckpt["rng"])
    return state["step"]


def train(
    cfg: TrainConfig,
    resume: str | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    files: ModelFiles | None = None,
    replan: Replanner = step_down,
    plan_peak_gib: float | None = None,
    command: str | None = None,
) -> Path:
    """Run the recipe; returns the folder holding the final adapter. `resume`: `auto` or a checkpoint folder.

    `on_step(step)` is called before each optimizer step's work, with its 1-based number (progress hooks; tests
    use it to kill a run mid-way). `files`: the recipe's model files if already resolved (`cfg.model_files()`).
    `replan`: how a step that runs out of memory re-plans (urae_lite.recovery; the command passes the planner's).
    `plan_peak_gib`: the planner's peak for this run, shown beside the measured one. `command`: the command line
    that started the run, printed with `--resume` when Ctrl-C / SIGTERM stops it (urae_lite/train/steering.py)."""
    check_output_dir(cfg.output_dir, "output_dir")
    out = Path(cfg.output_dir)
    if resume is None and list_checkpoints(out):  # destination errors come before the model is resolved (fetched)
        raise UraeError(
            f"{out} already holds checkpoints: pass --resume to continue that run, or choose another output_dir"
        )
    if cfg.training.log_with == "tensorboard":
        require_tensorboard()  # before anything is loaded
    checkpoint = None if resume is None else find_checkpoint(out, resume)
    files = files if files is not None else cfg.model_files()  # once per run: cache, model and validation share it
    n_blocks = files.config["num_layers"] + files.config["num_single_layers"]
    cfg.memory.check("train", n_blocks)
    accelerator = _make_accelerator(cfg)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)  # nothing in training draws from the global RNG, but keep it reproducible too
    report, skips, root = RunReport(), SkipLog(), files.pipeline_root()
    check_fits(files.component_files, root)
    with report.stage("open cache"):
        dataset = open_cache(cfg.data.dir, files, cfg.data.resolution, cfg.data.cache, skips=skips, data=cfg.data)
        source = SampleSource(dataset, cfg, *vae_factors(root), skips)
    v = cfg.validation
    embeds = []
    if v.enabled and main:  # before the transformer is on the device: T5 needs it alone
        with report.stage("validation prompts"), oom_guard(cfg, device, "prompt encoding"):
            manifest = json.loads((dataset.cache / "manifest.json").read_text())
            embeds = validation_embeddings(cfg, root, device, manifest["max_sequence_length"])
    with report.stage("load model"), oom_guard(cfg, device, "model loading"):
        model = build_model(cfg, device, progress=progress and main, files=files)
        optimizer, scheduler = build_optimizer(cfg, (p for _, p in trainable_parameters(model)))
    trainer = Trainer(model, optimizer, scheduler, cfg, device, accelerator)
    items = [item.name for item in dataset.items]
    step = 0 if checkpoint is None else _restore(checkpoint, trainer, cfg, items, accelerator)
    monitor = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(out / "log.jsonl", step)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        monitor = RunMonitor(out, cfg.training.log_with, step, v.prompts, plan_peak_gib)
    schedule = ValidationSchedule(v, out)
    t = cfg.training
    per_step = world * t.gradient_accumulation
    bar = tqdm(total=t.steps, initial=step, desc="training", unit="step", disable=not (progress and main))
    stopped = None
    with report.stage("train"), safe_stop() as stop:
        while step < t.steps:
            start = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if on_step is not None:
                on_step(step + 1)
            indices = [step * per_step + micro * world + rank for micro in range(t.gradient_accumulation)]
            losses, grad_norm = trainer.step(source, indices, f"training step {step + 1}", replan, n_blocks)
            step += 1
            loss = accelerator.reduce(torch.tensor(sum(losses) / len(losses), device=device), reduction="mean").item()
            if main:
                seconds = time.perf_counter() - start
                record = step_record(optimizer, scheduler, device, step, loss, grad_norm, seconds)
                monitor.step(record, write=step % cfg.log_every == 0 or step == t.steps)
                bar.set_postfix(monitor.postfix(record), refresh=False)
            bar.update(1)
            saved = cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or step == t.steps)
            if saved:
                _save_checkpoint(trainer, cfg, step, items, accelerator)
            # a stop skips a due validation (the checkpoint is what matters) and keeps SAMPLE_NOW for the resumed run
            due = main and not stop.requested and schedule.due(step) is not None
            run_now, stop_now = _agree(accelerator, due, stop.requested)
            if run_now and not stop_now:
                if main:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    with oom_guard(cfg, device, "validation"):
                        images = run_validation(model, cfg, root, embeds, step, device)
                    monitor.validation(step, images, _cuda_peak(device)[0])
                schedule.done()
                accelerator.wait_for_everyone()
            if stop_now and step < t.steps:
                if not saved:
                    _save_checkpoint(trainer, cfg, step, items, accelerator)
                stopped = stop.signal or "a stop request"
                break
    bar.close()
    if monitor is not None:
        monitor.close()
    if main and stopped is not None:
        print(
            f"stopped by {stopped} after step {step} of {t.steps}: checkpoint "
            f"{checkpoint_root(out) / step_name(step)}\ncontinue with: {_resume_command(command, out)}"
        )
    elif main:
        export_adapters(model, cfg, out, {"urae_lite.steps": str(step)})
        print(f"wrote {out / 'adapter.safetensors'}; {skips.summary()}")
    if main:
        print(report.format())
    accelerator.wait_for_everyone()
    return out


def _agree(accelerator, validate: bool, stop: bool) -> tuple[bool, bool]:
    """Every process takes the same decisions: validate when the main process says so (its timer and its
    SAMPLE_NOW), stop when any process got the signal."""
    if accelerator.num_processes == 1:
        return validate, stop
    flags = torch.tensor([float(validate), float(stop)], device=accelerator.device)
    total = accelerator.reduce(flags, reduction="sum")
    return bool(total[0] > 0), bool(total[1] > 0)


def _resume_command(command: str | None, out: Path) -> str:
    """The command that started the run with `--resume` (once), or its Python form."""
    if command is None:
        return f"train(load_recipe(...), resume='auto')  # or: urae-lite train RECIPE output_dir={out} ... --resume"
    return command if "--resume" in command.split() else f"{command} --resume"


def _save_checkpoint(trainer: Trainer, cfg: TrainConfig, step: int, items: list[str], accelerator) -> Path | None:
    """Every process writes its RNG state into the staging folder; the main process completes and publishes it."""
    staging = partial_dir(cfg.output_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_rng(staging, accelerator.process_index)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    save_trainable(trainer.model, staging / "trainable.safetensors")
    export_adapters(trainer.model, cfg, staging, {"urae_lite.steps": str(step)})
    state = {
        "step": step,
        "seed": cfg.seed,
        "items": items,
        "world_size": accelerator.num_processes,
        "samples_per_step": accelerator.num_processes * cfg.training.gradient_accumulation,
        "config": cfg.to_dict(),
    }
    optimizer_state = {"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict()}
    return publish(staging, cfg.output_dir, step, optimizer_state, state, cfg.checkpoint.keep)
