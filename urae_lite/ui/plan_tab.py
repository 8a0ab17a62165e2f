"""The Plan tab: `urae-lite plan` itself (its parser and command), shown as the per-phase table and a bar per phase
against the card, and returned as the numbers `plan --json` prints."""

from __future__ import annotations

import html
import json

from ..errors import UraeError
from ..memory import TASKS
from .commands import command_line, run_command
from .context import blank, number, one_line_errors, whole

GiB = 2**30
MEMORY_FIELDS = (  # (option, choices; None = a whole number)
    ("quant", ("nf4", "fp8", "bf16")),
    ("offload", ("none", "model", "group", "sequential")),
    ("t5-quant", ("bf16", "nf4")),
    ("blocks-to-swap", None),
    ("token-chunks", None),
    ("checkpointing", ("on", "cpu", "off")),
    ("checkpoint-every", None),
    ("vae-tiling", ("auto", "on", "off")),
)
PICK = "pick for me"


def plan_argv(task, resolution, width, height, variant, vram, ram, memory: dict) -> list[str]:
    """`plan ...` for the tab's fields (`--json` left to the caller)."""
    argv = ["plan", "--task", task or "generate"]
    for option, value in (("resolution", resolution), ("width", width), ("height", height)):
        if whole(value, option) is not None:
            argv += [f"--{option}", str(whole(value, option))]
    if blank(variant) is not None:
        argv += ["--variant", variant]
    card, host = number(vram, "card memory"), number(ram, "host memory")
    if host is not None and card is None:  # `plan --ram` is read only with --vram: not dropped silently
        raise UraeError("host memory is planned with a card: type the card's memory (GiB) too, or clear host memory")
    if card is not None:
        argv += ["--vram", f"{card:g}"] + (["--ram", f"{host:g}"] if host is not None else [])
    for option, value in memory.items():
        if blank(value) is not None:
            choices = dict(MEMORY_FIELDS)[option]
            argv += [f"--{option}", str(value if choices else whole(value, option.replace("-", " ")))]
    return argv


def chart(numbers: dict) -> str:
    """One bar per phase (what the card must hold in it) against the card's size when there is one."""
    planned = numbers["fitting"][0] if "fitting" in numbers else numbers
    card = numbers.get("vram_gib")
    totals = [t / GiB for t in planned["totals"]]
    scale = max([*totals, card or 0]) or 1
    rows = []
    for phase, total in zip(planned["phases"], totals):
        over = card is not None and total > card
        colour = "#d9534f" if over else "#5cb85c" if card is not None else "#5b8def"
        rows.append(
            f"<div style='display:flex;align-items:center;gap:8px;margin:3px 0'>"
            f"<span style='width:140px'>{html.escape(phase)}</span>"
            f"<div style='position:relative;flex:1;height:18px;background:#eee'>"
            f"<div style='width:{100 * total / scale:.1f}%;height:100%;background:{colour}'></div>"
            + (
                f"<div title='card' style='position:absolute;top:-3px;bottom:-3px;left:{100 * card / scale:.1f}%;"
                f"border-left:2px dashed #333'></div>"
                if card is not None
                else ""
            )
            + f"</div><span style='width:80px;text-align:right'>{total:.2f} GiB</span></div>"
        )
    legend = f"dashed line: the card ({card:g} GiB)" if card is not None else "no card given: peaks only"
    return f"<div id='plan-chart'>{''.join(rows)}<small>{legend}</small></div>"


def build(ctx) -> None:
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=2):
            task = gr.Radio(list(TASKS), value="generate", label="Task")
            with gr.Row():
                resolution = gr.Number(2048, precision=0, label="Resolution (side, px)")
                width = gr.Textbox(label="Width (overrides)")
                height = gr.Textbox(label="Height (overrides)")
                variant = gr.Dropdown([PICK, "dev", "schnell"], value=PICK, label="FLUX.1")
            with gr.Row():
                vram = gr.Textbox(label="Card memory (GiB; empty: the table only)")
                ram = gr.Textbox(label="Host memory (GiB)")
            with gr.Accordion("Memory settings (pick for me: the planner searches them)", open=False):
                fields = []
                for option, choices in MEMORY_FIELDS:
                    label = option.replace("-", " ")
                    fields.append(
                        gr.Dropdown([PICK, *choices], value=PICK, label=label)
                        if choices
                        else gr.Textbox(label=f"{label} (empty: pick for me)")
                    )
            go = gr.Button("Plan", variant="primary")
        with gr.Column(scale=3):
            bars = gr.HTML()
            table = gr.Textbox(label="urae-lite plan", lines=18, elem_id="plan-table", elem_classes=["mono"])
            numbers = gr.JSON(label="plan --json")

    @one_line_errors
    def plan(task, resolution, width, height, variant, vram, ram, quant, offload, t5_quant, blocks_to_swap,
             token_chunks, checkpointing, checkpoint_every, vae_tiling):  # fmt: skip
        memory = [quant, offload, t5_quant, blocks_to_swap, token_chunks, checkpointing, checkpoint_every, vae_tiling]
        argv = plan_argv(task, resolution, width, height, variant, vram, ram, dict(zip(dict(MEMORY_FIELDS), memory)))
        text = run_command(argv)
        result = json.loads(run_command([*argv, "--json"]))
        return chart(result), f"$ {command_line(argv)}\n{text}", result

    go.click(plan, [task, resolution, width, height, variant, vram, ram, *fields], [bars, table, numbers],
             api_name="plan")  # fmt: skip
