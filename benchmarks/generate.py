"""Peak GPU memory and seconds per step of `urae-lite generate` on the full-size FLUX.1-dev architecture.

    python benchmarks/generate.py [--quants nf4 fp8 bf16] [--sizes 1024 2048 4096] [--steps 4] [--offload model]
                                  [--t5-quant nf4] [--blocks-to-swap N] [--token-chunks N] [--vae-tiling on]

No weights are downloaded (weight values change neither memory nor speed). The transformer is streamed tensor
by tensor from `urae_lite.tiny.iter_random_transformer_tensors(flux_dev_config(), device="cuda")` into
`empty_transformer` + `fill_transformer` (quantized as it arrives); T5-XXL, CLIP-L and the FLUX VAE are built
from their real configs with random weights; tokenizers and scheduler come from the tiny offline model. The
transformer carries URAE-sized adapters: a rank-16 LoRA on the authors' 190 targets for 1024²/2048² (the 2K
adapter) and rank 48 for 4096² (the 2K + 4K adapters converted to one exact LoRA). The memory options of
`urae-lite generate` (urae_lite.MemorySettings' own options; `--quant` alone measures that format) are set up in the
order `load_pipeline` sets them up: `--token-chunks` and `--blocks-to-swap` on the transformer (with its adapters)
before the offload hooks; `--t5-quant nf4` saves the random T5-XXL to a temporary folder and loads it back through
`load_t5_nf4`, the library's bitsandbytes path. The VAE decode tiles as each size's preset says unless
`--vae-tiling` is given.

Per (quant, size) row: time and peak CUDA memory (allocated and reserved) of each stage of one generation with
the preset's settings (text encoders, denoise, VAE decode) and seconds per denoising step (median interval
between the ends of consecutive transformer forwards, so model transfers are not counted). Separately: the
4096² VAE decode, exact tiled vs plain. Results go to benchmarks/results/generate_<device>.json with versions,
command and git commit; the README's goals (NF4: 2K <= 10 GiB, 4K <= 14 GiB peak) are checked.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from provenance import provenance, result_path

GIB = 2**30
GOALS_GIB = {2048: 10.0, 4096: 14.0}  # the README's goals, NF4 base, whole generation
PROMPT = "a photo of a red fox in a snowy forest at golden hour, high resolution, detailed"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from urae_lite import QUANT_FORMATS, MemorySettings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quants", nargs="+", choices=QUANT_FORMATS, help="base formats (default: --quant, else all)")
    p.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096], help="square image sides")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per generation (>= 2 to time a step)")
    MemorySettings.add_arguments(p, ["generate"])
    p.add_argument("--skip-vae", action="store_true", help="skip the separate 4096² tiled-vs-plain VAE decode")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/generate_<device>.json)")
    args = p.parse_args(argv)
    given = MemorySettings.given(args)
    args.quants = args.quants or ([given["quant"]] if "quant" in given else list(QUANT_FORMATS))
    args.memory = MemorySettings(**{k: v for k, v in given.items() if k != "quant"})  # checked in main
    args.preset_tiling = "vae_tiling" not in given  # each size decodes as its preset says
    return args


# ---- random full-size components ---------------------------------------------------------------------------------
def _fill_random_(module, seed: int) -> None:
    """Unit-gain matrices, norm scales 1, small vectors: activations stay finite through T5/CLIP in bf16."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)


def random_text_encoders(t5_quant: str = "bf16"):
    """CLIP-L and T5-XXL with random weights, made on the GPU (fast) and parked on the CPU; T5 in NF4 through the
    library's loader (`t5_quant="nf4"`)."""
    import torch
    from transformers import CLIPTextModel, T5EncoderModel

    from urae_lite.flux_configs import clip_config, t5_config  # FLUX.1's published architectures, one owner

    clip, t5 = clip_config(), t5_config()
    out = []
    for cls, cfg, seed in ((CLIPTextModel, clip, 1), (T5EncoderModel, t5, 2)):
        with torch.device("meta"):
            model = cls(cfg).to(torch.bfloat16)
        model.to_empty(device="cuda")
        _fill_random_(model, seed)
        for name, buf in model.named_buffers():  # CLIP's position_ids: to_empty left it uninitialised
            if name.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1], device=buf.device).expand_as(buf))
        out.append(model.to("cpu").eval())
        del model
        torch.cuda.empty_cache()
    if t5_quant == "nf4":
        out.append(nf4_t5(out.pop()))
    return out


