"""Every number the memory planner assumes that is not derived from a model config, with where it comes from.

Sizes are bytes unless the name says otherwise. Activation inventories (which tensors are alive at a block's
peak, or saved for backward) are in `activations.py`, written out tensor by tensor next to the diffusers code
they describe; this module holds only the scalars they and the estimator use.
"""

from __future__ import annotations

GiB = 2**30
BF16 = 2
FP32 = 4

# The host memory the shipped profiles and the consumer-card goals plan with: what a 32 GB desktop leaves for
# offloaded weights, swapped blocks and checkpoints.
HOST_RAM_GIB = 24

# ---- CUDA overheads ----------------------------------------------------------------------------------------------
# CUDA context + cuBLAS/cuDNN handles, outside torch's allocator: ~0.5 GiB on Ampere/Hopper with torch 2.x (what
# nvidia-smi shows for a process that has allocated nothing yet). Not in max_memory_reserved.
CUDA_CONTEXT = 0.5 * GiB
# Caching-allocator reserve over the allocated peak (block rounding, fragmentation between differently sized
# activations): max_memory_reserved / max_memory_allocated is typically 1.03-1.10 for one-batch diffusion loops.
ALLOCATOR_RESERVE = 0.08

# ---- text-encoder activations at L tokens (no grad, bf16) -----------------------------------------------------------
# transformers 5's T5 attends through SDPA with the relative position bias as its float mask (flash / memory-
# efficient kernels: no (heads, L, L) score matrix). Alive: the bias, computed once and kept for all 24 layers, and
# each layer's masked copy of it (heads, L, L each); then the larger of a layer's attention (hidden state, its
# fp32-normalised copy, q, k, v, SDPA's output: this many (L, d_model) bf16 tensors) and its gated FF (the hidden
# state and norm, with gelu_new's composite temporaries over wi_0 and wi_1's (L, d_ff) outputs).
T5_BIAS_TENSORS = 2
T5_ATTENTION_HIDDEN = 7
T5_FF_HIDDEN = 4
T5_FF_TENSORS = 4

# ---- optimizers (per trainable parameter, fp32 masters: urae_lite/train/model.py) --------------------------------
# Prodigy (prodigyopt 1.x, slice_p=1): exp_avg, exp_avg_sq, s and p0, each like the parameter (p0 is a scalar when
# the parameter is all zeros at the first step: a fresh LoRA's B).
PRODIGY_STATES = 4
# bitsandbytes AdamW8bit: two uint8 states + one fp32 absmax per 256 values for each (blockwise quantization).
ADAMW8BIT_BYTES = 2 + 2 * FP32 / 256

# ---- expected-speed model (ranking only; never shown as a promise) -------------------------------------------------
# A consumer card of the class the planner is for (RTX 4090: 82.6 dense bf16 TFLOP/s with fp32 accumulation) at
# ~70% of peak on FLUX-sized GEMMs; PCIe 4.0 x16: ~22 GB/s from pinned host memory (diffusers group offloading
# pins), ~10 GB/s from pageable memory (accelerate's model and sequential offload hooks copy from it).
REF_FLOPS = 0.7 * 82.6e12
REF_PCIE_PINNED = 22e9
REF_PCIE_PAGEABLE = 10e9
# Quantized bases run the same bf16 GEMM after dequantizing into a reused buffer: each format's `speed`
# (urae_lite/quant/) is its slowdown against bf16; the kernels' goal is <= 1.10x bf16 for NF4 with the adapter.
# Per-module hook and synchronisation costs of the offload mechanisms (accelerate / diffusers hooks), seconds.
GROUP_OVERHEAD_PER_BLOCK = 2e-4  # one onload per block group, overlapped transfer on a side stream
SEQUENTIAL_OVERHEAD_PER_LAYER = 4e-4  # blocking host->device copy + hook per leaf module
SWAP_OVERHEAD_PER_BLOCK = 1e-4  # block swap: one hook, an event wait and a release per swapped block per pass
TOKEN_CHUNK_OVERHEAD = 2e-5  # token-chunked blocks: per chunk per block and pass (launches, slicing, the output copy)
