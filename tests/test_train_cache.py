"""`urae-lite cache`: contents, bad input, resuming, and refusing a cache made for another model/resolution."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_utils import RESOLUTION, make_dataset, make_image, one_thread  # noqa: F401

from urae_lite.cli import main
from urae_lite.errors import UraeError
from urae_lite.train.cache import build_cache, default_cache_dir, open_cache
from urae_lite.train.data import make_buckets


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = make_dataset(tmp_path_factory.mktemp("data") / "train", sizes=[(96, 96), (120, 90), (48, 192)])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (folder / "broken.json").write_text(json.dumps({"prompt": "a broken file"}))
    make_image(40, 40, 9).save(folder / "small.png")
    (folder / "small.json").write_text(json.dumps({"prompt": "a small image"}))
    make_image(64, 64, 8).save(folder / "uncaptioned.png")
    return folder


def test_cache_contents_and_bad_input(dataset, tiny_flux, tmp_path):
    cache, skips = build_cache(dataset, str(tiny_flux), RESOLUTION, out=tmp_path / "c", progress=False)
    assert skips.reasons == {"corrupt image": 1, "without caption": 1}
    assert skips.warnings == {"upscaled": 1}
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["resolution"] == RESOLUTION and manifest["format_version"] == 1
    assert sorted(manifest["items"]) == ["image_0", "image_1", "image_2", "small"]
    assert manifest["items"]["small"]["columns"] == ["prompt"]
    buckets = make_buckets(RESOLUTION)
    for name, info in manifest["items"].items():
        assert (info["width"], info["height"]) in [(b.width, b.height) for b in buckets]
        latents = load_file(cache / "latents" / f"{name}.safetensors")
        assert latents["mean"].shape == latents["std"].shape == (16, info["height"] // 8, info["width"] // 8)
        assert (latents["std"] > 0).all()
        for column in info["columns"]:
            text = load_file(cache / "text" / f"{name}.{column}.safetensors")
            t5_width = json.loads((tiny_flux / "text_encoder_2" / "config.json").read_text())["d_model"]
            clip_width = json.loads((tiny_flux / "text_encoder" / "config.json").read_text())["hidden_size"]
            assert text["t5"].shape == (512, t5_width) and text["pooled"].shape == (clip_width,)
    assert (manifest["items"]["image_2"]["width"], manifest["items"]["image_2"]["height"]) == (32, 128)  # 1:4

    # --skip-small drops the image that would need upscaling instead of warning
    cache2, skips2 = build_cache(
        dataset, str(tiny_flux), RESOLUTION, out=tmp_path / "c2", skip_small=True, progress=False
    )
    assert "small" not in json.loads((cache2 / "manifest.json").read_text())["items"]
    assert skips2.reasons["smaller than its bucket"] == 1


def test_cache_matches_the_pipeline_encoders(dataset, tiny_flux, tmp_path):
    """T5 / pooled CLIP as FluxPipeline.encode_prompt makes them; posterior of the centre-cropped image."""
    cache, _ = build_cache(dataset, str(tiny_flux), RESOLUTION, out=tmp_path / "c", progress=False)
    _assert_pipeline_encodes_like_the_cache(tiny_flux, dataset, cache, "image_1")


def _assert_pipeline_encodes_like_the_cache(model, dataset, cache, item: str) -> None:
    """The cached T5 and pooled CLIP of `item`'s generated caption equal FluxPipeline.encode_prompt's."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model, dtype=torch.float32)
    caption = json.loads((dataset / f"{item}.json").read_text())["generated_prompt"]
    t5, pooled, _ = pipe.encode_prompt(caption, caption, device="cpu", max_sequence_length=512)
    text = load_file(cache / "text" / f"{item}.generated_prompt.safetensors")
    torch.testing.assert_close(text["t5"].float(), t5[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(text["pooled"].float(), pooled[0], atol=2e-2, rtol=1e-2)


def _with_tokenizer_2(tiny_flux, folder, source: str, declared: str):
    """A copy of the tiny folder whose tokenizer_2 holds `source`'s files, declared as `declared` in the index."""
    shutil.copytree(tiny_flux, folder)
    shutil.rmtree(folder / "tokenizer_2")
    shutil.copytree(tiny_flux / source, folder / "tokenizer_2")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "tokenizer_2": ["transformers", declared]}))
    return folder


def _cover_vocabulary(folder, tokenizer_folder) -> None:
    """Grow the folder's T5 embedding to the new tokenizer's vocabulary (as a derivative that swaps it must)."""
    from transformers import AutoTokenizer, T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2")
    t5.resize_token_embeddings(len(AutoTokenizer.from_pretrained(tokenizer_folder)))
    t5.save_pretrained(folder / "text_encoder_2")


