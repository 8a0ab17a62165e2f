"""What the planner knows about a FLUX transformer, read from its config (never from hard-coded totals).

The model is built on the meta device with the loader's own `empty_transformer` (no weights, well under a second),
so the linears the loader quantizes, the adapter targets and every other parameter are exactly the ones a real load
would make, for FLUX.1-dev, schnell or any FLUX-shaped test config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

from .. import flux_configs as F
from ..quant import get_format
from . import constants as C


@dataclass(frozen=True)
class Linear:
    """One block linear: (out, in) weight quantized by the loader, bf16 bias, maybe an adapter target."""

    name: str
    out_features: int
    in_features: int
    bias: bool
    target: bool  # on the authors' adapter targets (docs/method.md)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def weight_bytes(self, quant: str) -> int:
        """Bytes of the frozen base as its format stores it (urae_lite.quant's layout), plus the bf16 bias."""
        w = get_format(quant).nbytes(self.out_features, self.in_features)
        return w + (self.out_features * C.BF16 if self.bias else 0)


@dataclass(frozen=True)
class FluxArch:
    """Shapes that set memory: widths, depths, every block linear, and the bf16 parameters outside them."""

    hidden: int
    head_dim: int
    n_double: int
    n_single: int
    in_channels: int
    joint_dim: int
    mlp_ratio: float  # MLP width / hidden (4 in FLUX: double-block FF and single-block proj_mlp)
    guidance: bool
    linears: tuple[Linear, ...]
    other_params: int  # embedders, norms, output head: kept in bf16 by the loader

    @property
    def n_blocks(self) -> int:
        return self.n_double + self.n_single

    @property
    def params(self) -> int:
        return sum(l.numel + (l.out_features if l.bias else 0) for l in self.linears) + self.other_params

    @cached_property
    def _memo(self) -> dict:
        """Results of the per-block sums below: the `--vram` search asks for them hundreds of times."""
        return {}

    def _cached(self, key: tuple, compute: Callable[[], object]):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def weight_bytes(self, quant: str) -> int:
        """The transformer as loaded: quantized block linears + bf16 everything else."""
        return sum(self.block_weight_bytes(quant).values()) + self.other_params * C.BF16

    def largest_linear(self) -> Linear:
        return self._cached(("largest",), lambda: max(self.linears, key=lambda l: l.numel))

    def block_names(self) -> tuple[str, ...]:
        """Blocks in execution order: the double-stream blocks, then the single-stream ones."""
        from ..block_swap import block_names

        return block_names(self.n_double, self.n_single)

    def block_weight_bytes(self, quant: str) -> dict[str, int]:
        """Each block's quantized linears (+ biases), in execution order."""

        def compute() -> dict[str, int]:
            per_block = dict.fromkeys(self.block_names(), 0)
            for l in self.linears:
                per_block[_block_of(l.name)] += l.weight_bytes(quant)
            return per_block

        return self._cached(("weights", quant), compute)

    def block_bytes(self, quant: str) -> int:
        """The largest block's weights (group offload moves one block at a time)."""
        return max(self.block_weight_bytes(quant).values())

    def block_adapter_params(self, rank: int) -> dict[str, int]:
        """Each block's share of a rank-`rank` adapter on the authors' targets, in execution order."""

        def compute() -> dict[str, int]:
            per_block = dict.fromkeys(self.block_names(), 0)
            for l in self.linears:
                if l.target:
                    per_block[_block_of(l.name)] += rank * (l.in_features + l.out_features)
            return per_block

        return self._cached(("adapter", rank), compute)

    def adapter_params(self, rank: int) -> int:
        """Parameters of one rank-`rank` adapter on the authors' targets: r·(in + out) per target."""
        return sum(self.block_adapter_params(rank).values())

    def block_flops(self, image: int, text: int) -> dict[str, float]:
        """GEMM + attention FLOPs of each block's forward (2 per multiply-add; q·kᵀ and p·v each 2·N²·D)."""

        def compute() -> dict[str, float]:
            per_block = dict.fromkeys(self.block_names(), 4.0 * (image + text) ** 2 * self.hidden)
            for l in self.linears:
                if ".norm" in l.name:  # adaLN modulation: applied to the (1, D) conditioning vector
                    tokens = 1
                elif l.name.startswith("transformer_blocks."):  # two streams: text projections see the text only
                    tokens = text if ("add_" in l.name or "context" in l.name) else image
                else:
                    tokens = image + text
                per_block[_block_of(l.name)] += 2.0 * l.numel * tokens
            return per_block

        return self._cached(("flops", image, text), compute)

    def token_flops(self, image: int, text: int) -> float:
        """GEMM FLOPs of the blocks' per-token parts (every block linear but the adaLN modulation, which sees one
        conditioning vector): what token chunking runs once more in a training step (token_chunking.py)."""
        attention = 4.0 * (image + text) ** 2 * self.hidden * self.n_blocks
        modulation = sum(2.0 * l.numel for l in self.linears if ".norm" in l.name)
        return sum(self.block_flops(image, text).values()) - attention - modulation

    def targets_per_block(self, double: bool) -> int:
        prefix = "transformer_blocks.0." if double else "single_transformer_blocks.0."
        return self._cached(
            ("targets", double), lambda: sum(l.target for l in self.linears if l.name.startswith(prefix))
        )


def _block_of(linear_name: str) -> str:
    """`single_transformer_blocks.3.attn.to_q` -> `single_transformer_blocks.3`."""
    return ".".join(linear_name.split(".")[:2])


def image_tokens(width: int, height: int) -> int:
    """Transformer image tokens: 8x VAE downsampling, then 2x2 latent patches (1024² -> 4096)."""
    side = F.VAE_DOWNSAMPLE * F.PATCH
    return (width // side) * (height // side)


def flux_arch(config: dict) -> FluxArch:
    """The FluxArch of a diffusers FluxTransformer2DModel config (cached per config)."""
    return _flux_arch(json.dumps(config, sort_keys=True, default=list))


@lru_cache(maxsize=8)
def _flux_arch(config_json: str) -> FluxArch:
    from ..adapted_linear import AdaptedLinear
    from ..loader import empty_transformer
    from ..targets import is_adapter_target

    config = json.loads(config_json)
    model = empty_transformer(config)
    linears = tuple(
        Linear(name, m.out_features, m.in_features, m.bias is not None, is_adapter_target(name))
        for name, m in model.named_modules()
        if isinstance(m, AdaptedLinear)
    )
    adapted = {name for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    # everything outside the quantized linears (whose meta bias placeholders are counted in `linears`)
    other = sum(
        t.numel() for n, t in [*model.named_parameters(), *model.named_buffers()] if n.rpartition(".")[0] not in adapted
    )
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = model.single_transformer_blocks[0].proj_mlp.out_features if config["num_single_layers"] else 4 * hidden
    return FluxArch(
        hidden=hidden,
        head_dim=config["attention_head_dim"],
        n_double=config["num_layers"],
        n_single=config["num_single_layers"],
        in_channels=config["in_channels"],
        joint_dim=config["joint_attention_dim"],
        mlp_ratio=mlp / hidden,
        guidance=bool(config.get("guidance_embeds")),
        linears=linears,
        other_params=other,
    )


def t5_params() -> int:
    """T5-v1.1-XXL encoder: embedding + 24 x (attention 4d² + gated FF 3·d·d_ff + 2 norms) + bias table + norm."""
    d, f = F.T5_D_MODEL, F.T5_D_FF
    return F.T5_VOCAB * d + F.T5_LAYERS * (4 * d * d + 3 * d * f + 2 * d) + 32 * F.T5_HEADS + d


def clip_params() -> int:
    """CLIP-L text tower: token + position embeddings + 12 x (attention with biases, MLP with biases, 2 LayerNorms)."""
    w, m = F.CLIP_WIDTH, F.CLIP_MLP
    layer = 4 * (w * w + w) + 2 * w * m + m + w + 4 * w
    return (F.CLIP_VOCAB + F.CLIP_POSITIONS) * w + F.CLIP_LAYERS * layer + 2 * w


@lru_cache(maxsize=1)
def vae_params() -> int:
    """FLUX.1's AutoencoderKL built from its config on the meta device."""
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**F.FLUX_VAE_CONFIG)
    return sum(p.numel() for p in vae.parameters())
