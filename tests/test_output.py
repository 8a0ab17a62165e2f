"""GenerationResult: the PNG carries prompt, seed, model, adapters and every setting, and is written atomically."""

from __future__ import annotations

import json
import stat

import pytest
from PIL import Image

import urae_lite
from urae_lite.memory import MemorySettings
from urae_lite.output import GenerationResult
from urae_lite.presets import GenerationSettings
from urae_lite.report import RunReport

ADAPTERS = [{"path": "/loras/2k.safetensors", "sha256": "0123456789abcdef"}]


def _result(prompt: str = 'a "quoted" café, 4K — ü') -> GenerationResult:
    image = Image.new("RGB", (32, 16), (200, 30, 60))
    image.putpixel((3, 5), (1, 2, 3))
    settings = GenerationSettings(width=32, height=16, steps=3, shift=None, ntk=1.0)
    memory = MemorySettings(quant="nf4", vae_tiling="on")
    return GenerationResult(image, prompt, 7, settings, "tiny", memory, ADAPTERS, RunReport())


def test_saved_png_reads_back_pixels_and_every_field(tmp_path):
    result = _result()
    path = result.save(tmp_path / "out" / "nested" / "image.png")  # missing folders are created
    assert path == tmp_path / "out" / "nested" / "image.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (32, 16)
        assert list(png.convert("RGB").getdata()) == list(result.image.getdata())  # lossless
        text = dict(png.text)
    assert text["prompt"] == result.prompt  # strings as they are (iTXt keeps non-ASCII)
    assert text["seed"] == "7" and text["model"] == "tiny" and text["quant"] == "nf4"
    assert json.loads(text["adapters"]) == ADAPTERS
    assert text["software"] == f"urae-lite {urae_lite.__version__}"
    everything = json.loads(text["urae_lite"])
    assert everything["seed"] == 7 and everything["prompt"] == result.prompt
    # the settings make the same image again: they rebuild the GenerationSettings exactly
    assert GenerationSettings(**everything["settings"]) == result.settings
    assert json.loads(text["settings"]) == everything["settings"]
    assert MemorySettings(**json.loads(text["memory"])) == result.memory  # how it fitted the card, recorded too


def test_save_replaces_an_old_file_readable_by_all_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"old")
    _result().save(path)
    assert Image.open(path).format == "PNG"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "image.png"
    path.write_bytes(b"old image")
    result = _result()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(result.image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        result.save(path)
    assert path.read_bytes() == b"old image"
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]
