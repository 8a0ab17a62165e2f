"""`MemorySettings`: the one owner of every setting that trades memory for speed without changing a result.

The base format (`quant`), where weights wait (`offload`, `blocks_to_swap`), how activations are cut (`token_chunks`,
`checkpointing`, `checkpoint_every`), the T5 format and the VAE decode's tiling are declared once below, each with
its help text, the jobs it applies to, its values and what `--vram` tries. From that one declaration come the
command-line options of `generate`, `train` and `plan`, the recipes' and presets' `memory:` keys, the planner's
search space, the rules between settings (checked in one method) and the out-of-memory advice. The mechanisms that
carry a setting out (block_swap, token_chunking, the loader, ...) receive checked values and do not check again.

Adding an option: a field here (with its `Option`), its rule in `check` if it has one, its mechanism in `apply`, and
its term in the planner.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UraeError
from .offload import OFFLOAD_MODES
from .quant import QUANT_FORMATS, QuantFormat, get_format
from .text_encoders import T5_QUANTS
from .vae_memory import VAE_TILING_MODES

TASKS = ("generate", "train")
CHECKPOINTING = ("on", "off", "cpu")
SECTION = "memory"  # the recipes' and presets' section of these settings: `memory.token_chunks=4`
SWAP_STEP = 4  # --vram tries blocks_to_swap in steps of this many blocks (and all of them)


@dataclass(frozen=True)
class Option:
    """What the command line, the recipes, the planner's search and the advice know about one setting."""

    help: str
    tasks: tuple[str, ...] = TASKS  # the jobs it applies to
    choices: tuple | None = None  # the vocabulary of a named setting (None: a whole number)
    minimum: int = 0  # the smallest whole number
    searched: tuple[str, ...] = ()  # the jobs whose `--vram` search tries it
    values: tuple | Callable[[int], tuple] = ()  # what the search tries (a function of the model's block count)


def _option(default: Any, option: Option) -> Any:
    return field(default=default, metadata={"option": option})


