"""The page: one Gradio Blocks with the Generate, Plan and Train tabs, and its queue (one device job at a time)."""

from __future__ import annotations

from .context import UiContext

TITLE = "urae-lite"
CSS = ".mono textarea { font-family: ui-monospace, monospace; }"  # the CLI's tables keep their columns


def build_app(ctx: UiContext):
    """The Blocks app (not launched). Device jobs (generate, start/resume training) share one queue slot
    (`concurrency_id="device"`, limit 1): others wait, with their position shown."""
    import gradio as gr

    from . import generate_tab, plan_tab, train_tab

    device = "CUDA" if ctx.cuda else "the CPU (no CUDA device found)"
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(
            f"## urae-lite: 2K/4K FLUX on one card\nGenerating on {device}. The page reads and writes only in: "
            f"{ctx.folders.describe()}."
        )
        with gr.Tab("Generate"):
            generate_tab.build(ctx)
        with gr.Tab("Plan"):
            plan_tab.build(ctx)
        with gr.Tab("Train"):
            train_tab.build(ctx)
    app.queue(default_concurrency_limit=1)
    return app
