"""Helpers for the training tests: a small deterministic dataset in the authors' layout, recipes for tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 64  # buckets of about 64² pixels: 4x4 = 16 image tokens for the tiny transformer
SIZES = [(96, 96), (120, 90), (90, 120), (128, 64), (64, 128), (192, 48), (48, 192), (80, 80)]


def make_image(width: int, height: int, seed: int):
    """Smooth colour gradients plus a little noise: structured enough for the VAE to give varied latents."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [
        np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform())) for _ in range(3)
    ]
    image = 127.5 + 100 * np.stack(channels, -1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(image.clip(0, 255).astype(np.uint8))


def make_dataset(folder: Path, sizes=SIZES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        make_image(w, h, i).save(folder / f"image_{i}.{('png', 'jpg', 'webp')[i % 3]}")
        (folder / f"image_{i}.json").write_text(
            json.dumps(
                {
                    "prompt": f"photo {i}",
                    "generated_prompt": f"a detailed photo of a red flower in a garden, number {i}",
                }
            )
        )
    return folder


def tree_leaves(tree, path: str = ""):
    """(path, value) for every leaf of a nested dict / list / tuple, in a fixed order."""
    if isinstance(tree, dict):
        for key in tree:
            yield from tree_leaves(tree[key], f"{path}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from tree_leaves(value, f"{path}/{i}")
    else:
        yield path, tree


def assert_same_tree(a, b) -> int:
    """Equal structure and bit-equal leaves (tensors: same dtype, shape and bits); returns the tensor count."""
    la, lb = list(tree_leaves(a)), list(tree_leaves(b))
    assert [p for p, _ in la] == [p for p, _ in lb]
    tensors = 0
    for (path, x), (_, y) in zip(la, lb):
        if isinstance(x, torch.Tensor):
            same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
            assert same, f"{path} differs"
            tensors += 1
        else:
            assert type(x) is type(y) and x == y, (path, x, y)
    return tensors


def recipe_overrides(model: Path, data: Path, out: Path, **extra) -> list[str]:
    """Settings that make a recipe run on the tiny model on the CPU in well under a second per step."""
    settings = {
        "model": str(model),
        "data.dir": str(data),
        "data.resolution": RESOLUTION,
        "output_dir": str(out),
        "device": "cpu",
        "validation.every": 0,
        "checkpoint.every": 0,
        "training.steps": 4,
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU their barriers cost 10-100x.

    Import it into a test module to use it there (autouse applies to modules that import it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