@dataclass(frozen=True)
class MemorySettings:
    """How a job fits the card: every value checked on construction, the rules between them by `check`."""

    quant: str = _option(
        "nf4",
        Option(
            "frozen base format: nf4 (4-bit, smallest), fp8 (8-bit) or bf16 (unquantized, fastest)",
            choices=QUANT_FORMATS,
            searched=TASKS,
            values=QUANT_FORMATS,
        ),
    )
    offload: str | None = _option(
        None,
        Option(
            "where the pipeline's weights wait: none | model (staged: one component on the GPU at a time; the default "
            "on CUDA, none on the CPU) | group (transformer blocks streamed) | sequential (least memory, slowest)",
            tasks=("generate",),
            choices=OFFLOAD_MODES,
            searched=("generate",),
            values=OFFLOAD_MODES,
        ),
    )
    t5_quant: str = _option(
        "bf16",
        Option(
            "T5-XXL's linears: nf4 cuts text encoding from 8.9 to 3.9 GiB",
            tasks=("generate",),
            choices=T5_QUANTS,
            searched=("generate",),
            values=T5_QUANTS,
        ),
    )
    blocks_to_swap: int = _option(
        0,
        Option(
            "keep the last N transformer blocks' frozen weights in host memory and stream them through the GPU one at "
            "a time: less GPU memory, same result, slower (0 = off; generate: with offload model or none; train: "
            "with checkpointing)",
            searched=TASKS,
            values=lambda n_blocks: tuple(sorted({*range(0, n_blocks, SWAP_STEP), n_blocks})),
        ),
    )
    token_chunks: int = _option(
        1,
        Option(
            "run the blocks (all but the attention) over N token chunks: less GPU memory at 4K, same result (1 = off)",
            minimum=1,
            searched=TASKS,
            values=(1, 4, 16),  # off, and enough chunks that the attention sets the peak
        ),
    )
    checkpointing: str = _option(
        "on",
        Option(
            "gradient checkpointing: on (recompute each block in backward) | cpu (and keep the block inputs in pinned "
            "host memory) | off",
            tasks=("train",),
            choices=CHECKPOINTING,
            searched=("train",),
            values=CHECKPOINTING,
        ),
    )
    checkpoint_every: int = _option(
        1,
        Option(
            "keep only every k-th checkpointed block input and recompute the others in backward: k times fewer kept "
            "inputs for about k/4 more block forwards per block, same result (needs checkpointing)",
            tasks=("train",),
            minimum=1,
            searched=("train",),
            values=(1, 2, 3),
        ),
    )
    vae_tiling: str = _option(
        "auto",
        Option(
            "exact strip-tiled VAE decode: auto (when a plain decode would not fit) | on | off; same image",
            tasks=("generate",),
            choices=VAE_TILING_MODES,
        ),
    )
    vae_strip_rows: int = _option(
        64,
        Option(
            "rows per strip of the tiled VAE decode: fewer = less memory, same image", tasks=("generate",), minimum=1
        ),
    )

    def __post_init__(self) -> None:
        get_format(self.quant)  # an unknown format gets the one message every entry point gives
        for name, option in options().items():
            value = getattr(self, name)
            if name == "offload" and value is None:
                continue
            if option.choices is not None:
                if value not in option.choices:
                    raise UraeError(f"unknown {name} '{value}': use one of {', '.join(map(str, option.choices))}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < option.minimum:
                raise UraeError(f"{name} must be a whole number of at least {option.minimum}, got {value!r}")

    # ---- the rules between settings ---------------------------------------------------------------------------
    def check(self, task: str | None, n_blocks: int | None = None) -> MemorySettings:
        """The settings as `task` can run them on a transformer of `n_blocks` blocks, or one UraeError that names
        the setting as that job spells it (`task` None: only the rules every job shares). Returns self."""
        for name, option in options().items():
            if task is not None and task not in option.tasks and getattr(self, name) != _DEFAULTS[name]:
                raise UraeError(f"{spell(name, task)} is not a {task} setting: leave it out")
        if n_blocks is not None and self.blocks_to_swap > n_blocks:
            raise UraeError(
                f"{spell('blocks_to_swap', task)} must be from 0 (off) to {n_blocks} (every block of this "
                f"transformer), got {self.blocks_to_swap}"
            )
        if self.blocks_to_swap and self.offload in ("group", "sequential"):
            raise UraeError(
                f"{spell('blocks_to_swap', task)} streams the transformer itself: use it with "
                f"{spell('offload', task)} model or none, not {self.offload}"
            )
        if task == "train" and self.checkpointing == "off":
            if self.blocks_to_swap:
                raise UraeError(
                    f"{spell('blocks_to_swap', task)} needs gradient checkpointing (backward fetches the swapped "
                    f"blocks again): set {spell('checkpointing', task)}=on or cpu"
                )
            if self.checkpoint_every > 1:
                raise UraeError(
                    f"{spell('checkpoint_every', task)}={self.checkpoint_every} thins out checkpointed block inputs: "
                    f"set {spell('checkpointing', task)}=on or cpu, or {spell('checkpoint_every', task)}=1"
                )
        return self

    def valid(self, task: str, n_blocks: int | None = None) -> bool:
        try:
            self.check(task, n_blocks)
        except UraeError:
            return False
        return True

    # ---- derived values ---------------------------------------------------------------------------------------
    @property
    def format(self) -> QuantFormat:
        """The base's storage format object (checked on construction)."""
        return get_format(self.quant)

    def resolved_offload(self, device_type: str) -> str:
        """`offload`, or its default for the device: `model` (staged) on CUDA, `none` elsewhere."""
        return self.offload or ("model" if device_type == "cuda" else "none")

    def replace(self, **changes: Any) -> MemorySettings:
        unknown = set(changes) - set(options())
        if unknown:
            raise UraeError(f"unknown memory setting(s): {', '.join(sorted(unknown))} (known: {', '.join(options())})")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_task(self, task: str) -> dict[str, Any]:
        """The settings `task` uses, by name."""
        return {name: getattr(self, name) for name, option in options().items() if task in option.tasks}

    def describe(self, task: str, names: Iterable[str] | None = None, skip_defaults: bool = False) -> str:
        """`--quant nf4 --token-chunks 4` (generate, plan) or `memory.quant=nf4 ...` (train): `names` (default: the
        task's settings) as the job's own command line spells them; `skip_defaults` leaves out the ones at their
        default (never the base format). Recipe overrides need them all: a recipe's own values are not the defaults."""
        values = self.for_task(task)
        names = [n for n in (names or values) if n in values and values[n] is not None]
        if skip_defaults:
            names = [n for n in names if n == "quant" or values[n] != _DEFAULTS[n]]
        if task == "train":
            return " ".join(f"{spell(n, task)}={values[n]}" for n in names)
        return " ".join(f"{spell(n, task)} {values[n]}" for n in names)

    def lighter(self, task: str, n_blocks: int, stage: str = "transformer") -> dict[str, Any]:
        """Settings one step lighter than these that lower the peak of `stage` (text encoders, transformer, vae
        decode), most effective first: the out-of-memory advice."""
        tips: dict[str, Any] = {}
        swap_all = self.blocks_to_swap < n_blocks and self.offload not in ("group", "sequential")
        if task == "generate":
            swapping = self.blocks_to_swap or (stage == "transformer" and swap_all)  # swap streams the transformer
            lighter_offload = {"none": "model", "model": "group", "group": "sequential"}.get(
                self.resolved_offload("cuda")
            )
            if lighter_offload and not (swapping and lighter_offload in ("group", "sequential")):
                tips["offload"] = lighter_offload
            if stage == "transformer" and swap_all:
                tips["blocks_to_swap"] = n_blocks
            if stage == "transformer" and self.token_chunks < 4:
                tips["token_chunks"] = 4
        else:
            if self.checkpointing != "cpu":
                tips["checkpointing"] = "cpu"
            if self.token_chunks < 4:
                tips["token_chunks"] = 4
            if swap_all:
                tips["blocks_to_swap"] = n_blocks
        if self.quant != "nf4":
            tips["quant"] = "nf4"
        if task == "generate" and stage == "vae decode":
            if self.vae_tiling != "on":
                tips["vae_tiling"] = "on"
            else:
                tips["vae_strip_rows"] = max(1, self.vae_strip_rows // 4)
        return tips

    # ---- the command line, recipes and the search ---------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, tasks: Iterable[str]) -> None:
        """`--quant`, `--blocks-to-swap`, ... for the settings of `tasks`; each defaults to None (not given)."""
        tasks = set(tasks)
        for name, option in options().items():
            if not tasks & set(option.tasks):
                continue
            kind = (
                {"type": int, "metavar": "N"}
                if option.choices is None
                else {"metavar": "{" + ",".join(option.choices) + "}"}
            )
            only = "" if tasks <= set(option.tasks) else f" ({'/'.join(option.tasks)} only)"
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=option.help + only, **kind)

    @staticmethod
    def given(args: argparse.Namespace) -> dict[str, Any]:
        """The settings a command line set (the options `add_arguments` made that were given)."""
        return {name: getattr(args, name) for name in options() if getattr(args, name, None) is not None}

    @staticmethod
    def search_space(task: str, n_blocks: int) -> dict[str, tuple]:
        """What `--vram` tries for each setting `task` searches."""
        return {
            name: option.values(n_blocks) if callable(option.values) else option.values
            for name, option in options().items()
            if task in option.searched
        }


def options() -> dict[str, Option]:
    """Every memory setting's declaration, by field name, in declaration order."""
    return _OPTIONS


def searched(task: str) -> tuple[str, ...]:
    """The settings `--vram` picks for `task`."""
    return tuple(name for name, option in _OPTIONS.items() if task in option.searched)


def spell(name: str, task: str) -> str:
    """A setting as the job's command line names it: `--token-chunks` (generate, plan) or `memory.token_chunks`
    (a training recipe key)."""
    return f"{SECTION}.{name}" if task == "train" else f"--{name.replace('_', '-')}"


def recipe_overrides(settings: Mapping[str, Any]) -> list[str]:
    """`memory.name=value` overrides that set `settings`."""
    return [f"{SECTION}.{name}={value}" for name, value in settings.items()]


def overridden(overrides: Iterable[str]) -> set[str]:
    """The settings `key=value` overrides set (`memory.token_chunks=4` -> token_chunks)."""
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    return {name for name in _OPTIONS if f"{SECTION}.{name}" in keys}


def apply(
    transformer, memory: MemorySettings, device, training: bool = False, previous: MemorySettings | None = None
) -> None:
    """Put `memory`'s transformer mechanisms on `transformer`, in the order they need: token chunking first (hooks
    keep the forward they wrap), then checkpoint segments (training), then block swap (after a training model's fp32
    masters exist, before a pipeline's offload hooks). `previous`: the settings the transformer runs with now (an
    out-of-memory re-plan changes them on the loaded model; offload hooks must be off). The quantized base and offload
    are the loader's and the pipeline's."""
    from .block_swap import disable_block_swap, enable_block_swap
    from .token_chunking import enable_token_chunking

    old = previous or MemorySettings()
    if memory.token_chunks != old.token_chunks:
        enable_token_chunking(transformer, memory.token_chunks)
    if training and (
        previous is None
        or (memory.checkpointing, memory.checkpoint_every)
        != (
            old.checkpointing,
            old.checkpoint_every,
        )
    ):
        if memory.checkpointing == "off":
            transformer.disable_gradient_checkpointing()
        else:
            from .train.checkpoint_segments import enable_checkpoint_segments

            enable_checkpoint_segments(transformer, memory.checkpoint_every)
    if previous is None or memory.blocks_to_swap != old.blocks_to_swap:
        disable_block_swap(transformer)
        enable_block_swap(transformer, memory.blocks_to_swap, device)


_OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in dataclasses.fields(MemorySettings)}
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(MemorySettings)}
