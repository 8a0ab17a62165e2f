"""The job a plan is for: what runs (task, size, model, adapter, optimizer) and how it fits the card (its
MemorySettings, what `--vram` searches). The estimate (estimate.py) and the search (search.py) take it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .. import flux_configs as F
from ..memory import MemorySettings
from ..memory import options as memory_options
from .activations import Tokens
from .arch import FluxArch, flux_arch, image_tokens

TASKS = ("generate", "train")
OPTIMIZERS = ("prodigy", "adamw8bit")
ADAPTERS = ("lora", "minor")
BACKENDS = ("cuda", "cpu")
BASE_ADAPTER_RANK = 16  # the 4K minor recipe trains over the authors' rank-16 2K LoRA (docs/training.md)


@dataclass(frozen=True)
class PlanConfig:
    """One way to run a job: the job (task, size, model, adapter, optimizer) and how it fits the card (`memory`, the
    settings `--vram` searches). The defaults are the product's (CUDA, NF4, model offload, checkpointing on)."""

    task: str = "generate"
    width: int = 2048
    height: int = 2048
    variant: str = "dev"
    rank: int | None = None  # generate: total rank of the loaded adapters; train: trainable rank (16)
    adapter: str | None = None  # train: lora | minor (default: minor from 4096² up, as the 4K recipe)
    optimizer: str = "prodigy"  # train
    validation: bool = True  # train: the recipes sample validation images at the training size
    steps: int = 28  # generate: denoising steps (speed model only)
    backend: str = "cuda"  # cpu: the PyTorch reference path, for checking the model against measurement
    memory: MemorySettings = MemorySettings()
    transformer_config: dict | None = field(default=None, compare=False)  # default: FLUX.1 of `variant`

    def __post_init__(self) -> None:  # generation is planned for CUDA, where offload defaults to `model`
        if self.task == "generate":
            object.__setattr__(self, "memory", self.memory.replace(offload=self.memory.resolved_offload("cuda")))

    @classmethod
    def from_dict(cls, values: dict) -> PlanConfig:
        """The PlanConfig of `as_dict`'s flat mapping (job fields and memory settings side by side)."""
        from ..errors import UraeError

        names = set(memory_options())
        known = names | {f.name for f in dataclasses.fields(cls)} - {"memory"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UraeError(f"unknown plan option(s) {', '.join(unknown)}: use {', '.join(sorted(known))}")
        memory = MemorySettings(**{k: v for k, v in values.items() if k in names})
        return cls(**{k: v for k, v in values.items() if k not in names}, memory=memory)

    def replace(self, **changes) -> PlanConfig:
        return dataclasses.replace(self, **changes)

    def with_memory(self, **changes) -> PlanConfig:
        return dataclasses.replace(self, memory=self.memory.replace(**changes))

    @property
    def adapter_kind(self) -> str:
        """Train: the recipes' choice unless set (LoRA for 2K, minor components for 4K)."""
        return self.adapter or ("minor" if self.width * self.height >= 4096 * 4096 else "lora")

    @property
    def adapter_rank(self) -> int:
        """Generate: the 2K LoRA (16), or 2K + the converted 4K adapter (48) above 2048²; train: 16."""
        if self.rank is not None:
            return self.rank
        return 48 if self.task == "generate" and self.width * self.height > 2048 * 2048 else 16

    def arch(self) -> FluxArch:
        from ..flux_configs import flux_dev_config

        return flux_arch(self.transformer_config or flux_dev_config(self.variant))

    def tokens(self) -> Tokens:
        return Tokens(image_tokens(self.width, self.height), F.TEXT_TOKENS[self.variant])

    def options(self) -> str:
        """The job's memory settings as its command line spells them (generate options or recipe overrides)."""
        return self.memory.describe(self.task)

    def summary(self) -> str:
        m = self.memory
        head = f"{self.task} {self.width}x{self.height}, FLUX.1-{self.variant}, {m.quant} base"
        memory = (f", {m.blocks_to_swap} blocks swapped" if m.blocks_to_swap else "") + (
            f", {m.token_chunks} token chunks" if m.token_chunks > 1 else ""
        )
        if self.task == "generate":
            return (
                f"{head}, offload {m.offload}, T5 {m.t5_quant}, VAE tiling {m.vae_tiling}, adapters "
                f"rank {self.adapter_rank}{memory}"
            )
        return (
            f"{head}, {self.adapter_kind} rank {self.adapter_rank}, checkpointing {m.checkpointing}"
            + (f" every {m.checkpoint_every} blocks" if m.checkpoint_every > 1 else "")
            + f", {self.optimizer}{memory}"
            + ("" if self.validation else ", no validation")
        )

    def as_dict(self) -> dict:
        """The job's fields and its memory settings in one flat mapping (`plan --json`)."""
        job = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("memory", "transformer_config"):
            job.pop(name)
        return {**job, **self.memory.for_task(self.task)}
