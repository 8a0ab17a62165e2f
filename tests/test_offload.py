"""`apply_offload` on the tiny pipeline (CPU): which hooks each mode installs and where the weights stay.

The images each mode makes are compared in test_generate.py; this checks the placement itself, including the
reason `sequential` is ours and not diffusers': each AdaptedLinear is loaded whole by one hook."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline
from train_utils import one_thread  # noqa: F401  (autouse fixture)

from urae_lite.adapted_linear import AdaptedLinear
from urae_lite.loader import load_transformer
from urae_lite.offload import apply_offload

CPU = torch.device("cpu")


def _pipeline(tiny_flux) -> FluxPipeline:
    transformer = load_transformer(tiny_flux, "nf4", CPU, torch.float32, progress=False)
    pipe = FluxPipeline.from_pretrained(tiny_flux, transformer=transformer, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


def _accelerate_hook(module: torch.nn.Module) -> str | None:
    hook = getattr(module, "_hf_hook", None)
    return None if hook is None else type(hook).__name__


def _group_offloaded(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("group_offloading") is not None


def _adapted_linears(pipe) -> list[AdaptedLinear]:
    return [m for m in pipe.transformer.modules() if isinstance(m, AdaptedLinear)]


def test_none_installs_no_hooks(tiny_flux):
    pipe = _pipeline(tiny_flux)
    apply_offload(pipe, "none", CPU)
    for name, module in _modules(pipe).items():
        assert _accelerate_hook(module) is None and not _group_offloaded(module), name
        assert _devices(module) == {"cpu"}, name
    assert pipe._execution_device.type == "cpu"


def test_model_hooks_every_component_whole_and_keeps_weights_real(tiny_flux):
    pipe = _pipeline(tiny_flux)
    apply_offload(pipe, "model", CPU)
    modules = _modules(pipe)
    assert set(modules) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    for name, module in modules.items():
        assert _accelerate_hook(module) == "CpuOffload", name
        assert _devices(module) == {"cpu"}, name  # moved as one piece on use, never to meta
    assert all(_accelerate_hook(m) is None for m in _adapted_linears(pipe))
    assert pipe._execution_device.type == "cpu"


def test_group_streams_transformer_and_text_encoders_but_not_the_vae(tiny_flux):
    pipe = _pipeline(tiny_flux)
    apply_offload(pipe, "group", CPU)
    modules = _modules(pipe)
    assert {name for name, m in modules.items() if _group_offloaded(m)} == {
        "transformer",
        "text_encoder",
        "text_encoder_2",
    }
    assert _group_offloaded(pipe.transformer.transformer_blocks[0])  # block level: one group per block
    assert _accelerate_hook(modules["vae"]) is None and _devices(modules["vae"]) == {"cpu"}  # tiled decode reads it


def test_sequential_loads_each_adapted_linear_whole_and_matches_the_plain_transformer(tiny_flux, make_inputs):
    pipe = _pipeline(tiny_flux)
    apply_offload(pipe, "sequential", CPU)
    layers = _adapted_linears(pipe)
    assert layers
    for layer in layers:
        assert _accelerate_hook(layer) == "AlignDevicesHook"
        # one hook for the whole layer: its base buffers and slices are read directly, never called
        assert all(_accelerate_hook(child) is None for child in layer.modules() if child is not layer)
        assert _devices(layer) == {"meta"}  # quantized buffers offloaded too, not left on the device
    assert _devices(pipe.transformer) == {"meta"}
    assert _devices(pipe.text_encoder_2) == {"meta"}
    assert _accelerate_hook(pipe.vae) == "CpuOffload" and _devices(pipe.vae) == {"cpu"}  # the VAE moves whole

    inputs = make_inputs(pipe.transformer.config, dtype=torch.float32)
    plain = load_transformer(tiny_flux, "nf4", CPU, torch.float32, progress=False)
    with torch.no_grad():
        expected = plain(**inputs, return_dict=False)[0]
        got = pipe.transformer(**inputs, return_dict=False)[0]
    assert torch.equal(got, expected)
    assert _devices(pipe.transformer) == {"meta"}  # weights left again after the call
