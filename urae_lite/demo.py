"""`urae-lite demo`: the whole product path on the tiny offline FLUX, in well under a minute on a laptop CPU.

Streams the tiny transformer into an NF4 base, attaches a URAE minor-component adapter (rank 4, initialised from
the base's smallest singular triplets, as the 4K recipe starts), generates at an ultra size (2048² by default)
with proportional attention, NTK RoPE and the static time shift, decodes with the exact tiled VAE forced on,
and writes the PNG (settings in its metadata) and the time/memory report. Strips of 512 rows: on a CPU the
tiled decode's per-strip overhead dominates at small strips (the image is the same for any strip height).
"""

from __future__ import annotations

import os
from pathlib import Path

from .destinations import check_output_file, write_with_fallback
from .minor import MinorSpec
from .report import RunReport

DEMO_PROMPT = "a photo of a red fox in a snowy forest at golden hour, high resolution, detailed"


def run_demo(
    out: str | os.PathLike = "urae_lite_demo.png",
    size: int = 2048,
    steps: int = 2,
    quant: str = "nf4",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    from .pipeline import load_pipeline

    check_output_file(out)
    report = RunReport()
    pipe = load_pipeline(
        "tiny",
        memory={"quant": quant, "vae_tiling": "on", "vae_strip_rows": 512},
        preset="2k",
        minor=MinorSpec(rank=4, trainable=False),
        progress=progress,
        report=report,
        width=size,
        height=size,
        steps=steps,
        ntk=10.0,
        proportional_attention=True,
    )
    result = pipe(DEMO_PROMPT, seed=seed, report=report)
    with report.stage("save png"):
        path = write_with_fallback(out, result.save, "image")
    n_adapted = sum(1 for m in pipe.transformer.modules() if getattr(m, "slices", None))
    print(
        f"wrote {path}: {size}x{size}, tiny FLUX with a {quant} base and a rank-4 minor-component adapter on "
        f"{n_adapted} linears, {steps} steps, proportional attention + NTK x10 + static shift "
        f"{result.settings.shift}, exact tiled VAE"
    )
    print(report.format())
    return path
