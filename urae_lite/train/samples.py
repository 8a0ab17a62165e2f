"""Training samples from the cache: the sample at global index i is a pure function of (seed, i).

Order: epoch e = i // n visits the items in a permutation seeded by (seed, e); position i % n picks the item.
Draws (caption column, σ, posterior ε, noise) use `sample_generator(seed, i)`. Process r of W with G
accumulation steps computes, at optimizer step k and micro-step m, index k·W·G + m·W + r, so one process with
G = 2 and two processes with G = 1 see the same samples in the same optimizer steps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UraeError
from .cache import CachedDataset, CachedItem
from .config import TrainConfig
from .data import SkipLog, choose_caption
from .flow import latent_image_ids, noisy_and_target, pack_latents, posterior_sample, sample_generator, sample_sigma


@dataclass
class TrainSample:
    """One transformer call's inputs and target, on the CPU; `to` moves it."""

    index: int
    item: str
    column: str
    sigma: float
    noisy: torch.Tensor  # (1, tokens, 64) packed x_σ, fp32
    target: torch.Tensor  # (1, tokens, 64) packed n − x0, fp32
    t5: torch.Tensor  # (1, L, 4096)
    pooled: torch.Tensor  # (1, 768)
    img_ids: torch.Tensor  # (tokens, 3)
    txt_ids: torch.Tensor  # (L, 3)

    def to(self, device: torch.device) -> TrainSample:
        moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in vars(self).items()}
        return TrainSample(**moved)


def vae_factors(model_root: Path) -> tuple[float, float]:
    """(shift_factor, scaling_factor) of the model's VAE (FLUX: 0.1159, 0.3611)."""
    try:
        config = json.loads((model_root / "vae" / "config.json").read_text())
        return float(config["shift_factor"]), float(config["scaling_factor"])
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise UraeError(f"cannot read the VAE's shift/scaling factors from {model_root / 'vae'}: {e}") from e


def build_sample(
    index: int,
    item: CachedItem,
    mean: torch.Tensor,
    std: torch.Tensor,
    column: str,
    t5: torch.Tensor,
    pooled: torch.Tensor,
    sigma: float,
    gen: torch.Generator,
    shift_factor: float,
    scaling_factor: float,
) -> TrainSample:
    x0 = posterior_sample(mean[None], std[None], gen, shift_factor, scaling_factor)
    noisy, target = noisy_and_target(x0, sigma, gen)
    h, w = x0.shape[-2:]
    return TrainSample(
        index,
        item.name,
        column,
        sigma,
        pack_latents(noisy),
        pack_latents(target),
        t5[None],
        pooled[None],
        latent_image_ids(h, w),
        torch.zeros(t5.shape[0], 3),
    )


class SampleSource:
    """Deterministic samples over a cached dataset; unreadable cache files are skipped, never fatal."""

    def __init__(
        self, dataset: CachedDataset, cfg: TrainConfig, shift_factor: float, scaling_factor: float, skips: SkipLog
    ):
        self.dataset, self.cfg, self.skips = dataset, cfg, skips
        self.shift_factor, self.scaling_factor = shift_factor, scaling_factor
        self.bad: set[str] = set()
        self._perm: tuple[int, torch.Tensor] | None = None

    def item_at(self, index: int) -> CachedItem:
        n = len(self.dataset)
        epoch = index // n
        if self._perm is None or self._perm[0] != epoch:
            digest = hashlib.sha256(f"urae_lite.order:{self.cfg.seed}:{epoch}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            self._perm = (epoch, torch.randperm(n, generator=gen))
        return self.dataset.items[int(self._perm[1][index % n])]

    def get(self, index: int) -> TrainSample:
        for offset in range(len(self.dataset)):
            item = self.item_at(index + offset)
            if item.name in self.bad:
                continue
            try:
                return self._build(index, item)
            except UraeError as e:
                self.bad.add(item.name)
                self.skips.skip(item.name, "unreadable cache file", str(e))
        raise UraeError(f"every cached item failed to load ({self.skips.summary()}); rebuild the cache")

    def _build(self, index: int, item: CachedItem) -> TrainSample:
        t = self.cfg.training
        gen = sample_generator(self.cfg.seed, index)
        column = choose_caption(list(item.columns), self.cfg.data.caption_mix, torch.rand((), generator=gen).item())
        sigma = sample_sigma(gen, t.timesteps, t.logit_mean, t.logit_std)
        mean, std = self.dataset.latent(item)
        t5, pooled = self.dataset.text(item, column)
        return build_sample(
            index, item, mean, std, column, t5, pooled, sigma, gen, self.shift_factor, self.scaling_factor
        )