def nf4_t5(model):
    """`model` (bf16 T5) in NF4 as `load_pipeline(t5_quant="nf4")` makes it: saved, then loaded by `load_t5_nf4`
    (transformers' bitsandbytes integration decides where it lives, as for a downloaded T5)."""
    import tempfile

    import torch

    from urae_lite.text_encoders import load_t5_nf4

    with tempfile.TemporaryDirectory(prefix="urae_t5_") as root:
        model.save_pretrained(Path(root) / "text_encoder_2")
        del model  # the bf16 host copy goes before the NF4 one loads (the caller's list no longer holds it)
        return load_t5_nf4(Path(root), torch.bfloat16).eval()


def outside_allocator_gib(device=None) -> float:
    """Device memory in use outside torch's caching allocator (CUDA context, library handles, loaded kernels): what
    a card needs beyond max_memory_reserved. Read from the driver, so it assumes this process is alone on the GPU."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return (total - free - torch.cuda.memory_reserved(device)) / GIB


def random_vae():
    import torch
    from diffusers import AutoencoderKL

    from urae_lite.flux_configs import FLUX_VAE_CONFIG, FLUX_VAE_FACTORS

    return AutoencoderKL(**FLUX_VAE_CONFIG, **FLUX_VAE_FACTORS).to(torch.bfloat16).eval()


def random_transformer(quant: str):
    """Full-size FLUX.1-dev, random bf16 tensors streamed on the GPU into NF4/FP8/bf16 AdaptedLinears."""
    import torch
    from diffusers import FluxTransformer2DModel

    from urae_lite import LoadSpec
    from urae_lite.flux_configs import flux_dev_config
    from urae_lite.loader import empty_transformer, fill_transformer  # streaming from an iterator: no public entry
    from urae_lite.tiny import iter_random_transformer_tensors

    config = flux_dev_config()
    with torch.device("meta"):
        n_tensors = len(FluxTransformer2DModel(**config).state_dict())
    model = fill_transformer(
        empty_transformer(config),
        iter_random_transformer_tensors(config, device="cuda"),
        LoadSpec(quant, "cuda", torch.bfloat16),
        total=n_tensors,
    )
    return model.eval()


def add_adapter_rank(transformer, rank: int, name: str) -> None:
    """A frozen LoRA slice of `rank` on the authors' targets (B = 0: same cost as a trained one)."""
    from urae_lite import add_lora

    add_lora(transformer, name, rank)
    transformer.requires_grad_(False)


def adapter_rank(transformer) -> int:
    return sum(s.rank for s in transformer.get_submodule("transformer_blocks.0.attn.to_q").slices.values())


# ---- measurement -----------------------------------------------------------------------------------------------
class StepTimer:
    """Wall time at the end of every transformer forward (= one denoising step)."""

    def __init__(self, transformer):
        import torch

        self.ends: list[float] = []

        def hook(module, args, output):
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        self.handle = transformer.register_forward_hook(hook)

    def seconds_per_step(self) -> float | None:
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        return statistics.median(gaps) if gaps else None


