"""The page's loaded-once pipeline (urae_lite.ui.session), in process: new adapters or a new base format load only
the transformer again (the text encoders and VAE are the very same objects), and the image is still the one
`urae-lite generate` makes with those settings from scratch; a new T5 format loads everything."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from synthetic_adapters import write_authors_2k

from urae_lite.cli import main
from urae_lite.pipeline import SHARED_COMPONENTS
from urae_lite.report import RunReport

pytest.importorskip("gradio", reason="the ui extra (gradio) is not installed")

from urae_lite.ui.session import Session  # noqa: E402

SIZE = ["--width", "64", "--height", "64", "--steps", "1", "--seed", "3"]


def _cli_image(argv: list[str], out) -> np.ndarray:
    assert main([*argv, "--out", str(out)]) == 0
    return np.asarray(Image.open(out))


def test_only_the_transformer_loads_again_and_the_image_is_the_clis(tmp_path, tiny_flux, tiny_config):
    lora = write_authors_2k(tmp_path / "style.safetensors", tiny_config, seed=1, std=0.2)
    base = ["generate", "a red fox", "--model", str(tiny_flux), *SIZE, "--quant", "bf16", "--t5-quant", "bf16"]
    session = Session()

    first = session.generate([*base, "--out", str(tmp_path / "1.png")], RunReport())
    assert first.pipeline == "loaded"
    shared = session.pipe.shared_components()
    transformer = session.pipe.transformer

    for step, argv in enumerate(
        [
            [*base, "--adapter", str(lora)],  # new adapters
            [*base[:-4], "--quant", "nf4", "--t5-quant", "bf16", "--adapter", str(lora)],  # new base format
        ]
    ):
        got = session.generate([*argv, "--out", str(tmp_path / f"page{step}.png")], RunReport())
        assert got.pipeline == "loaded transformer"
        assert session.pipe.transformer is not transformer
        assert all(session.pipe.shared_components()[n] is shared[n] for n in SHARED_COMPONENTS)
        transformer = session.pipe.transformer
        # the same computation in the same process order as a fresh CLI run: equal pixels, not just close ones
        expected = _cli_image(argv, tmp_path / f"cli{step}.png")
        assert np.array_equal(np.asarray(Image.open(got.path)), expected)

    again = session.generate([*argv, "--out", str(tmp_path / "again.png")], RunReport())
    assert again.pipeline == "reused"

    t5 = session.generate([*base[:-2], "--t5-quant", "nf4", "--out", str(tmp_path / "t5.png")], RunReport())
    assert t5.pipeline == "loaded"
    assert session.pipe.shared_components()["text_encoder_2"] is not shared["text_encoder_2"]
