"""`urae-lite ui`: a local web page for generate, plan and train (Gradio, the optional `ui` extra).

Every module here that needs Gradio imports it inside its functions, so `urae-lite --help` and the rest of the CLI
work without the extra; `urae-lite ui` without it ends in one line naming the install command.
"""
