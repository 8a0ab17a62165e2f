"""Dataset layout, aspect-ratio buckets and caption mixing (no models)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from train_utils import make_image

from urae_lite.errors import UraeError
from urae_lite.train.data import (
    BUCKET_RATIOS,
    Bucket,
    SkipLog,
    choose_caption,
    fit_to_bucket,
    make_buckets,
    nearest_bucket,
    needs_upscale,
    scan_dataset,
)


@pytest.mark.parametrize("resolution", [1024, 2048, 4096])
def test_buckets_cover_the_ratios_at_the_target_area(resolution):
    buckets = make_buckets(resolution)
    assert len(buckets) == len(BUCKET_RATIOS) == 7
    for (rw, rh), b in zip(BUCKET_RATIOS, buckets):
        assert b.width % 16 == 0 and b.height % 16 == 0
        assert abs(b.width * b.height / resolution**2 - 1) < 0.02
        assert abs(math.log(b.width / b.height) - math.log(rw / rh)) < 0.02
    assert Bucket(resolution, resolution) in buckets
    assert make_buckets(2048)[1] == Bucket(2368, 1776)  # 4:3


def test_nearest_bucket_picks_the_closest_aspect_ratio():
    buckets = make_buckets(2048)
    assert nearest_bucket(3000, 3000, buckets) == Bucket(2048, 2048)
    assert nearest_bucket(4000, 3000, buckets).width == 2368  # 4:3
    assert nearest_bucket(3000, 4000, buckets).height == 2368  # 3:4
    assert nearest_bucket(6000, 2900, buckets) == buckets[3]  # ~2:1
    assert nearest_bucket(1000, 3900, buckets) == buckets[6]  # ~1:4
    assert nearest_bucket(1300, 1000, buckets) == buckets[1]  # 1.3 is nearer 4:3 than 1:1


def test_fit_to_bucket_resizes_to_cover_and_crops_the_centre():
    from PIL import Image

    image = Image.new("RGB", (400, 100), (0, 0, 0))
    image.paste((255, 0, 0), (150, 0, 250, 100))  # a red band: the middle quarter of a 4:1 image
    out = fit_to_bucket(image, Bucket(64, 64))
    assert out.size == (64, 64)
    # cover: height 100 -> 64 (scale 0.64), width 400 -> 256; the centre crop keeps x in [96, 160), which is
    # exactly where the red band lands: the whole crop is red.
    assert out.getpixel((32, 32))[0] > 200 and out.getpixel((2, 32))[0] > 150
    assert fit_to_bucket(make_image(50, 30, 0), Bucket(80, 48)).size == (80, 48)
    assert needs_upscale(50, 30, Bucket(80, 48)) and not needs_upscale(160, 96, Bucket(80, 48))


def test_caption_mix_follows_the_weights_among_available_columns():
    mix = {"prompt": 0.2, "generated_prompt": 0.8}
    both = ["generated_prompt", "prompt"]
    counts = Counter(choose_caption(both, mix, (i + 0.5) / 10000) for i in range(10000))
    assert counts["prompt"] == 2000 and counts["generated_prompt"] == 8000
    assert {choose_caption(["prompt"], mix, u / 10) for u in range(10)} == {"prompt"}
    assert {choose_caption(["generated_prompt"], mix, u / 10) for u in range(10)} == {"generated_prompt"}
    assert choose_caption(both, {"prompt": 1.0}, 0.99) == "prompt"


def test_scan_skips_bad_items_with_a_count(tmp_path):
    good = make_image(32, 32, 0)
    for name in ("a", "b", "c", "d", "e"):
        good.save(tmp_path / f"{name}.png")
    (tmp_path / "a.json").write_text(json.dumps({"prompt": "a cat", "generated_prompt": "a cat on a mat"}))
    (tmp_path / "b.json").write_text(json.dumps({"generated_prompt": "only generated"}))
    (tmp_path / "c.json").write_text("{not json")
    (tmp_path / "d.json").write_text(json.dumps({"prompt": "  ", "other": "x"}))
    # e has no json at all; a.jpg duplicates a.png's name
    good.save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("ignored")
    skips = SkipLog()
    samples = scan_dataset(tmp_path, skips)
    assert [s.name for s in samples] == ["a", "b"]
    assert samples[0].captions == {"prompt": "a cat", "generated_prompt": "a cat on a mat"}
    assert samples[1].captions == {"generated_prompt": "only generated"}
    assert skips.reasons == {"without caption": 3, "duplicate name": 1}
    assert "skipped 4 item(s)" in skips.summary()


def test_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(UraeError, match="empty dataset"):
        scan_dataset(tmp_path, SkipLog())
    make_image(16, 16, 0).save(tmp_path / "x.png")
    with pytest.raises(UraeError, match="empty dataset.*1 without caption"):
        scan_dataset(tmp_path, SkipLog())
    with pytest.raises(UraeError, match="not found"):
        scan_dataset(tmp_path / "missing", SkipLog())


def test_header_size_is_upright_as_the_cache_decodes_it(tmp_path):
    """A portrait stored sideways (EXIF orientation 6): `--check` reads the size from the header and must pick the
    bucket the cache's full decode (EXIF applied) gives."""
    from PIL import Image

    from urae_lite.train.cache import _open_image
    from urae_lite.train.data import image_size

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    make_image(120, 90, 0).save(tmp_path / "p.jpg", exif=exif)
    make_image(120, 90, 0).save(tmp_path / "l.jpg")
    for name in ("p.jpg", "l.jpg"):
        assert image_size(tmp_path / name) == _open_image(tmp_path / name).size
    assert image_size(tmp_path / "p.jpg") == (90, 120)


def test_caption_files_precedence_and_plain_text(tmp_path):
    image = make_image(32, 32, 0)
    for name in ("a", "b", "c", "d"):
        image.save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("  a cat,\n  on a mat \n")
    (tmp_path / "b.caption").write_text("a dog")
    (tmp_path / "b.txt").write_text("a dog from the txt")
    (tmp_path / "c.json").write_text("{broken")  # the JSON wins, even broken: skipped with its reason, no fallback
    (tmp_path / "c.txt").write_text("a caption the user may have forgotten")
    (tmp_path / "d.txt").write_text(" \n")
    skips = SkipLog()
    samples = {s.name: s for s in scan_dataset(tmp_path, skips)}
    assert samples["a"].captions == {"prompt": "a cat, on a mat"} and samples["a"].source == ".txt"
    assert (samples["b"].source, samples["b"].shadowed) == (".txt", (".caption",))
    assert sorted(samples) == ["a", "b"] and skips.names == {"without caption": ["c.png", "d.png"]}
