"""Where the pipeline's weights live while it runs: diffusers/accelerate offload mechanisms, made to work with
our quantized `AdaptedLinear` modules.

* `none`       -- every component resident on the device: fastest, needs the most memory.
* `model`      -- staged (default on CUDA): text encoders, then the transformer, then the VAE, one component on
                  the device at a time (diffusers `enable_model_cpu_offload`).
* `group`      -- as `model` for the text encoders, and the transformer streamed block by block from pinned host
                  memory on a side CUDA stream (diffusers group offloading, block level).
* `sequential` -- every layer moved in on use (accelerate `cpu_offload`): least memory, slowest.

Quantized weights are module *buffers* and an AdaptedLinear reads its slices' parameters without calling them,
so `sequential` offloads buffers too and loads each AdaptedLinear whole (accelerate's `preload_module_classes`);
diffusers' `enable_sequential_cpu_offload` would keep all buffers on the GPU and leave the slices on `meta`.
The VAE always moves as one module in `group`/`sequential`: the exact tiled decode reads its weights directly.
"""

from __future__ import annotations

import torch
from torch import nn

OFFLOAD_MODES = ("none", "model", "group", "sequential")


def apply_offload(pipe, mode: str, device: torch.device) -> None:
    """Place `pipe`'s components for `mode` (checked: urae_lite.memory); the pipeline's execution device becomes
    `device`."""
    if mode == "none":
        pipe.to(device)
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "group":
        if device.type == "cuda":  # the blocks wait in pinned host memory: at their own size, not a power of two
            from .pinned import exact_pinned_sizes

            exact_pinned_sizes()
        pipe.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=device.type == "cuda",
            exclude_modules=["vae"],
        )
    else:
        _sequential(pipe, device)


def _sequential(pipe, device: torch.device) -> None:
    from accelerate import cpu_offload, cpu_offload_with_hook

    pipe.to("cpu")
    for name, component in pipe.components.items():
        if not isinstance(component, nn.Module):
            continue
        if name == "vae":
            cpu_offload_with_hook(component, device)
        elif name == "transformer":
            cpu_offload(component, device, offload_buffers=True, preload_module_classes=["AdaptedLinear"])
        else:  # the text encoders: what diffusers' enable_sequential_cpu_offload does
            cpu_offload(component, device, offload_buffers=len(component._parameters) > 0)
