"""The three URAE nodes: ComfyUI's node conventions around the pure parts (settings, patches, vae_convert).

ComfyUI modules (comfy.*, folder_paths) are imported inside the methods ComfyUI calls, so this module imports
without ComfyUI (the pure tests read INPUT_TYPES and the workflows). Every node clones the MODEL before patching.
"""

from __future__ import annotations

import copy
import weakref
from pathlib import Path

import torch

from ..errors import UraeError
from .patches import PROBES, find_model_file, model_probes, with_proportional_attention
from .settings import PRESET_CHOICES, SIGMA_TABLE, flux_sampling_mu, hires_settings

CATEGORY = "URAE"
MIB = 2**20


def _flux_model(model):
    """ComfyUI's FLUX diffusion model inside a MODEL, or one clear error."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if inner is None or not hasattr(inner, "pe_embedder") or not hasattr(inner, "double_blocks"):
        raise UraeError("URAE nodes need a FLUX.1 model (dev or schnell), loaded with UNETLoader or a checkpoint")
    return inner


class UraeHighResolution:
    """MODEL -> MODEL with URAE's three inference settings: NTK RoPE θ, proportional attention, static shift."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = (
        "URAE's inference settings for 2K/4K FLUX: RoPE base 10000·ntk, attention scaled by sqrt(log N / log 4608) "
        "for N text + image tokens, and a static time shift. Defaults = `urae-lite generate --preset`."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A FLUX.1 dev or schnell model (with its URAE LoRA applied)."}),
                "preset": (
                    list(PRESET_CHOICES),
                    {
                        "default": "dev 2k",
                        "tooltip": "The settings of `urae-lite generate --preset` for this model family and size; "
                        "'custom' takes ntk and shift below.",
                    },
                ),
                "ntk": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1000.0,
                        "step": 0.5,
                        "tooltip": "RoPE base = 10000·ntk; 0 = the preset's (10).",
                    },
                ),
                "shift": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "tooltip": "Static time shift s (σ' = sσ / (1 + (s−1)σ)); 0 = the preset's (dev 3, schnell 1).",
                    },
                ),
                "ntk_rope": ("BOOLEAN", {"default": True, "tooltip": "Patch the RoPE base θ."}),
                "proportional_attention": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Scale attention logits by sqrt(log N / log 4608)."},
                ),
                "static_shift": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Replace the model's sampling shift by the static shift."},
                ),
            }
        }

    def patch(self, model, preset, ntk, shift, ntk_rope, proportional_attention, static_shift):
        import comfy.model_sampling

        _flux_model(model)
        s = hires_settings(preset, ntk, shift, ntk_rope, proportional_attention, static_shift)
        m = model.clone()
        if s.theta is not None:  # an object patch: the shared module is untouched, the clone sees its own copy
            embedder = copy.copy(m.get_model_object("diffusion_model.pe_embedder"))
            embedder.theta = s.theta
            m.add_object_patch("diffusion_model.pe_embedder", embedder)
        if s.proportional_attention:
            m.model_options["transformer_options"] = with_proportional_attention(
                m.model_options.get("transformer_options", {})
            )
        if s.shift is not None:  # as ComfyUI's ModelSamplingFlux node builds it, with μ = ln(s), finer table

            class ModelSamplingStatic(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
                pass

            sampling = ModelSamplingStatic(m.model.model_config)
            sampling.set_parameters(shift=flux_sampling_mu(s.shift), timesteps=SIGMA_TABLE)
            m.add_object_patch("model_sampling", sampling)
        return (m,)


class UraeTiledVAEDecode:
    """VAE + LATENT -> IMAGE by urae_lite's exact strip-tiled decode: seamless, a plain decode's numbers."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    DESCRIPTION = (
        "Exact strip-tiled VAE decode: the same image as a plain decode (up to float rounding, no seams) in the "
        "memory of a few strips; a 4096² FLUX image decodes in a few GiB."
    )
    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ComfyUI VAE -> diffusers AutoencoderKL

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to decode."}),
                "vae": ("VAE", {"tooltip": "The FLUX VAE (ae.safetensors)."}),
                "tile_budget": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 1 << 20,
                        "step": 64,
                        "tooltip": "MiB the decode may use; a plain decode when it fits, else exact strips. "
                        "0 = auto (the device's free memory).",
                    },
                ),
            }
        }

    @classmethod
    def autoencoder(cls, vae) -> torch.nn.Module:
        """The diffusers AutoencoderKL of a ComfyUI VAE, converted once per VAE object (kept on the CPU)."""
        ae = cls._cache.get(vae)
        if ae is None:
            from .vae_convert import ldm_to_autoencoder

            groups = vae.first_stage_model.decoder.norm_out.num_groups
            sd = {k: v.detach().to("cpu") for k, v in vae.get_sd().items()}
            ae = cls._cache[vae] = ldm_to_autoencoder(sd, groups, vae.vae_dtype)
        return ae

    def decode(self, samples, vae, tile_budget):
        import comfy.model_management as mm

        from ..vae_tiling import decode

        ae = self.autoencoder(vae)
        device = vae.device
        weights = sum(p.numel() * p.element_size() for p in ae.parameters())
        mm.free_memory(weights + tile_budget * MIB, device)
        try:
            ae.to(device)
            latents = samples["samples"].to(device=device, dtype=vae.vae_dtype)
            out = decode(ae, latents, mode="auto", free_bytes=tile_budget * MIB if tile_budget else None)
        finally:
            ae.to("cpu")
        image = torch.clamp((out.float() + 1.0) / 2.0, 0.0, 1.0)  # ComfyUI's VAE.process_output
        return (image.movedim(1, -1).to(mm.intermediate_device()),)


def _lora_names() -> list[str]:
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI (the pure tests read the inputs): no model folders to list
        return []
    return folder_paths.get_filename_list("loras")


class Urae4KAdapter:
    """MODEL + the authors' 2K and 4K files -> MODEL with their exact LoRA (urae_lite.convert), cached on disk."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    DESCRIPTION = (
        "The authors' 4K adapter only means something against the SVD of (base + 2K LoRA): it is converted once "
        "against the model's file into one exact LoRA (which includes the 2K LoRA), cached beside the 4K file."
    )

    @classmethod
    def INPUT_TYPES(cls):
        names = _lora_names()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "FLUX.1 from UNETLoader or a checkpoint, without the 2K LoRA."}),
                "adapter_2k": (names, {"tooltip": "urae_2k_adapter.safetensors (in models/loras)."}),
                "adapter_4k": (names, {"tooltip": "urae_4k_adapter.safetensors (in models/loras)."}),
                "strength": (
                    "FLOAT",
                    {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "LoRA strength (1 = exact)."},
                ),
            }
        }

    def apply(self, model, adapter_2k, adapter_4k, strength):
        import comfy.lora
        import comfy.lora_convert
        import comfy.utils
        import folder_paths

        from ..adapter_cache import converted_4k
        from ..adapter_io import read_adapter
        from ..model_files import resolve_files

        unet = self.model_file(model)
        path = converted_4k(
            resolve_files(unet),
            read_adapter(folder_paths.get_full_path_or_raise("loras", adapter_2k)),
            read_adapter(folder_paths.get_full_path_or_raise("loras", adapter_4k)),
            progress=False,
        )
        lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(path), safe_load=True))
        patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
        expected = len(read_adapter(path).modules)
        if len(patches) != expected:
            raise UraeError(
                f"ComfyUI mapped {len(patches)} of the {expected} modules of {path.name} onto this model: "
                "is it the FLUX model the adapters belong to?"
            )
        m = model.clone()
        m.add_patches(patches, strength)
        return (m,)

    @staticmethod
    def model_file(model) -> Path:
        """The unet / checkpoint file the MODEL was loaded from (matched by its tensors), or one clear error."""
        import folder_paths

        inner = _flux_model(model)
        probes = model_probes({k: v for k, v in inner.state_dict().items() if k in PROBES})
        candidates = [
            folder_paths.get_full_path(folder, name)
            for folder in ("diffusion_models", "checkpoints")
            for name in folder_paths.get_filename_list(folder)
        ]
        found = find_model_file([c for c in candidates if c], probes)
        if found is None:
            raise UraeError(
                "URAE 4K adapter: the model's file is not among ComfyUI's diffusion_models / checkpoints files; "
                "run `urae-lite convert ADAPTER_2K ADAPTER_4K --model YOUR_FLUX_FILE --format kohya --out "
                "models/loras/urae_4k_converted.safetensors` and load it with LoraLoaderModelOnly instead"
            )
        return found


NODE_CLASS_MAPPINGS = {
    "UraeHighResolution": UraeHighResolution,
    "UraeTiledVAEDecode": UraeTiledVAEDecode,
    "Urae4KAdapter": Urae4KAdapter,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "UraeHighResolution": "URAE high-resolution",
    "UraeTiledVAEDecode": "URAE exact tiled VAE decode",
    "Urae4KAdapter": "URAE 4K adapter",
}