def test_cache_loads_the_tokenizer_classes_the_folder_declares(dataset, tiny_flux, tmp_path):
    """A derivative whose tokenizer_2 is another kind of fast tokenizer (here a byte-level BPE, which
    T5TokenizerFast cannot read): the cache encodes with it exactly as the generation pipeline does."""
    model = _with_tokenizer_2(tiny_flux, tmp_path / "derived", "tokenizer", "CLIPTokenizerFast")
    _cover_vocabulary(model, model / "tokenizer_2")
    cache, _ = build_cache(dataset, str(model), RESOLUTION, out=tmp_path / "c", progress=False)
    _assert_pipeline_encodes_like_the_cache(model, dataset, cache, "image_0")


def test_cache_with_an_unreadable_tokenizer_is_one_line(dataset, tiny_flux, tmp_path, capsys):
    model = _with_tokenizer_2(tiny_flux, tmp_path / "broken", "tokenizer", "T5TokenizerFast")
    args = ["cache", str(dataset), "--model", str(model), "--resolution", str(RESOLUTION), "--out", str(tmp_path / "c")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("urae-lite: error: cannot load") and "tokenizer_2 as T5TokenizerFast" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_cache_resumes_and_recomputes_only_what_changed(dataset, tiny_flux, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    cache, _ = build_cache(data, str(tiny_flux), RESOLUTION, progress=False)
    assert cache == default_cache_dir(data, RESOLUTION)
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    build_cache(data, str(tiny_flux), RESOLUTION, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == stamps

    (cache / "latents" / "image_0.safetensors").unlink()  # as if killed before writing it
    (data / "image_1.json").write_text(json.dumps({"prompt": "an edited caption"}))
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(UraeError, match="unfinished.*urae-lite cache"):
        open_cache(data, str(tiny_flux), RESOLUTION)
    build_cache(data, str(tiny_flux), RESOLUTION, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    changed = {n for n in after if after[n] != stamps.get(n)}
    assert changed == {"image_0.safetensors", "image_1.prompt.safetensors"}
    assert open_cache(data, str(tiny_flux), RESOLUTION).items[1].columns == ("prompt",)


def test_stale_cache_is_refused_with_the_rebuild_command(dataset, tiny_flux, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    assert main(["cache", str(data), "--model", str(tiny_flux), "--resolution", str(RESOLUTION)]) == 0
    other = tmp_path / "other-model"
    shutil.copytree(tiny_flux, other)
    vae_config = json.loads((other / "vae" / "config.json").read_text())
    (other / "vae" / "config.json").write_text(json.dumps({**vae_config, "scaling_factor": 0.5}))

    with pytest.raises(UraeError, match=f"made at resolution {RESOLUTION}, not 128.*--resolution 128"):
        open_cache(data, str(tiny_flux), 128, cache=default_cache_dir(data, RESOLUTION))
    with pytest.raises(UraeError, match=f"made with model .* differ.*urae-lite cache {data} --model {other}"):
        open_cache(data, str(other), RESOLUTION)
    assert main(["cache", str(data), "--model", str(other), "--resolution", str(RESOLUTION)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["cache", str(data), "--model", str(other), "--resolution", str(RESOLUTION), "--overwrite"]) == 0
    assert open_cache(data, str(other), RESOLUTION).items
    with pytest.raises(UraeError, match="no cache at"):
        open_cache(data, str(other), 128)


def test_the_rebuild_command_keeps_the_data_keys_and_t5_length(dataset, tiny_flux, tmp_path, capsys):
    """The command a refused cache prints, when run, builds a cache the training accepts: it carries the user's
    data.* keys and T5 length (a command without them builds another cache, which training then refuses)."""
    import re
    import shlex

    from urae_lite.train.config import DataConfig

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_flux, other)
    vae_config = json.loads((other / "vae" / "config.json").read_text())
    (other / "vae" / "config.json").write_text(json.dumps({**vae_config, "scaling_factor": 0.5}))
    wanted = ["data.caption_prefix=sks", "--resolution", str(RESOLUTION), "--max-sequence-length", "32"]
    assert main(["cache", str(data), "--model", str(tiny_flux), *wanted]) == 0
    recipe_data = DataConfig(dir=str(data), caption_prefix="sks")

    assert main(["cache", str(data), "--model", str(other), *wanted]) == 2  # refused: made with another model
    building = re.search(r"Rebuild it with `(.*?)`", capsys.readouterr().err).group(1)
    with pytest.raises(UraeError, match="Rebuild it with `(.*?)`") as training:  # training refuses it too
        open_cache(data, str(other), RESOLUTION, data=recipe_data)
    opening = re.search(r"Rebuild it with `(.*?)`", str(training.value)).group(1)
    for command in (building, opening):
        words = shlex.split(command)
        assert words[:2] == ["urae-lite", "cache"] and "data.caption_prefix=sks" in words
        assert words[words.index("--max-sequence-length") + 1] == "32"
    assert main(shlex.split(building)[1:]) == 0
    assert open_cache(data, str(other), RESOLUTION, data=recipe_data).items
    assert json.loads((default_cache_dir(data, RESOLUTION) / "manifest.json").read_text())["max_sequence_length"] == 32
