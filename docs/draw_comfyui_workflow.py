"""Draw a shipped ComfyUI workflow (urae_lite/comfyui/workflows/*.json) as a small PNG: boxes = nodes at their
canvas positions with their settings, arrows = links. Regenerates docs/images/comfyui_4k_workflow.png:

    python docs/draw_comfyui_workflow.py urae_4k.json docs/images/comfyui_4k_workflow.png
"""

from __future__ import annotations

import json
import sys
import textwrap
from importlib import resources

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

COLORS = {"MODEL": "#b39ddb", "CLIP": "#ffd54f", "VAE": "#ef9a9a", "CONDITIONING": "#ffb74d", "LATENT": "#f48fb1"}
OURS = "#c8e6c9"
BOX_H = 80


def _label(node: dict) -> str:
    title = node.get("title", node["type"])
    values = [v for v in node.get("widgets_values", []) if v not in ("", "default", "fixed")]
    lines = textwrap.wrap(", ".join(str(v) for v in values), 34, max_lines=2, placeholder=" …")
    return "\n".join([title, *lines])


def draw(name: str, out: str) -> None:
    workflow = json.loads((resources.files("urae_lite.comfyui") / "workflows" / name).read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    fig, ax = plt.subplots(figsize=(11, 4.4), dpi=80)
    for n in nodes.values():
        x, y = n["pos"]
        ours = n["type"].startswith("Urae")
        ax.add_patch(
            FancyBboxPatch(
                (x, y),
                320,
                BOX_H,
                boxstyle="round,pad=4",
                fc=OURS if ours else "#eceff1",
                ec="#2e7d32" if ours else "#607d8b",
                lw=1.6 if ours else 1.0,
            )
        )
        ax.text(x + 160, y + BOX_H / 2, _label(n), ha="center", va="center", fontsize=7)
    for _, src, _, dst, _, kind in workflow["links"]:
        (x0, y0), (x1, y1) = nodes[src]["pos"], nodes[dst]["pos"]
        ax.add_patch(
            FancyArrowPatch(
                (x0 + 324, y0 + BOX_H / 2),
                (x1 - 4, y1 + BOX_H / 2),
                arrowstyle="-|>",
                mutation_scale=10,
                color=COLORS.get(kind, "#90a4ae"),
                lw=1.4,
                connectionstyle="arc3,rad=0.08",
            )
        )
    xs = [n["pos"][0] for n in nodes.values()]
    ys = [n["pos"][1] for n in nodes.values()]
    ax.set_xlim(min(xs) - 20, max(xs) + 350)
    ax.set_ylim(max(ys) + BOX_H + 20, min(ys) - 40)  # canvas y grows downwards
    ax.set_axis_off()
    handles = [plt.Line2D([], [], color=c, lw=2, label=k) for k, c in COLORS.items()]
    ax.legend(handles=handles, loc="lower right", fontsize=7, frameon=False, ncol=5)
    ax.set_title(f"{name}: green = URAE nodes", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    draw(*sys.argv[1:3])
