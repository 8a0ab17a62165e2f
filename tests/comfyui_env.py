"""ComfyUI for the glue tests (skipped unless URAE_LITE_COMFYUI names a ComfyUI folder) and the workflow reader
both test files share: UI-format workflow JSON -> API prompt, by each node's widget order."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ENV = "URAE_LITE_COMFYUI"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL = "control_after_generate"  # the frontend's extra widget value after a seed input
# Widget order of the ComfyUI nodes our workflows use (ComfyUI's INPUT_TYPES; test_comfyui_glue checks this table
# against the real ComfyUI, so the pure tests can read the workflows without it).
BUILTIN_WIDGETS: dict[str, list[str]] = {
    "UNETLoader": ["unet_name", "weight_dtype"],
    "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
    "VAELoader": ["vae_name"],
    "LoraLoaderModelOnly": ["lora_name", "strength_model"],
    "CLIPTextEncode": ["text"],
    "FluxGuidance": ["guidance"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "SaveImage": ["filename_prefix"],
}


def widget_names(input_types: dict) -> list[str]:
    """A node's widget order from its INPUT_TYPES: required then optional inputs that are values, not links."""
    names: list[str] = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if isinstance(kind, (list, tuple)) or str(kind) in WIDGET_TYPES:
                if options.get("forceInput"):
                    continue
                names.append(name)
                if options.get(CONTROL):
                    names.append(CONTROL)
    return names


def our_widgets() -> dict[str, list[str]]:
    from urae_lite.comfyui import NODE_CLASS_MAPPINGS

    return {name: widget_names(cls.INPUT_TYPES()) for name, cls in NODE_CLASS_MAPPINGS.items()}


def read_workflow(name: str) -> dict:
    from importlib import resources

    return json.loads((resources.files("urae_lite.comfyui") / "workflows" / name).read_text())


def to_api_prompt(workflow: dict, widgets: dict[str, list[str]]) -> dict:
    """UI workflow (nodes + links, what ComfyUI's page saves) -> API prompt (what execution.validate_prompt takes)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        names = widgets[node["type"]]
        values = node.get("widgets_values", [])
        assert len(names) == len(values), f"{node['type']}: widgets {names} vs values {values}"
        inputs = {n: v for n, v in zip(names, values) if n != CONTROL}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def comfyui_root() -> Path:
    """The ComfyUI folder from URAE_LITE_COMFYUI, importable on the CPU; the calling test module skips otherwise."""
    value = os.environ.get(ENV)
    if not value:
        pytest.skip(f"{ENV} is not set: the ComfyUI glue tests need a ComfyUI checkout (e.g. {ENV}=/path/to/ComfyUI)")
    root = Path(value).expanduser()
    if not (root / "comfy").is_dir():
        pytest.skip(f"{ENV}={value} is not a ComfyUI folder (no comfy/ inside)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management reads it: the suite runs on the CPU
    return root


def detect_tiny_flux(mp: pytest.MonkeyPatch, tiny_config: dict) -> None:
    """ComfyUI's FLUX detection hard-codes FLUX.1's widths (hidden 3072, 24 heads, text 4096, RoPE axes 16/56/56):
    give it the tiny model's; depths, in/out widths and guidance still come from its own detection."""
    import comfy.model_detection

    detect = comfy.model_detection.detect_unet_config
    hidden = tiny_config["num_attention_heads"] * tiny_config["attention_head_dim"]

    def tiny_widths(state_dict, key_prefix, metadata=None):
        config = detect(state_dict, key_prefix, metadata=metadata)
        if config is not None and config.get("image_model") == "flux":
            config.update(
                hidden_size=hidden,
                num_heads=tiny_config["num_attention_heads"],
                context_in_dim=tiny_config["joint_attention_dim"],
                axes_dim=list(tiny_config["axes_dims_rope"]),
            )
        return config

    mp.setattr(comfy.model_detection, "detect_unet_config", tiny_widths)
