"""`urae-lite doctor`: the first thing to run on a new card, and what to attach to a bug report.

It prints the device, its free and total memory, host RAM and the versions that matter; whether the kernels run and
why; checks every kernel op in bf16, fp16 and fp32 against its reference on this device (at a small odd shape, at the
self-check's shape, whose results replace the cached self-check verdicts, and at one FLUX shape) with the error, its
bound and the fused ÷ reference time; runs a 2-block FLUX-shaped model forward and backward with the kernels on and
off and compares; and gives the planner's settings for this card and this RAM. It exits non-zero if any check fails.
Without a GPU the checks run in Triton's CPU interpreter at the small odd shapes.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from .errors import UraeError

GiB = 2**30
VERSIONS = ("torch", "triton", "bitsandbytes", "optimum-quanto", "diffusers", "transformers")  # distributions
TASKS = (("generate", 2048), ("generate", 4096), ("train", 2048), ("train", 4096))
# End to end, kernels on vs off (relative error of the whole output, and of all adapter gradients together). In bf16
# the two paths round in different places (the kernel adds the branch and bias in fp32 before one rounding), which
# tests/test_kernel_path.py measures at up to 2% / 3% through 4 tiny blocks; a wrong kernel is off by its whole size.
E2E_OUTPUT_BOUND, E2E_GRAD_BOUND = 2e-2, 5e-2
E2E_RANK = 16


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this machine: device, versions, every kernel against its reference, a 2-block model with the "
        "kernels on and off, and the planner's settings for it",
        description=__doc__,
    )
    p.add_argument("--json", metavar="FILE", help="also write everything to FILE (attach it to a bug report)")
    p.add_argument("--device", help="the device to check (default: cuda when there is a GPU, else the CPU)")
    p.set_defaults(func=run)


# ---- the interpreter on a machine without a GPU -------------------------------------------------------------------
def _needs_reexec(device: torch.device) -> bool:
    """On the CPU the kernels only run in Triton's interpreter, chosen when urae_lite.kernels is first imported:
    set TRITON_INTERPRET=1 now if nothing imported them yet, else (True) this process must start again with it."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if "urae_lite.kernels" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return False
    return True


def _reexec(args: argparse.Namespace) -> None:
    argv = [
        "doctor",
        *(["--json", args.json] if args.json else []),
        *(["--device", args.device] if args.device else []),
    ]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    raise SystemExit(subprocess.call([sys.executable, "-m", "urae_lite.cli", *argv], env=env))


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UraeError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__})")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    elif device.type != "cpu":
        raise UraeError(f"--device {name}: doctor checks a CUDA GPU or the CPU")
    return device