def measure(fn):
    """(result, seconds, peak allocated GiB, peak reserved GiB) of fn(), peaks reset before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return (
        result,
        time.perf_counter() - start,
        torch.cuda.max_memory_allocated() / GIB,
        torch.cuda.max_memory_reserved() / GIB,
    )


def generation_row(pipe, quant: str, size: int, steps: int, preset_tiling: bool = True) -> dict:
    """One generation with the size's preset (and its VAE tiling unless `preset_tiling` is off)."""
    import torch

    from urae_lite import UraeError
    from urae_lite.presets import load_preset, preset_memory  # the preset files: read by load_pipeline alone

    preset = "4k" if size >= 4096 else "2k"
    s = load_preset(preset, "dev").replace(width=size, height=size, steps=steps)
    if preset_tiling:
        pipe.memory = pipe.memory.replace(vae_tiling=preset_memory(preset, "dev").vae_tiling)
    row: dict = {"quant": quant, "size": size, "steps": steps, "settings": s.as_dict(), "stages": {}}
    row["vae_tiling"] = pipe.memory.vae_tiling
    timer = StepTimer(pipe.transformer)
    try:
        embeds, *m = measure(lambda: pipe.encode(PROMPT, s))
        row["stages"]["text_encoders"] = dict(zip(("seconds", "peak_allocated_gib", "peak_reserved_gib"), m))
        packed, *m = measure(lambda: pipe.denoise(embeds, s, seed=0))
        row["stages"]["denoise"] = dict(zip(("seconds", "peak_allocated_gib", "peak_reserved_gib"), m))
        _, *m = measure(lambda: pipe.decode(packed, s))
        row["stages"]["vae_decode"] = dict(zip(("seconds", "peak_allocated_gib", "peak_reserved_gib"), m))
    except (torch.cuda.OutOfMemoryError, UraeError) as e:
        row["error"] = str(e).splitlines()[0]
    finally:
        timer.handle.remove()
        pipe.flux.maybe_free_model_hooks()
        torch.cuda.empty_cache()
    row["seconds_per_step"] = timer.seconds_per_step()
    if row["stages"]:
        row["peak_allocated_gib"] = max(v["peak_allocated_gib"] for v in row["stages"].values())
        row["peak_reserved_gib"] = max(v["peak_reserved_gib"] for v in row["stages"].values())
    return row


def vae_rows(vae) -> list[dict]:
    """4096² decode of random latents: exact tiled vs plain `vae.decode`, VAE alone on the GPU."""
    import torch

    from urae_lite.vae_tiling import decode

    vae = vae.to("cuda")
    latents = torch.randn(1, 16, 512, 512, device="cuda", dtype=torch.bfloat16)
    rows = []
    for mode in ("on", "off"):
        try:
            _, *m = measure(lambda mode=mode: decode(vae, latents, mode=mode))
            rows.append(
                {
                    "size": 4096,
                    "vae_tiling": mode,
                    **dict(zip(("seconds", "peak_allocated_gib", "peak_reserved_gib"), m)),
                }
            )
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"size": 4096, "vae_tiling": mode, "error": str(e).splitlines()[0]})
        torch.cuda.empty_cache()
    vae.to("cpu")
    return rows


