"""The Train tab: start `urae-lite train` on a dataset with a recipe and overrides (or cache the dataset first),
watch any run folder (loss.png, samples.png, log.jsonl, ETA), and steer the run (safe stop, sample now, resume)."""

from __future__ import annotations

import json

from .commands import command_line
from .context import UiContext, one_line_errors
from .train_runs import SHIPPED, eta_seconds, format_eta, read_log, total_steps

CHARTS = {"loss.png": "the loss chart", "samples.png": "the samples contact sheet"}


def watch_run(ctx: UiContext, run: str) -> tuple[str | None, str | None, str, str]:
    """loss.png, samples.png (None while absent), log.jsonl's tail and the run's state with its ETA."""
    folder = ctx.folders.inside(run, "runs")
    records = read_log(folder)
    steps = total_steps(folder)
    images = [str(folder / name) if (folder / name).is_file() else None for name in CHARTS]
    missing = [f"no {name} yet ({what}: written at each validation)" for (name, what), image in
               zip(CHARTS.items(), images) if image is None]  # fmt: skip
    step = records[-1].get("step") if records else None
    state = [
        f"**{folder.name}**: {ctx.runs.status(folder)}",
        f"step {step if step is not None else 0} of {steps if steps is not None else '?'}"
        + (f"; {format_eta(eta_seconds(records, steps))}" if ctx.runs.running(folder) else ""),  # none once ended
        *missing,
    ]
    console = ctx.runs.console_tail(folder)
    if console:
        state.append(f"```\n{console}\n```")
    log = "\n".join(json.dumps(r) for r in records[-12:]) if records else "no log.jsonl yet"
    return images[0], images[1], log, "\n\n".join(state)


def build(ctx: UiContext) -> None:
    import gradio as gr

    def run_folders():
        return ctx.folders.listing("runs", "**/config.yaml")

    def recipes():
        return [*SHIPPED, *ctx.folders.listing("runs", "*.yaml")]

    with gr.Row():
        with gr.Column():
            gr.Markdown("### Start a run")
            model = gr.Dropdown(ctx.models, value=ctx.models[0], label="Model")
            dataset = gr.Dropdown(
                ctx.folders.listing("datasets", "*", folders=True),
                allow_custom_value=True,
                label="Dataset folder (inside the datasets folder)",
            )
            recipe = gr.Dropdown(recipes(), value=SHIPPED[0], allow_custom_value=True, label="Recipe")
            run_name = gr.Textbox(label="Run folder (inside the runs folder)", value="my-run")
            overrides = gr.Textbox(label="Overrides (key=value, one a line)", lines=4, placeholder="training.steps=500")
            resolution = gr.Number(2048, precision=0, label="Cache resolution")
            with gr.Row():
                cache = gr.Button("Cache the dataset")
                start = gr.Button("Start training", variant="primary")
            started = gr.Markdown()
        with gr.Column():
            gr.Markdown("### Watch a run")
            with gr.Row():
                watched = gr.Dropdown([], allow_custom_value=True, label="Run folder", scale=4)
                refresh = gr.Button("↻", scale=0)
            with gr.Row():
                stop = gr.Button("Stop (safe)")
                sample = gr.Button("Sample now")
                resume = gr.Button("Resume")
            state = gr.Markdown()
            with gr.Row():
                loss = gr.Image(label="loss.png", type="filepath", interactive=False)
                samples = gr.Image(label="samples.png", type="filepath", interactive=False)
            log = gr.Textbox(label="log.jsonl (last lines)", lines=8, elem_classes=["mono"])
    timer = gr.Timer(3.0)

    def claim_device() -> None:
        """One job on the device: refused while a run is going; the loaded pipeline's memory is freed for it."""
        busy = ctx.runs.active()
        if busy:
            raise gr.Error(busy, print_exception=False)
        ctx.session.unload()

    @one_line_errors
    def start_run(model, dataset, recipe, run, overrides):
        lines = [line.strip() for line in (overrides or "").splitlines() if line.strip()]
        argv, folder = ctx.runs.train_argv(recipe, dataset or "", run or "", ctx.model(model), lines)
        claim_device()
        s = ctx.runs.start(argv, folder)
        return f"started `{command_line(argv)}` (pid {s.pid})", s.name

    start.click(start_run, [model, dataset, recipe, run_name, overrides], [started, watched], api_name="train_start",
                concurrency_limit=1, concurrency_id="device")  # fmt: skip

    @one_line_errors
    def cache_dataset(model, dataset, resolution, run):
        argv = ctx.runs.cache_argv(dataset or "", ctx.model(model), resolution)
        folder = ctx.folders.inside(run or "", "runs")
        claim_device()  # the text encoders and the VAE run on the device
        s = ctx.runs.start(argv, folder)
        return f"started `{command_line(argv)}` (pid {s.pid}); its output shows under Watch"

    cache.click(cache_dataset, [model, dataset, resolution, run_name], started, api_name="train_cache",
                concurrency_limit=1, concurrency_id="device")  # fmt: skip

    @one_line_errors
    def watch(run):
        if not run:
            return None, None, "", "pick a run folder"
        return watch_run(ctx, run)

    watched.change(watch, watched, [loss, samples, log, state], api_name="train_watch", show_progress="hidden")
    timer.tick(watch, watched, [loss, samples, log, state], api_visibility="private", show_progress="hidden")

    @one_line_errors
    def stop_run(run):
        return ctx.runs.stop(ctx.folders.inside(run or "", "runs"))

    @one_line_errors
    def sample_now(run):
        return ctx.runs.sample_now(ctx.folders.inside(run or "", "runs"))

    @one_line_errors
    def resume_run(run):
        folder = ctx.folders.inside(run or "", "runs")
        argv = ctx.runs.resume_argv(folder)
        claim_device()
        s = ctx.runs.start(argv, folder)
        return f"resumed: `{command_line(argv)}` (pid {s.pid})"

    stop.click(stop_run, watched, state, api_name="train_stop")
    sample.click(sample_now, watched, state, api_name="train_sample_now")
    resume.click(resume_run, watched, state, api_name="train_resume", concurrency_limit=1, concurrency_id="device")

    def refresh_lists():
        runs = sorted({str(p.rsplit("/config.yaml", 1)[0]) for p in run_folders()} | set(ctx.runs.names()))
        return gr.update(choices=runs), gr.update(choices=ctx.folders.listing("datasets", "*", folders=True)), \
            gr.update(choices=recipes())  # fmt: skip

    refresh.click(refresh_lists, None, [watched, dataset, recipe], api_visibility="private")
    gr.on(None, refresh_lists, None, [watched, dataset, recipe], api_visibility="private")  # at each page load
