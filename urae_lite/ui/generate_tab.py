"""The Generate tab: prompt, preset or size, seed, steps, guidance, adapters, advanced settings; the planner's plan
for the card before running; progress per stage and denoising step; the image saved as `urae-lite generate` saves
it, the time per stage and peak memory; a gallery of this session's images whose settings can be reused."""

from __future__ import annotations

import time

from ..presets import PRESETS
from .commands import command_line, parse
from .context import UiContext, blank, number, one_line_errors, whole
from .generate_form import (
    ASPECTS,
    PRESET,
    REUSED,
    SIZE_MODES,
    GenerateForm,
    new_output,
    png_settings,
    reuse_fields,
)
from .session import ProgressReport

QUANTS = (PRESET, "nf4", "fp8", "bf16")
ADVANCED = (  # page field -> `urae-lite generate` option (the rest of the form is in GenerateForm)
    "t5-quant",
    "offload",
    "blocks-to-swap",
    "token-chunks",
    "vae-tiling",
    "ntk",
    "shift",
    "proportional-attention",
    "max-sequence-length",
    "refine-from",
    "strength",
)


def adapter_files(ctx: UiContext) -> list[str]:
    """The adapters folder's .safetensors files, without the 4K conversions cached there."""
    from ..adapter_cache import CONVERTED

    return [name for name in ctx.folders.listing("adapters", "**/*.safetensors") if not name.endswith(CONVERTED)]


def _form(ctx: UiContext, prompt, model, preset, quant, size_mode, aspect, long_side, width, height, seed, randomize,
          steps, guidance, adapters, advanced: dict) -> GenerateForm:  # fmt: skip
    return GenerateForm(
        prompt=prompt or "",
        model=ctx.model(model),
        preset=preset or "2k",
        size_mode=size_mode or "preset",
        aspect=aspect or "1:1",
        long_side=2048 if whole(long_side, "long side") is None else whole(long_side, "long side"),
        width=whole(width, "width"),
        height=whole(height, "height"),
        seed=whole(seed, "seed") or 0,
        randomize=bool(randomize),
        steps=whole(steps, "steps"),
        guidance=number(guidance, "guidance"),
        adapters=list(adapters or []),
        quant=quant or PRESET,
        advanced=advanced,
    )


def _advanced(t5_quant, offload, blocks_to_swap, token_chunks, vae_tiling, ntk, shift, proportional_attention,
              max_sequence_length, refine_from, strength) -> dict:  # fmt: skip
    shift = "model" if blank(shift) == "model" else number(shift, "time shift")  # model: the model's scheduler
    values = [t5_quant, offload, whole(blocks_to_swap, "blocks to swap"), whole(token_chunks, "token chunks"),
              vae_tiling, number(ntk, "NTK"), shift]  # fmt: skip
    attention = {"on": True, "off": False}.get(proportional_attention)
    values += [attention, whole(max_sequence_length, "T5 tokens"), whole(refine_from, "refine from"),
               number(strength, "refine strength")]  # fmt: skip
    return {name: blank(v) if not isinstance(v, bool) else v for name, v in zip(ADVANCED, values)}


def plan_line(ctx: UiContext, form: GenerateForm, vram, ram) -> str:
    """The planner's pick for this generation on the card: peak against the card, host memory, fit or not."""
    from ..generate import plan_on_card, resolve_job

    job = resolve_job(parse(form.argv(ctx.folders, ctx.folders.outputs / "plan.png", 0)))
    vram = number(vram, "card memory")
    if vram is None and not ctx.cuda:
        return (
            "No CUDA device here: images are made on the CPU. Type a card's memory (GiB) under Advanced to see "
            "the plan `--vram` would pick for it."
        )
    fits, line = plan_on_card(job, vram, number(ram, "host memory"))
    return f"🟢 **{line}**" if fits else f"🔴 **does not fit**: {line}"