# ---- what this machine is -----------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Device, memory and versions: the first lines of a bug report."""
    import psutil

    from .version import __version__

    ram = psutil.virtual_memory()
    env: dict = {
        "device": "cpu",
        "capability": None,
        "vram_free_gib": None,
        "vram_total_gib": None,
        "ram_total_gib": ram.total / GiB,
        "ram_available_gib": ram.available / GiB,
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "versions": {dist: _version(dist) for dist in VERSIONS} | {"urae-lite": __version__},
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        env |= {
            "device": torch.cuda.get_device_name(device),
            "capability": "{}.{}".format(*torch.cuda.get_device_capability(device)),
            "vram_free_gib": free / GiB,
            "vram_total_gib": total / GiB,
        }
    return env


def kernel_status(device: torch.device) -> dict:
    """Whether the kernels run on `device` in this environment, why, and the self-check verdicts cached for it."""
    from . import kernel_verdicts
    from .kernel_switch import KERNELS_ENV, auto_runs_kernels, kernels_mode, triton_available

    mode = kernels_mode()
    status: dict = {"mode": mode, "env": os.environ.get(KERNELS_ENV), "triton": triton_available()}
    if not status["triton"]:
        status["why"] = "Triton is not installed: the PyTorch path runs"
        return status
    from .kernels import interpreting

    status["interpreter"] = interpreting()
    if auto_runs_kernels(device):  # the self-check runs (and its verdicts are kept) where auto runs the kernels
        status["verdict_file"] = str(kernel_verdicts.verdict_path(kernel_verdicts.device_key(device)))
        status["verdicts"] = kernel_verdicts.cached(device)
    if mode == "off":
        status["why"] = f"{KERNELS_ENV}=off: never (the PyTorch path runs)"
    elif mode == "on":
        status["why"] = f"{KERNELS_ENV}=on: forced for every tensor, without self-check"
    elif auto_runs_kernels(device):
        status["why"] = "auto: on for CUDA tensors, each op once it has passed its self-check on this card"
    else:
        status["why"] = (
            "auto: off on the CPU (the kernels run on CUDA only); doctor checks them in Triton's interpreter"
        )
    if interpreting() and device.type == "cuda":
        status["why"] += "; TRITON_INTERPRET=1 is set, so they run in Triton's CPU interpreter: unset it"
    return status


# ---- the checks -------------------------------------------------------------------------------------------------
def op_checks(device: torch.device, sets: tuple[str, ...], report) -> tuple[dict[str, list], list[str]]:
    """Every op in every dtype at each shape set (kernel_check.shapes); (results by set, skipped notes)."""
    from .kernel_check import DTYPES, OPS, check_op, shapes

    results: dict[str, list] = {}
    skipped = []
    for which in sets:
        repeats = 0 if device.type != "cuda" else 10 if which == "flux" else 5  # interpreter times mean nothing
        results[which] = []
        for op in OPS:
            for shape in shapes(op, which):
                for dtype in DTYPES:
                    try:
                        results[which].append(report(check_op(op, device, dtype, shape, repeats=repeats)))
                    except torch.cuda.OutOfMemoryError:
                        skipped.append(f"{op} {_dtype(dtype)} {_shape(shape)}: out of device memory")
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
    return results, skipped


def _flux_inputs(config: dict, image: tuple[int, int], text: int, device: torch.device, gen: torch.Generator) -> dict:
    """Valid FluxTransformer2DModel inputs: packed latents on an (h, w) token grid, text embeddings, their ids."""
    h, w = image
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, torch.bfloat16)

    inputs = {
        "hidden_states": randn(1, h * w, config["in_channels"]),
        "encoder_hidden_states": randn(1, text, config["joint_attention_dim"]),
        "pooled_projections": randn(1, config["pooled_projection_dim"]),
        "timestep": torch.tensor([0.7], device=device),
        "img_ids": ids.reshape(h * w, 3).to(device),
        "txt_ids": torch.zeros(text, 3, device=device),
    }
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.tensor([3.5], device=device)
    return inputs


