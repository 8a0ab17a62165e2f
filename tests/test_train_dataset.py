"""Datasets as hobbyists have them (kohya / ai-toolkit / OneTrainer layouts): captions, repeats, sizes,
`urae-lite cache --check`, and what the cache makes of them."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from train_utils import RESOLUTION, make_image, one_thread  # noqa: F401

from urae_lite.cli import main
from urae_lite.errors import UraeError
from urae_lite.train.cache import build_cache, open_cache
from urae_lite.train.cache_layout import FILE_OVERHEAD_BOUND, CacheDims
from urae_lite.train.captions import DEFAULT_SOURCE, caption_texts, choose_caption, shuffle_parts
from urae_lite.train.config import DataConfig
from urae_lite.train.data import Bucket
from urae_lite.train.dataset_report import survey

CAT = "a cat, sitting, on a mat, red, fluffy, indoors"
# At RESOLUTION 64 the buckets are 64x64 (1:1), 80x48 (4:3) and 48x96 (1:2): sides round(64·√ratio / 16)·16.
SQUARE, WIDE, TALL = Bucket(64, 64), Bucket(80, 48), Bucket(48, 96)


def kohya_tree(folder: Path) -> Path:
    """10_cat (10 repeats) with .txt captions, a nested 5_dog/close with a .caption, an image with both .txt and
    .json, one without a caption, one below min_side, and a 4_small folder of images upscaled to fill 64x64."""
    files = {
        "10_cat/a.png": (96, 96, CAT, ".txt"),
        "10_cat/mild.png": (56, 56, "a cat, close", ".txt"),  # upscaled 64/56 = 1.14x: not worth a warning
        "10_cat/small.png": (40, 40, "a small cat", ".txt"),  # 1.6x
        "10_cat/2_extra/e.png": (64, 64, "an extra cat", ".txt"),  # the innermost N_name folder counts: 2 repeats
        "5_dog/close/b.jpg": (120, 90, "a dog", ".caption"),
        "misc/c.png": (64, 128, "txt caption", ".txt"),
        "misc/nocap.png": (80, 80, None, None),
        "tiny.png": (20, 20, "tiny", ".txt"),
        **{f"4_small/s{side}.png": (side, side, f"small {side}", ".txt") for side in (48, 44, 36, 40)},
    }
    for i, (rel, (w, h, caption, suffix)) in enumerate(sorted(files.items())):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(w, h, i).save(path)
        if caption is not None:
            path.with_suffix(suffix).write_text(caption + "\n")
    (folder / "misc/c.json").write_text(json.dumps({"prompt": "json caption", "generated_prompt": "long, json"}))
    return folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return kohya_tree(tmp_path_factory.mktemp("kohya") / "data")


def _data(tree: Path, **keys) -> DataConfig:
    return DataConfig(dir=str(tree), **{"caption_prefix": "ohwx", "min_side": 24, **keys})


def test_kohya_tree_gives_samples_repeats_prefixes_buckets_and_skips(tree):
    report = survey(tree, RESOLUTION, _data(tree))
    by_name = {s.name: s for s in report.samples}
    small = [f"4_small/s{side}" for side in (36, 40, 44, 48)]
    cats = ["10_cat/a", "10_cat/mild", "10_cat/small", "10_cat/2_extra/e"]
    assert sorted(by_name) == sorted([*cats, "5_dog/close/b", "misc/c", *small])
    assert {n: s.repeats for n, s in by_name.items()} == {
        "10_cat/a": 10,
        "10_cat/mild": 10,
        "10_cat/small": 10,
        "10_cat/2_extra/e": 2,  # the innermost N_name folder above the image
        "5_dog/close/b": 5,
        "misc/c": 1,
        **dict.fromkeys(small, 4),
    }
    assert report.samples_per_epoch == 3 * 10 + 2 + 5 + 1 + 4 * 4
    assert by_name["10_cat/a"].captions == {"prompt": f"ohwx, {CAT}"}
    assert (by_name["5_dog/close/b"].source, by_name["5_dog/close/b"].captions) == (
        ".caption",
        {"prompt": "ohwx, a dog"},
    )
    c = by_name["misc/c"]  # .txt and .json: the authors' JSON wins, both columns kept for the 20/80 mix
    assert (c.source, c.shadowed) == (".json", (".txt",))
    assert c.captions == {"prompt": "ohwx, json caption", "generated_prompt": "ohwx, long, json"}
    assert report.sources() == {".txt": 8, ".caption": 1, ".json": 1}
    assert {n: s.bucket for n, s in by_name.items() if not n.startswith("4_")} == {
        "10_cat/a": SQUARE,
        "10_cat/mild": SQUARE,
        "10_cat/small": SQUARE,
        "10_cat/2_extra/e": SQUARE,
        "5_dog/close/b": WIDE,
        "misc/c": TALL,
    }
    assert report.histogram() == {SQUARE: (8, 48), WIDE: (1, 5), TALL: (1, 1)}
    assert report.skips.reasons == {"without caption": 1, "smaller than data.min_side": 1}
    assert report.skips.names == {"without caption": ["misc/nocap.png"], "smaller than data.min_side": ["tiny.png"]}
    # more than 1.25x: 10_cat/small (1.6x) and 4_small's 36, 40, 44 (48 is 1.33x too); mild (1.14x) is not
    upscaled = report.upscaled()
    assert {k: [s.name for s in v] for k, v in upscaled.items()} == {
        "10_cat": ["10_cat/small"],
        "4_small": [f"4_small/s{side}" for side in (36, 40, 44, 48)],
    }
    lines = report.upscale_lines()
    assert len(lines) == 2 and "10_cat: 1 image(s)" in lines[0] and "4_small: 4 image(s)" in lines[1]
    assert "s36.png 36x36->64x64, s40.png 40x40->64x64, s44.png 44x44->64x64)" in lines[1]  # the 3 smallest

    plain = survey(tree, RESOLUTION, _data(tree, folder_repeats=False, caption_prefix=None, default_caption="a photo"))
    assert {s.repeats for s in plain.samples} == {1}
    nocap = next(s for s in plain.samples if s.name == "misc/nocap")
    assert (nocap.source, nocap.captions) == (DEFAULT_SOURCE, {"prompt": "a photo"})
    assert next(s for s in plain.samples if s.name == "10_cat/a").captions == {"prompt": CAT}


def test_check_prints_the_report(tree, tiny_flux, capsys):
    args = ["cache", str(tree), "data.caption_prefix=ohwx", "data.min_side=24", "--check", "--resolution", "64"]
    assert main([*args, "--model", str(tiny_flux)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"dataset {tree}: 10 image(s), 54 sample(s) per epoch with repeats"
    assert "captions: 1 .caption, 1 .json, 8 .txt" in lines
    assert "  misc/c: .json wins over .txt" in lines
    assert (
        "repeats: 10_cat x10 (3 image(s)), 10_cat/2_extra x2 (1 image(s)), 4_small x4 (4 image(s)), "
        "5_dog/close x5 (1 image(s))" in lines
    )
    assert "skipped 2 item(s): 1 smaller than data.min_side, 1 without caption" in lines
    assert "  without caption: misc/nocap.png" in lines
    histogram = lines[lines.index("buckets at resolution 64 (images, samples per epoch):") + 1 :][:3]
    assert [line.split()[:3] for line in histogram] == [["64x64", "8", "48"], ["80x48", "1", "5"], ["48x96", "1", "1"]]
    assert sum(line.startswith("warning: ") and "upscaled more than 1.25x" in line for line in lines) == 2
    # the tiny model's shapes: 11 caption embeddings (misc/c has two columns) of T5 512x64 + CLIP 32
    assert (
        lines[-1].startswith("estimated cache size:") and "11 caption embedding(s) of T5 512x64 + CLIP 32" in lines[-1]
    )
    assert err == ""  # the skips are in the report, not logged twice


def test_check_on_an_empty_dataset_is_one_line(tmp_path, capsys):
    assert main(["cache", str(tmp_path), "--check", "--resolution", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("urae-lite: error: empty dataset")
    make_image(80, 80, 0).save(tmp_path / "a.png")  # an image, but every image is skipped
    (tmp_path / "a.txt").write_text("a")
    assert main(["cache", str(tmp_path), "data.min_side=100", "--check", "--resolution", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty dataset" in err[0] and "1 smaller than data.min_side" in err[0]


@pytest.mark.parametrize("resolution", [0, -16, 100])
def test_a_bad_resolution_is_one_line_for_check_and_cache_alike(resolution, tiny_flux, tmp_path, capsys):
    """--check refuses what the cache refuses, with the same line (presets.check_side), before it reads a file."""
    make_image(80, 80, 0).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a")
    for extra in (["--check"], ["--model", str(tiny_flux)]):
        assert main(["cache", str(tmp_path), "--resolution", str(resolution), *extra]) == 2
        out, err = capsys.readouterr()
        line = f"urae-lite: error: --resolution {resolution} is not a positive multiple of 16: use "
        assert out == "" and err.startswith(line) and err.count("\n") == 1, err


def test_shuffle_keeps_the_first_parts_and_permutes_the_rest():
    parts = CAT.split(", ")
    for keep in (0, 1, 2):
        out = [shuffle_parts(CAT, keep, f"k{v}").split(", ") for v in range(8)]
        for variant in out:
            assert variant[:keep] == parts[:keep] and sorted(variant) == sorted(parts)
        assert len({tuple(v) for v in out}) > 1  # the variants do differ
        assert shuffle_parts(CAT, keep, "k0") == ", ".join(out[0])  # a function of its key
    texts = caption_texts(
        "a", {"prompt": CAT, "generated_prompt": "one part"}, _data(Path("."), shuffle_caption_parts=True, keep_parts=1)
    )
    assert sorted(texts) == ["generated_prompt", *(f"prompt~{v}" for v in range(4))]  # one part: nothing to shuffle
    assert texts["generated_prompt"] == "ohwx, one part"
    for v in range(4):  # the trigger word first, then the kept part, then a permutation of the others
        got = texts[f"prompt~{v}"].split(", ")
        assert got[:2] == ["ohwx", parts[0]] and sorted(got[2:]) == sorted(parts[1:])
    # the 20/80 mix is kept, each column's share split equally among its variants
    keys = ["generated_prompt", *(f"prompt~{v}" for v in range(4))]
    counts = Counter(
        choose_caption(keys, {"prompt": 0.2, "generated_prompt": 0.8}, (i + 0.5) / 10000) for i in range(10000)
    )
    assert counts == {"generated_prompt": 8000, **{f"prompt~{v}": 500 for v in range(4)}}


def _tensors_and_metadata(path: Path):
    with safe_open(str(path), framework="pt") as f:
        return load_file(path), f.metadata()


def test_txt_and_json_captions_give_the_same_cache(tiny_flux, tmp_path):
    for kind in ("txt", "json"):
        folder = tmp_path / kind
        folder.mkdir()
        make_image(96, 72, 3).save(folder / "x.png")
        caption = "a red flower, in a garden"
        if kind == "txt":
            (folder / "x.txt").write_text(caption)
        else:
            (folder / "x.json").write_text(json.dumps({"prompt": caption}))
        build_cache(folder, str(tiny_flux), RESOLUTION, max_sequence_length=32, progress=False)
    caches = [tmp_path / kind / ".urae_cache" / str(RESOLUTION) for kind in ("txt", "json")]
    files = [sorted(p.relative_to(c).as_posix() for p in c.rglob("*.safetensors")) for c in caches]
    assert files[0] == files[1] == ["latents/x.safetensors", "text/x.prompt.safetensors"]
    for rel in files[0]:  # the same computation on the same inputs: equal bits
        (ta, ma), (tb, mb) = (_tensors_and_metadata(c / rel) for c in caches)
        assert ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and (ta[k] == tb[k]).all() for k in ta)
        if rel.startswith("text/"):
            assert ma == mb  # the caption hash; a latent's metadata holds its image's mtime
    items = [json.loads((c / "manifest.json").read_text())["items"]["x"] for c in caches]
    assert items[0] == {**items[1], "source": ".txt"} and items[1]["source"] == ".json"


def test_cache_of_a_kohya_tree_its_size_estimate_and_repeats(tree, tiny_flux, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(tree, data_dir)
    data = _data(data_dir, shuffle_caption_parts=True, keep_parts=1, shuffle_variants=3)
    cache, skips = build_cache(data_dir, str(tiny_flux), RESOLUTION, max_sequence_length=32, progress=False, data=data)
    assert skips.warnings == {"upscaled": 5} and skips.reasons == {
        "without caption": 1,
        "smaller than data.min_side": 1,
    }
    tensor_files = [p for p in cache.rglob("*.safetensors")]
    report = survey(data_dir, RESOLUTION, data, CacheDims.of_model(tiny_flux, 32))
    estimate = sum(report.estimated_bytes())
    real = sum(p.stat().st_size for p in tensor_files)
    # each file = its tensor bytes (the estimate) + its header, at most FILE_OVERHEAD_BOUND (cache_layout.py)
    assert 0 < real - estimate <= len(tensor_files) * FILE_OVERHEAD_BOUND
    assert len(tensor_files) == len(report.samples) + report.text_embeddings()
    assert (cache / "text" / "10_cat" / "a.prompt~2.safetensors").is_file()  # CAT has 5 parts after the kept one

    dataset = open_cache(data_dir, str(tiny_flux), RESOLUTION, data=data)
    assert Counter(i.name for i in dataset.items) == {s.name: s.repeats for s in report.samples}
    with pytest.raises(
        UraeError,
        match="made with data.caption_prefix=ohwx, the recipe has data.caption_prefix=sks.*"
        "urae-lite cache .*data.caption_prefix=sks",
    ):
        open_cache(data_dir, str(tiny_flux), RESOLUTION, data=_data(data_dir, caption_prefix="sks"))
    item = next(i for i in dataset.items if i.name == "10_cat/a")
    assert item.columns == tuple(f"prompt~{v}" for v in range(3))
    t5, pooled = dataset.text(item, item.columns[1])
    assert t5.shape == (32, 64) and pooled.shape == (32,)
