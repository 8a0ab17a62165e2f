"""`urae-lite` command line: one subcommand per job; user mistakes end in one line and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import console
from .errors import UraeError
from .quant import QUANT_FORMATS

QUANT_CHOICES = "{" + ",".join(QUANT_FORMATS) + "}"  # checked where it is used, with the same one-line error


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(out=args.out, size=args.size, steps=args.steps, quant=args.quant, seed=args.seed)


def _cmd_prepare(args: argparse.Namespace) -> None:
    from .prepare import prepare
    from .report import RunReport

    report = RunReport()
    with report.stage("prepare"):
        out = prepare(args.model, args.out, quant=args.quant, device=args.device, base_pipeline=args.base_pipeline)
    print(f"wrote {out}")
    print(report.format())


def _cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert_urae_4k

    out = convert_urae_4k(
        args.model,
        args.adapter_2k,
        args.adapter_4k,
        args.out,
        svd_device=args.svd_device,
        fmt=args.format,
        base_pipeline=args.base_pipeline,
    )
    print(f"wrote {out}")


def _cmd_tiny(args: argparse.Namespace) -> None:
    from .destinations import check_output_dir
    from .tiny import build_tiny_flux

    check_output_dir(args.out)
    print(build_tiny_flux(args.out, seed=args.seed, variant=args.variant, overwrite=args.overwrite))


# Feature modules that add their own subcommands: each has `register(subparsers)` setting `func`.
FEATURE_MODULES: tuple[str, ...] = (
    "urae_lite.train_cli",
    "urae_lite.generate",
    "urae_lite.plan.cli",
    "urae_lite.export",
    "urae_lite.doctor",
    "urae_lite.comfyui.install",
    "urae_lite.ui.cli",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="urae-lite", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in FEATURE_MODULES:
        importlib.import_module(module).register(sub)

    p = sub.add_parser("demo", help="tiny FLUX: quantize, adapt, generate at high resolution, report memory")
    p.add_argument("--out", default="urae_lite_demo.png")
    p.add_argument("--size", type=int, default=2048, help="image side in pixels (multiple of 16)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--quant", default="nf4", metavar=QUANT_CHOICES, help="frozen base format (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("prepare", help="quantize a FLUX transformer once and save it")
    p.add_argument(
        "--model", required=True, help="diffusers FLUX folder, hub id, single FLUX transformer .safetensors, or 'tiny'"
    )
    p.add_argument(
        "--base-pipeline",
        help="with a single file as --model: the diffusers FLUX folder or hub id it "
        "belongs to (only its transformer/config.json is read; default: FLUX.1 defaults)",
    )
    p.add_argument("--quant", default="nf4", metavar=QUANT_CHOICES, help="frozen base format (default %(default)s)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", help="where to quantize (cuda is much faster)")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("convert", help="the authors' 4K adapter -> one exact plain LoRA for this base")
    p.add_argument("adapter_2k", help="urae_2k_adapter.safetensors")
    p.add_argument("adapter_4k", help="urae_4k_adapter.safetensors")
    p.add_argument(
        "--model",
        required=True,
        help="the FLUX base the adapters are used with (diffusers folder, hub id, or single transformer .safetensors)",
    )
    p.add_argument(
        "--base-pipeline",
        help="with a single file as --model: the diffusers FLUX folder or hub id it "
        "belongs to (only its transformer/config.json is read; default: FLUX.1 defaults)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--svd-device", default=None, help="device for the SVDs (e.g. cuda)")
    p.add_argument(
        "--format",
        choices=("diffusers", "kohya"),
        default="diffusers",
        help="diffusers keys, or kohya keys for ComfyUI / Forge (default: %(default)s)",
    )
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("tiny", help="build the tiny offline FLUX model folder (for tests and the demo)")
    p.add_argument("--out", required=True)
    p.add_argument("--variant", choices=("dev", "schnell"), default="dev")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_tiny)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command line, with `key=value` overrides accepted after options too (`cache DIR --check data.x=y`):
    argparse gives a positional list only the words before the first option."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        args.overrides += overrides
        extra = [a for a in extra if a not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the subcommand
    console.setup(debug)
    try:
        args = _parse([a for a in argv if a != "--debug"])
        args.func(args)
        sys.stdout.flush()  # here, so a closed pipe is caught below and not at interpreter exit
    except BrokenPipeError:  # `urae-lite ... | head`: the reader left; stop quietly (CPython's signal docs)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the final flush at exit writes to /dev/null, not the closed pipe
        return 1
    except UraeError as e:
        if debug:
            raise
        print(f"urae-lite: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("urae-lite: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
