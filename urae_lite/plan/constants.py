"""Every number the memory planner assumes that is not derived from a model config, with where it comes from.

Sizes are bytes unless the name says otherwise. Activation inventories (which tensors are alive at a block's
peak, or saved for backward) are in `activations.py`, written out tensor by tensor next to the diffusers code
they describe; this module holds only the scalars they and the estimator use.
"""

from __future__ import annotations

GiB = 2**30

# ---- storage formats (urae_lite/quant.py) ------------------------------------------------------------------------
BF16 = 2
FP32 = 4
NF4_BLOCK = 64  # bitsandbytes blocksize: one uint8 absmax code per 64 weights
NF4_NESTED_BLOCK = 256  # double quantization: one fp32 absmax per 256 absmax codes
NF4_PER_LINEAR = 16 * FP32 + 256 * FP32 + FP32  # quant_map (16 NF4 levels) + nested_quant_map + offset, per layer
# fp8 (quanto qfloat8_e4m3fn, axis 0): 1 byte per weight + one compute-dtype (bf16) scale per output row

# ---- text encoders and VAE of FLUX.1 (their configs are not available offline: published architectures) ----------
# T5-v1.1-XXL encoder (google/t5-v1_1-xxl, FLUX's text_encoder_2): d_model 4096, d_ff 10240 (gated: wi_0, wi_1, wo),
# 24 layers, 64 heads x 64, vocab 32128 -> 4.76 B parameters (usually quoted as "4.7 B").
T5_D_MODEL, T5_D_FF, T5_LAYERS, T5_HEADS, T5_VOCAB = 4096, 10240, 24, 64, 32128
# CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14): width 768, mlp 3072, 12 layers, vocab 49408, 77 positions
# -> 123 M parameters.
CLIP_WIDTH, CLIP_MLP, CLIP_LAYERS, CLIP_VOCAB, CLIP_POSITIONS = 768, 3072, 12, 49408, 77
# FLUX.1 AutoencoderKL (black-forest-labs/FLUX.1-dev vae/config.json; 83.8 M parameters when built from it).
FLUX_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
VAE_DOWNSAMPLE = 8  # pixels per latent pixel
PATCH = 2  # 2x2 latent pixels per transformer token (16 px per token side)
VAE_STRIP_ROWS = 64  # GenerationSettings.vae_strip_rows default (urae_lite/presets.py)
# What a VAE decode holds, plain or tiled, and the headroom `--vae-tiling auto` asks for: plan/vae.py.

# ---- text tokens -------------------------------------------------------------------------------------------------
TEXT_TOKENS = {"dev": 512, "schnell": 256}  # max_sequence_length defaults

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
# Quantized bases run the same bf16 GEMM after dequantizing into a reused buffer: the kernels' goal is <= 1.10x bf16
# for NF4 including the adapter (see README); fp8 dequantization is one multiply per weight, NF4 adds table lookups.
QUANT_SLOWDOWN = {"bf16": 1.00, "fp8": 1.03, "nf4": 1.06}
# Per-module hook and synchronisation costs of the offload mechanisms (accelerate / diffusers hooks), seconds.
GROUP_OVERHEAD_PER_BLOCK = 2e-4  # one onload per block group, overlapped transfer on a side stream
SEQUENTIAL_OVERHEAD_PER_LAYER = 4e-4  # blocking host->device copy + hook per leaf module
SWAP_OVERHEAD_PER_BLOCK = 1e-4  # block swap: one hook, an event wait and a release per swapped block per pass
TOKEN_CHUNK_OVERHEAD = 2e-5  # token-chunked blocks: per chunk per block and pass (launches, slicing, the output copy)
