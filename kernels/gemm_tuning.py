"""Tile configurations and autotuning of the low-rank GEMM kernel (lowrank_gemm.py): which configs exist, which
fit a device's shared memory, the autotune key's M bucket and rank chunk, and the CUDA-event benchmark used to
time them (without Triton's 256 MiB L2-flush buffer)."""

from __future__ import annotations

import inspect
from functools import cache

import torch
import triton

from .triton_utils import interpreting

BLOCK_R_MAX = 32  # rank chunk: (BLOCK_M + BLOCK_N) x 32 low-rank tiles, whatever the stacked rank
MAX_TUNED = 7  # configs compiled and timed per autotune key: the first that fit, largest tiles first
_BENCH_REPS = 10  # timed launches per config when autotuning (after one warm-up launch)


def block_r(R: int) -> int:
    """Rank chunk for R: a power of two >= 16 (tl.dot's minimum), at most BLOCK_R_MAX; the kernel masks the tail."""
    return min(max(16, triton.next_power_of_2(max(R, 1))), BLOCK_R_MAX)


def m_bucket(M: int) -> int:
    """Autotune key for the token count: the next power of two, so the ~11-22 distinct M of a FLUX run at one
    resolution tune a handful of times instead of once each (the best tile hardly moves within 2x of M)."""
    return triton.next_power_of_2(max(M, 1))


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return triton.Config(tiles, num_warps=warps, num_stages=stages)


def gpu_configs() -> list[triton.Config]:
    """Compiled-kernel tiles in order of preference: H100/A100-class first, then smaller ones that fit ~99 KiB
    (sm_86/89/120) even with fp32 inputs and a full rank chunk. `prune_configs` keeps what the device holds."""
    return [
        _config(128, 256, 64, 8, 3),
        _config(256, 128, 64, 8, 3),
        _config(128, 128, 64, 8, 4),
        _config(128, 128, 64, 4, 4),
        _config(64, 256, 64, 4, 4),
        _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4),
        # consumer cards (~99 KiB a block) and fp32 inputs
        _config(128, 64, 64, 4, 3),
        _config(64, 128, 64, 4, 3),
        _config(128, 128, 32, 8, 3),
        _config(128, 64, 32, 4, 3),
        _config(64, 128, 32, 4, 3),
        _config(64, 64, 32, 4, 3),
        _config(32, 64, 32, 4, 2),
    ]


def gemm_configs() -> list[triton.Config]:
    """What the autotuner chooses from: `gpu_configs`, or one small config under the interpreter."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return gpu_configs()


def smem_estimate(config: triton.Config, elem_size: int, rank_chunk: int) -> int:
    """Upper bound on the shared memory of `config`, in bytes: `num_stages` buffered A and W tiles, plus the
    low-rank L and U chunk tiles (0 without adapter), or the output tile re-laid out for the store if larger.
    Checked against Triton's `metadata.shared` by tests/test_kernels_compile.py."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    mainloop = config.num_stages * (bm * bk + bk * bn) * elem_size
    lowrank = rank_chunk * (bm + bn) * elem_size
    epilogue = bm * bn * elem_size
    return max(mainloop + lowrank, epilogue)


def prune_configs(
    configs: list[triton.Config], smem_limit: int | None, elem_size: int, rank_chunk: int
) -> list[triton.Config]:
    """The first MAX_TUNED configs whose shared memory fits `smem_limit` (None: no limit, the interpreter):
    each one tuned costs a compile and a benchmark on the first step, and the small tiles never win where the
    large ones fit. Never empty: the smallest config is kept when nothing fits (48 KiB by estimate with fp32
    and a full rank chunk; every GPU Triton supports allows more).

    fp32 inputs also drop BLOCK_K > 32: their exact (ieee) dot runs on CUDA cores, where reuse comes from
    BLOCK_M x BLOCK_N alone and a deeper K tile only doubles shared memory and compile time (10-20 s a config)."""
    if elem_size >= 4:
        configs = [c for c in configs if c.kwargs["BLOCK_K"] <= 32] or configs
    fitting = [c for c in configs if smem_limit is None or smem_estimate(c, elem_size, rank_chunk) <= smem_limit]
    if not fitting:
        return [min(configs, key=lambda c: smem_estimate(c, elem_size, rank_chunk))]
    return fitting[:MAX_TUNED]


@cache
def device_smem_limit(device: torch.device) -> int | None:
    """Shared memory one block may opt in to on `device` (None off CUDA: the interpreter has no limit)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _early_prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune hook: drop configs that cannot launch on the operands' device before any is benchmarked."""
    a = named_args["a_ptr"]
    rank_chunk = kwargs["BLOCK_R"] if kwargs["HAS_LOWRANK"] else 0
    return prune_configs(configs, device_smem_limit(a.device), a.element_size(), rank_chunk)


def _bench(kernel_call, quantiles: tuple[float, ...] | None = None) -> list[float] | float:
    """Autotune timing on the current (guarded) device: one warm-up launch, then CUDA-event times (ms).

    Triton's default benchmarker flushes L2 with a 256 MiB buffer before each launch, which may be allocated at
    peak memory on a 24 GB card; at FLUX's sizes the GEMM is compute-bound and the flush changes no ranking."""
    kernel_call()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(_BENCH_REPS)]
    for start, end in events:
        start.record()
        kernel_call()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([start.elapsed_time(end) for start, end in events], dtype=torch.float64)
    if quantiles is None:
        return times.median().item()
    return torch.quantile(times, torch.tensor(quantiles, dtype=torch.float64)).tolist()


def _autotune_options() -> dict:
    """Pass our benchmarker where the installed Triton takes one (3.2+); older ones keep their default."""
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        return {"do_bench": _bench}
    return {}
