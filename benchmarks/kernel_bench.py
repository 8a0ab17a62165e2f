"""Time the adapted linear on one GPU: the fused kernels against bf16 F.linear and the unfused alternatives.

    python benchmarks/kernel_bench.py [--quick] [--out PATH]

Needs CUDA, torch, triton and bitsandbytes, and the checkout installed (`pip install --no-deps -e .`: the kernels/
folder is the package `urae_lite.kernels`; importing it loads neither diffusers nor transformers). Rows, per
(M, K, N, rank) and for `fwd` (inference, no_grad) and `fwd+bwd` (training: x and the adapter need grad, the base
and bias are frozen):

* floor          -- bf16 F.linear(x, W, bias), no adapter: what the README's goal ratios divide by
* bnb+lora       -- bitsandbytes matmul_4bit + separate LoRA, as peft runs it (lora_B(lora_A(x)) * scaling)
* torch-ref      -- our PyTorch path: bnb dequantize_4bit, F.linear, two small linears
* fused-nf4/fp8  -- urae_lite.kernels.adapted_linear on an NF4 / FP8 base
* fused-bf16     -- the same GEMM on a dense bf16 base (isolates the GEMM from dequantization)

Each time is the median of --iters CUDA-event timings after --warmup calls, inputs and weights rotated over a pool
larger than L2. Results go to benchmarks/results/kernels_<device>.json with versions, command and git commit.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from provenance import provenance, result_path

FULL_M = (4608, 16896, 66048)  # FLUX tokens: 1024² + 512 text, 2048² + 512, 4096² + 512
FULL_KN = ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072))  # attention, MLP up, MLP down, single out
GOAL = {"M": 16896, "K": 3072, "N": 3072, "rank": 16, "method": "fused-nf4", "mode": "fwd+bwd", "max_ratio": 1.10}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only M=16896, (K, N) in (3072, 3072), (3072, 12288), rank 16")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/kernels_<device>.json)")
    p.add_argument("--iters", type=int, default=30, help="timed calls per row (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per row (the first also autotunes)")
    return p.parse_args()


@dataclass
class Base:
    """The frozen-base protocol adapted_linear expects (urae_lite.quant.QuantizedWeight, minus the module)."""

    format: str
    weight: object  # storage tensor (gives the device)
    shape: object  # torch.Size (N, K)
    dtype: object  # what dequantize produces
    dequantize_fn: Callable = field(repr=False)

    def dequantize(self, out=None):
        return self.dequantize_fn(out)


@dataclass
class Entry:
    """One rotation slot: activations and a weight in every storage format."""

    x: object
    dy: object
    w: object  # bf16 (N, K)
    bias: object
    nf4: Base
    nf4_packed: object
    nf4_state: object
    fp8: Base
    bf16: Base


def make_entry(torch, bnbf, kernels, M: int, K: int, N: int) -> Entry:
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    packed, st = bnbf.quantize_4bit(
        w, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8
    )
    offset = torch.as_tensor(st.offset, dtype=torch.float32, device="cuda").reshape(())
    nf4 = Base(
        "nf4",
        packed,
        w.shape,
        torch.bfloat16,
        lambda out: kernels.nf4_dequantize(
            packed, st.absmax, st.state2.absmax, st.state2.code, offset, st.code, w.shape, out=out
        ),
    )
    scale = (w.abs().amax(dim=1, keepdim=True).float() / 448).to(torch.bfloat16)  # quanto's absmax scale
    data = (w.float() / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
    fp8 = Base("fp8", data, w.shape, torch.bfloat16, lambda out: kernels.fp8_dequantize(data, scale, out=out))
    bf16 = Base("bf16", w, w.shape, torch.bfloat16, lambda out: w if out is None else out.copy_(w))
    return Entry(
        x=torch.randn(M, K, device="cuda", dtype=torch.bfloat16).requires_grad_(True),
        dy=torch.randn(M, N, device="cuda", dtype=torch.bfloat16),
        w=w,
        bias=torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.1,
        nf4=nf4,
        nf4_packed=packed,
        nf4_state=st,
        fp8=fp8,
        bf16=bf16,
    )


def methods(torch, bnb, bnbf, kernels, A, B) -> dict[str, Callable]:
    """name -> f(entry) -> y (M, N); A (R, K), B (N, R) are the trainable adapter."""
    F = torch.nn.functional
    R = A.shape[0]
    scaling = 1.0  # peft multiplies the LoRA output by lora_alpha / r even when that is 1
    return {
        "floor": lambda e: F.linear(e.x, e.w, e.bias),
        "bnb+lora": lambda e: (
            bnb.matmul_4bit(e.x, e.nf4_packed, quant_state=e.nf4_state, bias=e.bias)
            + F.linear(F.linear(e.x, A), B) * scaling
        ),
        "torch-ref": lambda e: (
            F.linear(e.x, bnbf.dequantize_4bit(e.nf4_packed, e.nf4_state, quant_type="nf4"), e.bias)
            + F.linear(F.linear(e.x, A), B)
        ),
        "fused-nf4": lambda e: kernels.adapted_linear(e.x, e.nf4, e.bias, A, B, R),
        "fused-fp8": lambda e: kernels.adapted_linear(e.x, e.fp8, e.bias, A, B, R),
        "fused-bf16": lambda e: kernels.adapted_linear(e.x, e.bf16, e.bias, A, B, R),
    }


def time_ms(
    torch, fn: Callable, pool: list[Entry], backward: bool, params: list, iters: int, warmup: int
) -> tuple[list[float], float]:
    """(per-call CUDA-event times in ms, peak MiB allocated above the inputs during one call)."""

    def call(e: Entry) -> None:
        for t in [e.x, *params]:
            t.grad = None
        if backward:
            fn(e).backward(e.dy)
        else:
            with torch.no_grad():
                fn(e)

    for i in range(warmup):
        call(pool[i % len(pool)])
    torch.cuda.synchronize()
    base_mem = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call(pool[0])
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base_mem) / 2**20

    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (start, end) in enumerate(events):
        start.record()
        call(pool[i % len(pool)])
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(t) for s, t in events], peak_mib


def main() -> None:
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_bench.py needs a CUDA GPU")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import triton

    import urae_lite.kernels as kernels

    if kernels.interpreting():
        sys.exit("unset TRITON_INTERPRET: the interpreter is not what we time")

    device = torch.cuda.get_device_name()
    ms_, kns, ranks = ((16896,), FULL_KN[:2], (16,)) if args.quick else (FULL_M, FULL_KN, (16, 48))
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    rows: list[dict] = []
    print(f"{device} | torch {torch.__version__} | triton {triton.__version__} | bitsandbytes {bnb.__version__}")
    print(
        f"{'M':>6} {'K':>6} {'N':>6} {'R':>3} {'mode':8} {'method':11} {'ms':>9} {'TFLOP/s':>8} {'x floor':>8} "
        f"{'peak MiB':>9}"
    )
    for M in ms_:
        for K, N in kns:
            entry_bytes = 2 * (M * K + M * N + 2 * N * K)
            pool_size = min(8, max(2, math.ceil(3 * l2 / entry_bytes)))
            pool = [make_entry(torch, bnbf, kernels, M, K, N) for _ in range(pool_size)]
            for R in ranks:
                A = (torch.randn(R, K, device="cuda", dtype=torch.bfloat16) * K**-0.5).requires_grad_(True)
                B = (torch.randn(N, R, device="cuda", dtype=torch.bfloat16) * 0.01).requires_grad_(True)
                fns = methods(torch, bnb, bnbf, kernels, A, B)
                with torch.no_grad():  # sanity: fused output vs our PyTorch path, relative to the output scale
                    ref = fns["torch-ref"](pool[0]).float()
                    check = ((fns["fused-nf4"](pool[0]).float() - ref).abs().max() / ref.abs().max()).item()
                for mode in ("fwd", "fwd+bwd"):
                    flops = 2 * M * K * N * (1 if mode == "fwd" else 2)
                    floor_ms = None
                    for name, fn in fns.items():
                        times, peak = time_ms(torch, fn, pool, mode == "fwd+bwd", [A, B], args.iters, args.warmup)
                        ms, ordered = statistics.median(times), sorted(times)
                        floor_ms = floor_ms or ms
                        row = {
                            "M": M,
                            "K": K,
                            "N": N,
                            "rank": R,
                            "mode": mode,
                            "method": name,
                            "ms": ms,
                            "ms_p10": ordered[len(times) // 10],
                            "ms_p90": ordered[-len(times) // 10 - 1],
                            "tflops": flops / ms / 1e9,
                            "ratio_to_floor": ms / floor_ms,
                            "peak_mib": peak,
                            "fused_nf4_rel_err_vs_torch_ref": check,
                            "pool": pool_size,
                        }
                        rows.append(row)
                        print(
                            f"{M:>6} {K:>6} {N:>6} {R:>3} {mode:8} {name:11} {ms:>9.3f} {row['tflops']:>8.1f} "
                            f"{row['ratio_to_floor']:>8.3f} {peak:>9.1f}"
                        )
            del pool
            torch.cuda.empty_cache()

    goal_rows = [r for r in rows if all(r[k] == GOAL[k] for k in ("M", "K", "N", "rank", "method", "mode"))]
    goal = None
    if goal_rows:
        ratio = goal_rows[0]["ratio_to_floor"]
        goal = {**GOAL, "ratio": ratio, "met": ratio <= GOAL["max_ratio"]}
        print(
            f"goal: fused NF4 rank-16 fwd+bwd at M=16896, K=N=3072 = {ratio:.3f}x floor "
            f"(target <= {GOAL['max_ratio']}): {'MET' if goal['met'] else 'NOT MET'}"
        )

    out = args.out or result_path("kernels", device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"device": device, **provenance(), "iters": args.iters, "warmup": args.warmup, "goal": goal, "rows": rows},
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