def main() -> None:
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/generate.py needs a CUDA GPU")
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    from urae_lite import memory as memory_settings
    from urae_lite.flux_configs import flux_dev_config
    from urae_lite.offload import apply_offload  # what load_pipeline does after memory.apply: no public entry
    from urae_lite.pipeline import UraePipeline
    from urae_lite.presets import GenerationSettings
    from urae_lite.tiny import tiny_flux_path

    device = torch.cuda.get_device_name()
    tiny = tiny_flux_path()
    config = flux_dev_config()
    n_blocks = config["num_layers"] + config["num_single_layers"]
    base = args.memory.replace(offload=args.memory.resolved_offload("cuda")).check("generate", n_blocks)
    clip, t5 = random_text_encoders(base.t5_quant)
    vae = random_vae()
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(tiny, subfolder="scheduler"),
        tokenizer=CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer"),
        tokenizer_2=T5TokenizerFast.from_pretrained(tiny, subfolder="tokenizer_2"),
        text_encoder=clip,
        text_encoder_2=t5,
        vae=vae,
    )
    rows: list[dict] = []
    memory = {k: getattr(base, k) for k in ("t5_quant", "blocks_to_swap", "token_chunks")}
    shown = [n for n in base.for_task("generate") if n != "quant" and not (n == "vae_tiling" and args.preset_tiling)]
    print(
        f"{device} | torch {torch.__version__} | diffusers {diffusers.__version__} | {base.describe('generate', shown)}"
    )
    print(f"{'quant':5} {'size':>5} {'s/step':>7} {'TE GiB':>7} {'denoise GiB':>11} {'VAE GiB':>8} {'peak GiB':>9}")
    for quant in args.quants:
        transformer = random_transformer(quant)
        # `none`/`model` move whole modules, so the 4K rank can be added later; group/sequential offload hooks and
        # block swap capture the tensors when applied, so there every size runs with the 4K rank (48) from the start
        grow = base.offload in ("none", "model") and not base.blocks_to_swap and min(args.sizes) < 4096
        add_adapter_rank(transformer, 16 if grow else 48, "urae_2k" if grow else "urae_2k_4k")
        settings = base.replace(quant=quant)
        memory_settings.apply(transformer, settings, torch.device("cuda"))  # as load_pipeline, before the offload
        flux = FluxPipeline(transformer=transformer, **parts)
        apply_offload(flux, settings.offload, torch.device("cuda"))
        torch.cuda.empty_cache()  # the loading's cached blocks must not count as the first row's reserved peak
        pipe = UraePipeline(
            flux, model="random FLUX.1-dev", adapters=[], defaults=GenerationSettings(), memory=settings, progress=False
        )
        for size in sorted(args.sizes):
            if grow and size >= 4096 and adapter_rank(transformer) < 48:
                add_adapter_rank(transformer, 32, "urae_4k")  # 16 + 32 = the converted 2K + 4K rank
            row = generation_row(pipe, quant, size, args.steps, args.preset_tiling)
            row["adapter_rank"] = adapter_rank(transformer)
            row["outside_allocator_gib"] = outside_allocator_gib()
            row.update(memory)
            rows.append(row)
            st = row["stages"]
            fmt = lambda k, st=st: f"{st[k]['peak_allocated_gib']:.2f}" if k in st else "-"  # noqa: E731
            sps = f"{row['seconds_per_step']:.3f}" if row["seconds_per_step"] else "-"
            print(
                f"{quant:5} {size:>5} {sps:>7} {fmt('text_encoders'):>7} {fmt('denoise'):>11} "
                f"{fmt('vae_decode'):>8} {row.get('peak_allocated_gib', float('nan')):>9.2f} {row.get('error', '')}"
            )
        flux.remove_all_hooks()
        del pipe, flux, transformer
        torch.cuda.empty_cache()
    vae_result = [] if args.skip_vae else vae_rows(vae)
    for r in vae_result:
        print(
            f"VAE 4096² tiling {r['vae_tiling']:3}: {r.get('peak_allocated_gib', float('nan')):.2f} GiB, "
            f"{r.get('seconds', float('nan')):.2f} s {r.get('error', '')}"
        )

    goals = []
    for size, limit in GOALS_GIB.items():
        for r in rows:
            if r["quant"] == "nf4" and r["size"] == size and "peak_allocated_gib" in r and "error" not in r:
                goals.append(
                    {
                        "size": size,
                        "quant": "nf4",
                        "limit_gib": limit,
                        "peak_gib": r["peak_allocated_gib"],
                        "met": r["peak_allocated_gib"] <= limit,
                    }
                )
                print(
                    f"goal: NF4 {size}² peak {r['peak_allocated_gib']:.2f} GiB (<= {limit}): "
                    f"{'MET' if goals[-1]['met'] else 'NOT MET'}"
                )
    out = args.out or result_path("generate", device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": device,
                **provenance(),
                "offload": base.offload,
                **memory,
                "rows": rows,
                "vae_4096": vae_result,
                "goals": goals,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
