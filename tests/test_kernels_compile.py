"""Compile urae_lite.kernels for real CUDA targets (sm_80, 86, 89, 90, 120) on a machine without a GPU.

The GEMM launcher only lets the autotuner try configs whose shared-memory *estimate* fits the device
(`prune_configs`). Here, per target and its opt-in limit, the pruning is applied and what survives is compiled
by Triton for that target (ptxas included); each kernel must compile, its real `metadata.shared` must fit the
limit and stay below the estimate (so the estimate is a sound bound).

What is compiled, so that the file takes about a minute on 2 free cores with a cold Triton cache (seconds with
a warm one); the full matrix (5 targets x 3 dtypes x 8 ranks x 2 bias x ~10 surviving configs) would take hours:
* per (target, dtype, rank), only the surviving config with the LARGEST estimate, the one nearest the limit.
  Every other survivor has a smaller estimate and fits by the estimate alone: that is checked for every config,
  dtype and rank (RANKS and beyond) in test_pruning_keeps_only_fitting_configs, while the compiles check that
  the estimate really bounds Triton's figure;
* per target, the (dtype, rank, bias, layout) combinations of GEMM_COMBOS: every dtype, every class of rank the
  kernel compiles differently for, both bias variants and both operand layouts (forward, dx) appear on every
  target, though not in every combination;
* both dequantization kernels into bf16 everywhere, and into fp16 / fp32 on sm_80.

Kernels are built from the launchers' own argument builders (`kernel_args`) through Triton's JIT binder, so they
get exactly the specialization a launch would (strides of 1, 16-divisible sizes), then deduplicated on it:
ranks 48..512 compile to one kernel. Triton picks interpreter or compiler at import and tests/conftest.py sets
TRITON_INTERPRET=1, so the compiles run in one subprocess (this file run as a script) without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from urae_lite.kernels.lowrank_gemm import (  # noqa: E402
    MAX_TUNED,
    block_r,
    gpu_configs,
    prune_configs,
    smem_estimate,
)

# Shared memory a block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin), per compute capability.
SMEM_LIMITS = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 120: 101_376}
RANKS = (0, 1, 16, 48, 64, 128, 256, 512)
DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
M, K, N = 4096, 3072, 3072  # a FLUX projection at 1024 x 1024 (sets which strides and sizes get specialized)


# ---- planning (pytest process) ------------------------------------------------------------------------------------
def _ptxas_available(arch: int) -> bool:
    """ptxas for `arch` ships in the triton wheel (ptxas-blackwell for sm_100+)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(arch)
    except (ImportError, AttributeError, RuntimeError, OSError):
        return False
    return tool is not None and Path(tool.path).is_file()


def targets() -> dict[int, int]:
    """The targets this Triton can compile for, with their shared-memory limits."""
    return {arch: limit for arch, limit in SMEM_LIMITS.items() if _ptxas_available(arch)}


def chunk(R: int) -> int:
    return block_r(R) if R else 0


def chosen_config(limit: int, dtype: str, R: int) -> int:
    """Index in gpu_configs() of the pruned config nearest the limit for this target, dtype and rank."""
    configs = gpu_configs()
    survivors = prune_configs(configs, limit, DTYPES[dtype], chunk(R))
    return configs.index(max(survivors, key=lambda c: smem_estimate(c, DTYPES[dtype], chunk(R))))


# (dtype, rank, bias, layout) compiled on every target: every dtype, every rank-chunk class (0: no adapter;
# 1 and 16: one partial chunk of 16, rank 1 being specialized by Triton as a constant; 48 and 512: chunks of 32,
# the class of 48..512) and both bias variants appear on each target, though not in every combination.
GEMM_COMBOS = (
    ("bfloat16", 0, False, "fwd"),
    ("bfloat16", 1, True, "fwd"),
    ("bfloat16", 512, True, "fwd"),
    ("bfloat16", 48, False, "dx"),
    ("float16", 16, True, "fwd"),
    ("float32", 0, False, "fwd"),
    ("float32", 512, True, "fwd"),
)


def gemm_jobs(arch: int, limit: int) -> list[dict]:
    """GEMM compiles for one target: the pruned config nearest the limit for each of GEMM_COMBOS."""
    return [
        {
            "kind": "gemm",
            "arch": arch,
            "dtype": dtype,
            "rank": R,
            "bias": bias,
            "layout": layout,
            "config": chosen_config(limit, dtype, R),
        }
        for dtype, R, bias, layout in GEMM_COMBOS
    ]


