"""opticam.report.gallery: the chosen images, inputs preprocessed like the run, the colours."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from report_run import INPUT, METHODS

from opticam import store
from opticam.data import Preprocess, ShardReader
from opticam.report.colors import colorize, overlay
from opticam.report.gallery import Gallery, GalleryItem, build_gallery, choose_gallery_images


def test_gallery_reads_inputs_and_maps(full_run) -> None:
    run, rows = full_run
    table = store.read_rows(run)
    chosen = choose_gallery_images(table, "demo", METHODS, 3)
    assert chosen == choose_gallery_images(
        table.take(list(range(table.num_rows))[::-1]), "demo", METHODS, 3
    )
    first_shard = min(r["shard"] for r in rows)
    assert all(shard == first_shard for shard, _ in chosen)  # reads one data shard only
    gallery = build_gallery(run, table, list(METHODS), size=3)
    assert [(i.shard, i.key) for i in gallery.items] == chosen
    assert gallery.png is not None and gallery.png.startswith(b"\x89PNG")
    for item in gallery.items:
        assert item.image is not None and item.image.shape == (INPUT, INPUT, 3)
        assert item.image.min() >= 0.0 and item.image.max() <= 1.0
        index = int(item.key[3:])
        assert len(item.boxes) == (1 if index % 2 == 0 else 0)
        for method in METHODS:
            assert item.maps[method].shape == (INPUT, INPUT)
            source = next(r for r in rows if r["key"] == item.key and r["method"] == method)
            np.testing.assert_allclose(item.maps[method], store.decode_map(source))
            assert item.scores[method] == (source["drop"], source["gain"])
    assert gallery.notes == []
    guessed = build_gallery(run, table, list(METHODS), size=1, resize_known=False)
    assert any("resize size" in note for note in guessed.notes)
    # 0 -> no gallery, nothing read.
    assert build_gallery(run, table, list(METHODS), size=0).png is None


def test_gallery_preprocesses_inputs_like_the_run(full_run) -> None:
    # A timm / Hugging Face model's settings (from the shard statuses) reach the gallery.
    run, _ = full_run
    table = store.read_rows(run)
    options = {"interpolation": "bicubic", "resize_mode": "squash", "crop_rounding": "floor"}
    gallery = build_gallery(
        run, table, list(METHODS), size=3, resize_size=INPUT + 5, preprocess_options=options
    )
    preprocess = Preprocess(INPUT, INPUT + 5, **options)
    samples = {
        sample.key: sample
        for shard in {item.shard for item in gallery.items}
        for sample in ShardReader(shard, require_label=False)
    }
    plain = Preprocess(INPUT, INPUT + 5)
    assert len(gallery.items) == 3
    for item in gallery.items:
        sample = samples[item.key]
        image, boxes = preprocess(sample.image, sample.boxes)
        np.testing.assert_array_equal(item.image, image.permute(1, 2, 0).numpy())
        np.testing.assert_array_equal(item.boxes, boxes.numpy().reshape(-1, 4))
        assert not np.array_equal(item.image, plain(sample.image)[0].permute(1, 2, 0).numpy())


def test_gallery_draws_maps_with_the_report_colour_map() -> None:
    from opticam.report.gallery import _draw

    # A black input under a map of ones shows the overlay's half-strength dark red; a map
    # of zeros without an input shows the colour map's own low end, dark blue.
    with_input = GalleryItem("s", "a", 0, 0, 0, image=np.zeros((INPUT, INPUT, 3), np.float32))
    with_input.maps["m"] = np.ones((INPUT, INPUT), np.float32)
    alone = GalleryItem("s", "b", 0, 0, 0)
    alone.maps["m"] = np.zeros((INPUT, INPUT), np.float32)
    png = _draw(Gallery("demo", ["m"], [with_input, alone], [], None))
    assert png is not None
    with Image.open(io.BytesIO(png)) as picture:
        pixels = np.asarray(picture.convert("RGB")).reshape(-1, 3)
    expected = {
        "overlay": np.asarray(overlay(np.zeros((INPUT, INPUT, 3)), np.ones((INPUT, INPUT))))[0, 0],
        "colorize": np.rint(255 * colorize(np.zeros((1, 1)))[0, 0]),
    }
    assert tuple(expected["overlay"]) == (64, 0, 0) and tuple(expected["colorize"]) == (0, 0, 128)
    for name, colour in expected.items():
        # Each map cell is about 190 x 215 pixels of one colour at the report's 100 dpi;
        # matplotlib truncates float colours to 8 bits where overlay rounds: 1 level apart.
        close = (np.abs(pixels.astype(np.int64) - colour) <= 1).all(axis=1)
        assert close.sum() > 10_000, name


def test_choose_gallery_prefers_images_with_every_method() -> None:
    import pyarrow as pa

    table = pa.table(
        {
            "model": ["m"] * 5,
            "shard": ["s0", "s0", "s0", "s1", "s1"],
            "key": ["a", "a", "b", "c", "c"],
            "method": ["x", "y", "x", "x", "y"],
        }
    )
    assert choose_gallery_images(table, "m", ["x", "y"], 5) == [("s0", "a"), ("s1", "c")]
    assert choose_gallery_images(table, "m", ["x", "y"], 1) == [("s0", "a")]
    assert len(choose_gallery_images(table, "m", ["x", "z"], 5)) == 3  # none complete
    assert choose_gallery_images(table, "other", ["x"], 5) == []