def build(ctx: UiContext) -> None:
    """The tab's components and events (inside the app's Blocks)."""
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=5):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
            with gr.Row():
                model = gr.Dropdown(ctx.models, value=ctx.models[0], label="Model")
                preset = gr.Dropdown(list(PRESETS), value="2k", label="Preset (the model family's 2K/4K settings)")
                quant = gr.Dropdown(list(QUANTS), value=PRESET, label="Base format")
            with gr.Row():
                size_mode = gr.Radio(list(SIZE_MODES), value="preset", label="Size")
                aspect = gr.Dropdown(list(ASPECTS), value="1:1", label="Aspect ratio (W:H)")
                long_side = gr.Number(2048, precision=0, label="Long side (px; snapped to multiples of 16)")
            with gr.Row():
                width = gr.Number(1024, precision=0, label="Width")
                height = gr.Number(1024, precision=0, label="Height")
            with gr.Row():
                seed = gr.Number(0, precision=0, label="Seed")
                randomize = gr.Checkbox(False, label="Randomize seed")
                steps = gr.Textbox(label="Steps (empty: the preset's)")
                guidance = gr.Textbox(label="Guidance (empty: the preset's)")
            with gr.Row():
                adapters = gr.Dropdown(
                    adapter_files(ctx),
                    multiselect=True,
                    label="Adapters from the adapters folder, in load order (the authors' 4K right after its 2K)",
                )
                refresh = gr.Button("↻", scale=0)
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    t5_quant = gr.Dropdown([PRESET, "bf16", "nf4"], value=PRESET, label="T5 format")
                    offload = gr.Dropdown([PRESET, "none", "model", "group", "sequential"], value=PRESET,
                                          label="Offload")  # fmt: skip
                    blocks_to_swap = gr.Textbox(label="Blocks to swap")
                    token_chunks = gr.Textbox(label="Token chunks")
                    vae_tiling = gr.Dropdown([PRESET, "auto", "on", "off"], value=PRESET, label="VAE tiling")
                with gr.Row():
                    ntk = gr.Textbox(label="NTK (RoPE base multiplier)")
                    shift = gr.Textbox(label="Time shift (or model: the model's own scheduler)")
                    attention = gr.Dropdown([PRESET, "on", "off"], value=PRESET, label="Proportional attention")
                    max_len = gr.Textbox(label="T5 tokens")
                    refine_from = gr.Textbox(label="Refine from (px)")
                    strength = gr.Textbox(label="Refine strength")
                with gr.Row():
                    vram = gr.Textbox(label="Card memory to plan for (GiB; empty: this CUDA card's free memory)")
                    ram = gr.Textbox(label="Host memory for the plan (GiB; empty: 3/4 of this machine's)")
            plan = gr.Markdown(elem_id="plan")
            with gr.Row():
                check = gr.Button("Check the plan")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=4):
            image = gr.Image(label="Image", type="filepath", format="png", elem_id="image", interactive=False)
            report = gr.Textbox(
                label="Time per stage and peak memory", lines=9, elem_id="report", elem_classes=["mono"]
            )
            command = gr.Textbox(label="The same as", elem_id="command")
            details = gr.JSON(label="Details")
            gallery = gr.Gallery(label="This session's images", columns=4, format="png", elem_id="gallery")
            reuse = gr.Button("Reuse the selected image's settings")
    images = gr.State([])  # this browser session's images: PNG paths in the outputs folder
    selected = gr.State(None)

    form_inputs = [prompt, model, preset, quant, size_mode, aspect, long_side, width, height, seed, randomize, steps,
                   guidance, adapters]  # fmt: skip
    advanced_inputs = [t5_quant, offload, blocks_to_swap, token_chunks, vae_tiling, ntk, shift, attention, max_len,
                       refine_from, strength]  # fmt: skip

    @one_line_errors
    def generate(prompt, model, preset, quant, size_mode, aspect, long_side, width, height, seed, randomize, steps,
                 guidance, adapters, t5_quant, offload, blocks_to_swap, token_chunks, vae_tiling, ntk, shift,
                 proportional_attention, max_sequence_length, refine_from, strength, vram, ram, images=None,
                 progress=gr.Progress(track_tqdm=True)):  # fmt: skip  # noqa: B008 (Gradio reads it)
        started = time.time()
        advanced = _advanced(t5_quant, offload, blocks_to_swap, token_chunks, vae_tiling, ntk, shift,
                             proportional_attention, max_sequence_length, refine_from, strength)  # fmt: skip
        form = _form(ctx, prompt, model, preset, quant, size_mode, aspect, long_side, width, height, seed, randomize,
                     steps, guidance, adapters, advanced)  # fmt: skip
        use_seed = form.pick_seed()
        card, host = number(vram, "card memory"), number(ram, "host memory")
        card = None if not ctx.cuda or card is None else f"{card:g}"  # on the CPU the plan is only shown
        host = None if host is None else f"{host:g}"
        argv = form.argv(ctx.folders, new_output(ctx.folders, use_seed), use_seed, card, host)
        report = ProgressReport(on_stage=lambda name: progress(None, desc=name))
        done = ctx.session.generate(argv, report)
        images = [*(images or []), str(done.path)]
        info = {
            "saved": str(done.path),  # not "path": clients take a {"path": ...} object for a file
            "pipeline": done.pipeline,
            "settings": done.result.settings.as_dict(),
            "memory": done.result.memory.as_dict(),
            "report": report.as_dict(),
            "printed": done.printed.strip(),
            "started": started,
            "finished": time.time(),
        }
        text = "\n".join(line for line in [done.printed.strip(), report.format()] if line)
        return str(done.path), text, command_line(argv), info, images, images, use_seed

    run.click(
        generate,
        [*form_inputs, *advanced_inputs, vram, ram, images],
        [image, report, command, details, gallery, images, seed],
        api_name="generate",
        concurrency_limit=1,
        concurrency_id="device",
    )

    @one_line_errors
    def check_plan(prompt, model, preset, quant, size_mode, aspect, long_side, width, height, seed, randomize, steps,
                   guidance, adapters, t5_quant, offload, blocks_to_swap, token_chunks, vae_tiling, ntk, shift,
                   proportional_attention, max_sequence_length, refine_from, strength, vram, ram):  # fmt: skip
        advanced = _advanced(t5_quant, offload, blocks_to_swap, token_chunks, vae_tiling, ntk, shift,
                             proportional_attention, max_sequence_length, refine_from, strength)  # fmt: skip
        form = _form(ctx, prompt or "plan", model, preset, quant, size_mode, aspect, long_side, width, height, seed,
                     False, steps, guidance, adapters, advanced)  # fmt: skip
        return plan_line(ctx, form, vram, ram)

    check.click(check_plan, [*form_inputs, *advanced_inputs, vram, ram], plan, api_name="plan_preview")

    def refresh_adapters():
        return gr.update(choices=adapter_files(ctx))

    refresh.click(refresh_adapters, None, adapters, api_visibility="private")

    def select(event):
        return event.index

    select.__annotations__ = {"event": gr.SelectData}  # resolved here: Gradio passes the event by this type

    gallery.select(select, None, selected, api_visibility="private")

    @one_line_errors
    def reuse_settings(images, selected):
        if not images or selected is None:
            raise gr.Error("pick an image in the gallery first", print_exception=False)
        path = ctx.folders.inside(images[selected], "outputs")
        fields = reuse_fields(png_settings(path), ctx.folders, ctx.models)
        return tuple(fields[name] for name in REUSED)

    reused = [prompt, model, quant, size_mode, width, height, seed, randomize, steps, guidance, adapters, t5_quant, ntk,
              shift, attention, max_len, refine_from, strength]  # fmt: skip  # in REUSED's order
    reuse.click(reuse_settings, [images, selected], reused, api_visibility="private")