def end_to_end(device: torch.device, quant: str, full: bool) -> dict:
    """A FLUX model of one double and one single block (`full`: FLUX.1's widths and 4608 tokens, else the tiny
    model's widths and 31 tokens, for Triton's interpreter), NF4 or FP8 base and a rank-16 LoRA, forward and
    backward in bf16 with the kernels forced on, then off."""
    from .adapted_linear import AdaptedLinear
    from .flux_configs import flux_dev_config
    from .kernel_switch import KERNELS_ENV
    from .loader import LoadSpec, add_lora, empty_transformer, fill_transformer
    from .tiny import iter_random_transformer_tensors, tiny_transformer_config

    cuda = device.type == "cuda"
    config = (flux_dev_config() if full else tiny_transformer_config()) | {"num_layers": 1, "num_single_layers": 1}
    image, text = ((64, 64), 512) if full else ((4, 6), 7)  # full: a 1024² image and FLUX.1's 512 T5 tokens
    out = {"quant": quant, "hidden": config["num_attention_heads"] * config["attention_head_dim"]}
    out |= {"tokens": image[0] * image[1] + text, "output_bound": E2E_OUTPUT_BOUND, "grad_bound": E2E_GRAD_BOUND}
    before = os.environ.get(KERNELS_ENV)
    try:
        model = empty_transformer(config)
        tensors = iter_random_transformer_tensors(config, seed=0, dtype=torch.bfloat16, device=device)
        fill_transformer(model, tensors, LoadSpec(quant, device, torch.bfloat16, progress=False))
        add_lora(model, "doctor", E2E_RANK, targets="all", seed=0)
        gen = torch.Generator().manual_seed(0)
        for layer in model.modules():
            if isinstance(layer, AdaptedLinear):  # a non-zero B, so that A has gradients too
                b = layer.slices["doctor"].B
                b.data.copy_(torch.randn(b.shape, generator=gen) * 0.05)
        inputs = _flux_inputs(config, image, text, device, gen)

        def step(mode: str) -> tuple[torch.Tensor, torch.Tensor, float]:
            os.environ[KERNELS_ENV] = mode
            model.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            y = model(**inputs, return_dict=False)[0]
            y.float().square().mean().backward()
            _sync(device)
            seconds = time.perf_counter() - start
            grads = [p.grad.float().flatten() for p in model.parameters() if p.requires_grad]
            return y.detach().float(), torch.cat(grads), seconds

        runs = {}
        for mode in ("off", "on"):
            if cuda:
                step(mode)  # warm-up: compiles and autotunes the kernels
            runs[mode] = step(mode)
        (y_off, g_off, t_off), (y_on, g_on, t_on) = runs["off"], runs["on"]
        out["output_error"] = _relative(y_on, y_off)
        out["grad_error"] = _relative(g_on, g_off)
        out["seconds_on"], out["seconds_off"] = t_on, t_off
        out["ok"] = out["output_error"] <= E2E_OUTPUT_BOUND and out["grad_error"] <= E2E_GRAD_BOUND
        out["message"] = "" if out["ok"] else "kernels on and off disagree beyond rounding"
    except torch.cuda.OutOfMemoryError as e:
        out |= {"ok": None, "message": f"skipped: out of device memory ({str(e).splitlines()[0][:200]})"}
    except Exception as e:  # a kernel that raises in the model is a failed check, reported with the others
        out |= {"ok": False, "message": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
    finally:
        if before is None:
            os.environ.pop(KERNELS_ENV, None)
        else:
            os.environ[KERNELS_ENV] = before
        if cuda:
            torch.cuda.empty_cache()
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the planner's advice ---------------------------------------------------------------------------------------
def planner_advice(vram_gib: float, ram_gib: float) -> list[dict]:
    """`best_config` for generate and train at 2048² and 4096² on a `vram_gib` card with `ram_gib` of host memory."""
    from .memory import searched
    from .plan.job import PlanConfig
    from .plan.recipe import recipe_file_job, shipped_recipe
    from .plan.search import best_config

    advice = []
    for task, size in TASKS:
        item: dict = {"task": task, "size": size}
        try:
            if task == "generate":
                job = PlanConfig(task=task, width=size, height=size)
            else:
                job = recipe_file_job(shipped_recipe(size)).replace(width=size, height=size)
            result = best_config(job, vram_gib, ram_gib)
        except UraeError as e:
            advice.append(item | {"settings": None, "message": str(e)})
            continue
        best = result.best
        if best is None:
            advice.append(item | {"settings": None, "message": result.impossible()})
            continue
        item["settings"] = best.config.memory.describe(task, searched(task))
        item |= {"peak_gib": best.peak / GiB, "host_gib": best.estimate.host / GiB, "message": ""}
        advice.append(item)
    return advice


# ---- the command ------------------------------------------------------------------------------------------------
def _dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _check_line(r) -> str:
    ratio = "-" if r.time_ratio is None else f"{r.time_ratio:.2f}x"
    verdict = "ok" if r.ok else "FAIL"
    line = (
        f"  {r.op:<17} {r.dtype:<9} {_shape(r.shape):<18} {r.error:<10.3g} {r.bound:<10.3g} "
        f"{_ms(r.fused_ms):>8} {_ms(r.reference_ms):>8} {ratio:>7}  {verdict}"
    )
    return f"{line}  {r.message}" if r.message else line


def _json_safe(value):
    """JSON without Infinity/NaN, which strict readers reject: non-finite numbers become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def run(args: argparse.Namespace) -> None:
    device = _device(args.device)
    if _needs_reexec(device):
        _reexec(args)
    from .kernel_switch import triton_available

    print("urae-lite doctor")
    env = environment(device)
    if device.type == "cuda":
        print(
            f"device      {env['device']} (compute capability {env['capability']}), {env['vram_free_gib']:.1f} of "
            f"{env['vram_total_gib']:.1f} GiB free"
        )
    else:
        print("device      cpu: the kernels are checked in Triton's interpreter, at small shapes")
    print(f"host RAM    {env['ram_total_gib']:.1f} GiB ({env['ram_available_gib']:.1f} GiB available)")
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in env["versions"].items())
    print(f"versions    {versions}; CUDA {env['cuda'] or '-'}; {env['platform']}")
    status = kernel_status(device)
    print(f"kernels     {status['why']}")
    for op, by_dtype in status.get("verdicts", {}).items():
        cached = ", ".join(f"{dt} {'ok' if v.get('ok') else 'FAILED'}" for dt, v in by_dtype.items())
        print(f"            self-check {op}: {cached}")
    if status.get("verdicts"):
        print(f"            (cached in {status['verdict_file']})")

    report: dict = {"environment": env, "kernels": status, "checks": [], "skipped": [], "end_to_end": []}
    if triton_available():
        from . import kernel_verdicts
        from .kernels import interpreting

        gpu = device.type == "cuda" and not interpreting()
        if not gpu:
            report["skipped"].append(
                "the self-check's and FLUX shapes: they need a GPU (Triton's interpreter would take hours)"
            )
        print("checks      fused kernel vs reference (error <= bound; times in ms; fused ÷ reference)")
        print(
            f"  {'op':<17} {'dtype':<9} {'shape':<18} {'error':<10} {'bound':<10} {'fused':>8} {'ref':>8} {'ratio':>7}"
        )

        def show(result):
            print(_check_line(result), flush=True)
            return result

        results, skipped = op_checks(device, ("small", "self-check", "flux") if gpu else ("small",), show)
        report["checks"] = [r.as_dict() | {"shapes": which} for which, rs in results.items() for r in rs]
        report["skipped"] += skipped
        if gpu:  # the self-check's own results replace its cached verdicts (a fixed failure stops bypassing)
            path = kernel_verdicts.record(device, results["self-check"])
            if path:
                print(f"            self-check verdicts rewritten in {path}")
        print("end to end  2-block FLUX model, bf16, rank-16 LoRA, forward + backward, kernels on vs off")
        quants = ("nf4", "fp8") if gpu else ("nf4",)
        if not gpu:
            report["skipped"].append("end to end at full width and with an fp8 base: compiled kernels on a GPU only")
        for quant in quants:
            e2e = end_to_end(device, quant, full=gpu)
            report["end_to_end"].append(e2e)
            verdict = {True: "ok", False: "FAIL", None: "skipped"}[e2e["ok"]]
            if "output_error" in e2e:
                print(
                    f"  {quant}: hidden {e2e['hidden']}, {e2e['tokens']} tokens: output {e2e['output_error']:.2%} "
                    f"(<= {E2E_OUTPUT_BOUND:.0%}), gradients {e2e['grad_error']:.2%} (<= {E2E_GRAD_BOUND:.0%}), "
                    f"{e2e['seconds_on'] * 1e3:.0f} ms on, {e2e['seconds_off'] * 1e3:.0f} ms off  {verdict}  "
                    f"{e2e['message']}".rstrip()
                )
            else:
                print(f"  {quant}: {verdict}: {e2e['message']}")
    else:
        report["skipped"].append("kernel checks and end to end: Triton is not installed")
    for note in report["skipped"]:
        print(f"skipped     {note}")

    if device.type == "cuda":
        from .plan.choose import this_machine_ram_gib

        vram, ram = env["vram_total_gib"], this_machine_ram_gib()
        print(f"advice      the planner's settings for {vram:.0f} GiB of GPU memory and {ram:.0f} GiB of host memory:")
        report["advice"] = planner_advice(vram, ram)
        for item in report["advice"]:
            what = item["settings"] or item["message"]
            print(f"  {item['task']} {item['size']}x{item['size']}: {what}")
    else:
        report["advice"] = []
        print("advice      no GPU to plan for (`urae-lite plan --vram N` plans for a card you name)")

    failures = [f"{c['op']} {c['dtype']} {_shape(c['shape'])}" for c in report["checks"] if not c["ok"]]
    failures += [f"end to end {e['quant']}" for e in report["end_to_end"] if e["ok"] is False]
    report["failures"], report["ok"] = failures, not failures
    if args.json:
        from .safetensors_io import write_json

        print(f"wrote {write_json(Path(args.json), _json_safe(report))}")
    if failures:
        attach = args.json or "this output (or `urae-lite doctor --json FILE`)"
        raise UraeError(f"{len(failures)} check(s) failed: {'; '.join(failures)}. Attach {attach} to a bug report")
    print("all checks passed")