def dequant_jobs(arch: int) -> list[dict]:
    """Both dequantization kernels into bf16 (the storage dtype) everywhere, into fp16 / fp32 on sm_80 only (the
    output dtype changes one conversion, not the tiling or shared memory)."""
    dtypes = DTYPES if arch == 80 else ("bfloat16",)
    return [{"kind": kind, "arch": arch, "dtype": dtype} for kind in ("nf4", "fp8") for dtype in dtypes]


def job_id(job: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in sorted(job.items()))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    """Compile every planned kernel for every available target in one subprocess; results by job_id."""
    found = targets()
    if not found:
        pytest.skip("the installed triton has no ptxas (nothing to compile with)")
    jobs = [j for arch, limit in found.items() for j in gemm_jobs(arch, limit) + dequant_jobs(arch)]
    folder = tmp_path_factory.mktemp("compile")
    (folder / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, __file__, str(folder / "jobs.json"), str(folder / "results.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"compile worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads((folder / "results.json").read_text())
    distinct = {r["key"]: r["seconds"] for r in results}
    print(f"compiled {len(distinct)} distinct kernels for {len(jobs)} jobs in {sum(distinct.values()):.0f} s")
    return {job_id(job): result for job, result in zip(jobs, results)}


def _target_jobs(compiled: dict[str, dict], arch: int, kinds: tuple[str, ...]) -> list[tuple[dict, dict]]:
    if arch not in targets():
        pytest.skip(f"the installed triton cannot compile for sm_{arch}")
    limit = SMEM_LIMITS[arch]
    jobs = gemm_jobs(arch, limit) + dequant_jobs(arch)
    return [(job, compiled[job_id(job)]) for job in jobs if job["kind"] in kinds]


# ---- tests -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(SMEM_LIMITS), ids=lambda a: f"sm{a}")
def test_pruning_keeps_only_fitting_configs(arch):
    """For every dtype and rank (stacked ranks far past 256 included), the pruning keeps the first MAX_TUNED
    configs that genuinely fit the target (estimate <= limit; fp32 without its deep K tiles), never none."""
    limit = SMEM_LIMITS[arch]
    for dtype, size in DTYPES.items():
        for R in RANKS + (300, 520, 4096):
            assert chunk(R) <= 32  # shared memory is bounded whatever the stacked rank
            survivors = prune_configs(gpu_configs(), limit, size, chunk(R))
            eligible = [
                c
                for c in gpu_configs()
                if smem_estimate(c, size, chunk(R)) <= limit and not (size == 4 and c.kwargs["BLOCK_K"] > 32)
            ]
            assert survivors and survivors == eligible[:MAX_TUNED], (dtype, R)


def test_estimate_matches_the_formula():
    """stages x (A tile + W tile) + low-rank chunk tiles, or the output tile when larger."""
    config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3)
    assert smem_estimate(config, 4, 32) == 3 * (128 * 32 + 32 * 64) * 4 + 32 * (128 + 64) * 4
    assert smem_estimate(config, 2, 0) == 3 * (128 * 32 + 32 * 64) * 2
    one_stage = triton.Config(dict(config.kwargs), num_warps=4, num_stages=1)
    assert smem_estimate(one_stage, 2, 0) == 128 * 64 * 2


@pytest.mark.parametrize("arch", sorted(SMEM_LIMITS), ids=lambda a: f"sm{a}")
def test_chosen_gemm_configs_compile_and_fit(arch, compiled):
    limit = SMEM_LIMITS[arch]
    for job, result in _target_jobs(compiled, arch, ("gemm",)):
        assert result.get("error") is None, f"{job}: {result.get('error')}"
        config = gpu_configs()[job["config"]]
        estimate = smem_estimate(config, DTYPES[job["dtype"]], chunk(job["rank"]))
        assert result["shared"] <= limit, f"{job}: {result['shared']} B of shared memory > {limit}"
        assert result["shared"] <= estimate, f"{job}: estimate {estimate} B below the real {result['shared']} B"


@pytest.mark.parametrize("arch", sorted(SMEM_LIMITS), ids=lambda a: f"sm{a}")
def test_dequant_kernels_compile(arch, compiled):
    for job, result in _target_jobs(compiled, arch, ("nf4", "fp8")):
        assert result.get("error") is None, f"{job}: {result.get('error')}"
        assert result["shared"] <= SMEM_LIMITS[arch], job


# ---- worker (this file run as a script, without TRITON_INTERPRET) -----------------------------------------------
def _meta(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """Operands cost nothing: the binder only reads dtype, strides and the (zero, so aligned) data pointer."""
    return torch.empty(shape, dtype=dtype, device="meta")


def _gemm_launch(job: dict):
    """(jit function, args, kwargs) the GEMM launcher would use for this job."""
    from urae_lite.kernels import lowrank_gemm as lg

    dtype, R = getattr(torch, job["dtype"]), job["rank"]
    if job["layout"] == "fwd":  # y = x · Wᵀ + xa · Bᵀ
        a, w, l, u = _meta(dtype, M, K), _meta(dtype, N, K), _meta(dtype, M, R), _meta(dtype, N, R)
    else:  # dx = dy · W + dyB · A, read through transposed views
        a, w, l, u = _meta(dtype, M, N), _meta(dtype, N, K).t(), _meta(dtype, M, R), _meta(dtype, R, K).t()
    bias = _meta(dtype, w.shape[0]) if job["bias"] else None
    args, kwargs = lg.kernel_args(a, w, l, u, bias, _meta(dtype, a.shape[0], w.shape[0]))
    config = lg.gpu_configs()[job["config"]]
    kwargs.update(config.all_kwargs())
    heuristics = lg._gemm_lowrank_kernel.fn  # autotune(heuristics(jit))
    for name, rule in heuristics.values.items():
        kwargs[name] = rule({**dict(zip(heuristics.arg_names, args)), **kwargs})
    return heuristics.fn, args, kwargs


def _dequant_launch(job: dict):
    """(jit function, args, kwargs) the dequantization launcher would use for this job."""
    from urae_lite.kernels import dequant

    out = _meta(getattr(torch, job["dtype"]), N, K)
    if job["kind"] == "nf4":
        n, u8, f32 = N * K, torch.uint8, torch.float32
        buffers = (
            _meta(u8, n // 2),
            _meta(u8, n // 64),
            _meta(f32, n // 16384 + 1),
            _meta(f32, 256),
            _meta(f32),
            _meta(f32, 16),
        )
        args, kwargs = dequant.nf4_kernel_args(*buffers, out)
        return dequant._nf4_dequant_kernel, args, kwargs
    args, kwargs = dequant.fp8_kernel_args(_meta(torch.float8_e4m3fn, N, K), _meta(torch.bfloat16, N, 1), out)
    return dequant._fp8_dequant_kernel, args, kwargs


def _specialize(job: dict):
    """Triton's own (signature, constexprs, attrs, options) for the launch, as JITFunction.run computes them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, args, kwargs = _gemm_launch(job) if job["kind"] == "gemm" else _dequant_launch(job)
    target = GPUTarget("cuda", job["arch"], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    key = repr((job["arch"], fn.__name__, signature, constexprs, attrs, options.hash()))
    return key, (fn, target, signature, constexprs, attrs, options)


def _compile(item: tuple[str, dict]) -> tuple[str, dict]:
    from triton.compiler import ASTSource

    key, job = item
    start = time.perf_counter()
    try:
        fn, target, signature, constexprs, attrs, options = _specialize(job)[1]
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        result = {"shared": kernel.metadata.shared, "error": None}
    except Exception as e:  # noqa: BLE001 -- any failure is reported per job by the tests
        result = {"shared": None, "error": f"{type(e).__name__}: {e}"[:2000]}
    return key, {**result, "seconds": time.perf_counter() - start}


def _cost(job: dict) -> float:
    """Rough compile time, to start the slow ones first (fp32 FMA tiles, ptxas-blackwell)."""
    fp32_gemm = job["kind"] == "gemm" and job["dtype"] == "float32"
    return (4.0 if fp32_gemm else 1.0) * (1.5 if job["arch"] >= 100 else 1.0)


def _worker_main(jobs_path: str, results_path: str) -> None:
    import multiprocessing

    from urae_lite.kernels import interpreting

    assert not interpreting(), "the compile worker must import the kernels without TRITON_INTERPRET"
    jobs = json.loads(Path(jobs_path).read_text())
    keys = [_specialize(job)[0] for job in jobs]
    distinct = sorted({key: job for key, job in zip(keys, jobs)}.items(), key=lambda kv: -_cost(kv[1]))
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        done = dict(pool.imap_unordered(_compile, distinct))
    Path(results_path).write_text(json.dumps([{**done[key], "key": key} for key in keys]))


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
