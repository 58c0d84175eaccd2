"""Tests for opticam.data.preprocess: torchvision-exact pixels and boxes that follow them."""

from __future__ import annotations

import gc
import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from opticam.data import Preprocess, ShardReader, decode_image, iter_batches
from opticam.data.preprocess import MAX_ASPECT_RATIO
from opticam.names import CROP_ROUNDINGS, INTERPOLATIONS, RESIZE_MODES


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference(image: Image.Image, size: tuple[int, int], resize_size: int) -> torch.Tensor:
    """torchvision's own resize + centre crop on a PIL image, scaled to [0, 1]."""
    resized = TF.resize(image, [resize_size], InterpolationMode.BILINEAR, antialias=True)
    cropped = TF.center_crop(resized, list(size))
    return TF.pil_to_tensor(cropped).float() / 255


def test_exact_geometry_for_a_wide_image() -> None:
    # 200x100 -> shorter side 64 -> 128x64 -> centre 64x64 starts at x = (128 - 64) / 2 = 32.
    preprocess = Preprocess(64)
    geometry = preprocess.geometry(200, 100)
    assert geometry.resized == (128, 64)
    assert geometry.offset == (32, 0)
    assert geometry.output == (64, 64)
    image, boxes = preprocess(random_image(200, 100), [(50, 10, 150, 90), (0, 0, 40, 100)])
    assert image.shape == (3, 64, 64)
    # x: 50 * 0.64 - 32 = 0, 150 * 0.64 - 32 = 64; y: 10 * 0.64 = 6.4, 90 * 0.64 = 57.6.
    # The second box maps to x in [-32, -6.4]: outside the crop, dropped.
    assert torch.allclose(boxes, torch.tensor([[0.0, 6.4, 64.0, 57.6]]))


def test_exact_geometry_tall_image_with_margin() -> None:
    # ImageNet preset: 300x400 -> 256x341 (341.33 truncated) -> 224 crop at (16, 58.5 -> 58).
    preprocess = Preprocess(224, resize_size=256)
    geometry = preprocess.geometry(300, 400)
    assert geometry.resized == (256, 341)
    assert geometry.offset == (16, 58)
    scale_x, scale_y = 256 / 300, 341 / 400
    boxes = preprocess.transform_boxes([(30, 100, 270, 380)], 300, 400)
    expected = [30 * scale_x - 16, 100 * scale_y - 58, 270 * scale_x - 16, 224]
    assert torch.allclose(boxes, torch.tensor([expected]), atol=1e-5)


@pytest.mark.parametrize(
    ("extent", "start"),
    # Python's round is half-to-even, like torchvision's: margin 1 -> 0, 3 -> 2, 5 -> 2.
    [(65, 0), (66, 1), (67, 2), (69, 2), (71, 4)],
)
def test_crop_offset_rounding_matches_torchvision(extent: int, start: int) -> None:
    preprocess = Preprocess(64, resize_size=64)
    assert preprocess.geometry(extent, 64).offset == (start, 0)
    assert preprocess.geometry(64, extent).offset == (0, start)
    image = random_image(extent, 64, seed=extent)
    ours, _ = preprocess(image)
    assert torch.equal(ours, reference(image, (64, 64), 64))


def test_pixels_equal_torchvision_classification_preset() -> None:
    preset = ImageClassification(crop_size=40, resize_size=48, mean=(0, 0, 0), std=(1, 1, 1))
    for width, height in [(100, 75), (48, 48), (31, 90), (200, 57)]:
        image = random_image(width, height, seed=width)
        ours, _ = Preprocess(40, resize_size=48)(image)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, preset(image))


def test_crop_larger_than_image_pads_like_torchvision() -> None:
    # Shorter side 20 but crop 32: torchvision pads (32 - 20) // 2 = 6 zeros before.
    preprocess = Preprocess(32, resize_size=20)
    geometry = preprocess.geometry(30, 20)
    assert geometry.resized == (30, 20) and geometry.offset == (-1, -6)
    image = random_image(30, 20, seed=3)
    ours, boxes = preprocess(image, [(0, 0, 30, 20)])
    assert torch.equal(ours, reference(image, (32, 32), 20))
    assert boxes.tolist() == [[1.0, 6.0, 31.0, 26.0]]


def test_rectangular_size_and_default_resize() -> None:
    preprocess = Preprocess((24, 40))
    assert preprocess.resize_size == 40  # larger crop side: no padding
    image = random_image(90, 60, seed=5)
    ours, _ = preprocess(image)
    assert ours.shape == (3, 24, 40)
    assert torch.equal(ours, reference(image, (24, 40), 40))
    assert Preprocess(32).resize_size == 32


def test_boxes_are_clipped_and_vanishing_ones_dropped() -> None:
    preprocess = Preprocess(10)
    # 10x10 image, identity resize: boxes only clip.
    boxes = preprocess.transform_boxes(
        [(-5, -5, 4, 4), (3, 3, 3, 8), (12, 0, 15, 5), (2, 2, 20, 9)], 10, 10
    )
    assert boxes.tolist() == [[0, 0, 4, 4], [2, 2, 10, 9]]
    empty = preprocess.transform_boxes([], 10, 10)
    assert empty.shape == (0, 4) and empty.dtype == torch.float32
    _, from_call = preprocess(random_image(10, 10))
    assert from_call.shape == (0, 4)


def test_non_rgb_inputs_are_converted() -> None:
    gray = Image.fromarray(np.full((20, 30), 128, dtype=np.uint8))
    image, _ = Preprocess(16)(gray)
    assert image.shape == (3, 16, 16)
    assert torch.allclose(image, torch.full((3, 16, 16), 128 / 255))


@pytest.mark.parametrize("bad", [0, -3, (1, 2, 3), (4, 0), "224", 2.5, True])
def test_invalid_sizes_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        Preprocess(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resize_size"):
        Preprocess(8, resize_size=0)


def check_drawn_box(
    width: int,
    height: int,
    size: int,
    resize_size: int,
    box: tuple[int, int, int, int],
    resize_mode: str = "shorter",
    crop_rounding: str = "round",
) -> bool:
    """Draw ``box`` filled red on blue, preprocess, and check where the red lands.

    Returns whether the sub-pixel (mass and centroid) checks applied.
    """
    x0, y0, x1, y1 = box
    preprocess = Preprocess(
        size, resize_size=resize_size, resize_mode=resize_mode, crop_rounding=crop_rounding
    )
    geometry = preprocess.geometry(width, height)

    image = Image.new("RGB", (width, height), (0, 0, 255))
    # PIL's rectangle includes its end pixel: pixels x0..x1-1 <=> box edges x0..x1.
    ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), fill=(255, 0, 0))
    tensor, boxes = preprocess(image, [(x0, y0, x1, y1)])
    red = tensor[0].numpy()

    scale_x = geometry.resized[0] / width
    scale_y = geometry.resized[1] / height
    left, top = geometry.offset
    unclipped = (x0 * scale_x - left, y0 * scale_y - top, x1 * scale_x - left, y1 * scale_y - top)
    centres_y, centres_x = np.mgrid[0:size, 0:size] + 0.5
    # Bilinear interpolation puts an edge's 1/2 crossing exactly on the edge. The ramp
    # around it is one input pixel wide when upscaling (scale px) and, antialiased,
    # at most one output pixel to each side when downscaling: beyond `reach` from
    # an edge a pixel is fully red or fully not.
    reach_x, reach_y = max(1.0, scale_x / 2) + 0.01, max(1.0, scale_y / 2) + 0.01

    if boxes.shape[0] == 0:
        # The box vanished: it lies outside the crop, and no pixel is clearly red.
        bx0, by0, bx1, by1 = unclipped
        assert bx1 <= 1e-6 or by1 <= 1e-6 or bx0 >= size - 1e-6 or by0 >= size - 1e-6
        assert red.max() < 0.5 + 0.01
        return False

    bx0, by0, bx1, by1 = boxes[0].tolist()
    assert 0 <= bx0 < bx1 <= size and 0 <= by0 < by1 <= size
    # The returned box is the exact image of the drawn box, clipped to the crop.
    assert np.allclose([bx0, by0, bx1, by1], np.clip(unclipped, 0, size), atol=1e-4)
    # Every clearly red pixel has its centre inside the box, up to one pixel: outside
    # the box along either axis its value is below 1/2.
    outside = (centres_x < bx0 - 1) | (centres_x > bx1 + 1) | (centres_y < by0 - 1)
    outside |= centres_y > by1 + 1
    assert (red[outside] < 0.5 + 0.01).all()
    # Tight: beyond the ramps, pixels inside the box are red.
    inside = (
        (centres_x > bx0 + reach_x)
        & (centres_x < bx1 - reach_x)
        & (centres_y > by0 + reach_y)
        & (centres_y < by1 - reach_y)
    )
    assert (red[inside] > 0.99).all()
    if not inside.any():
        return False
    checked = False
    # Sub-pixel: along a row (column) of full red in the other direction, the red
    # profile's mass is the box width (height) and its centroid the box centre,
    # because interpolation weights reproduce constants and linear functions. A box
    # one pixel off fails here. Only where both ramps lie inside the crop and away
    # from the image border, whose clamping makes the ramps asymmetric.
    row = red[int(np.nonzero(inside.any(axis=1))[0].mean())]
    column = red[:, int(np.nonzero(inside.any(axis=0))[0].mean())]
    checks = [
        (row, unclipped[0], unclipped[2], reach_x, x0 * scale_x, (width - x1) * scale_x),
        (column, unclipped[1], unclipped[3], reach_y, y0 * scale_y, (height - y1) * scale_y),
    ]
    positions = np.arange(size) + 0.5
    for profile, low, high, reach, border_low, border_high in checks:
        if low - reach < 0 or high + reach > size or min(border_low, border_high) < reach + 1:
            continue
        checked = True
        mass = profile.sum()
        assert abs(mass - (high - low)) < 0.25
        assert abs((profile * positions).sum() / mass - (low + high) / 2) < 0.25
    return checked


def integer_box(
    fractions: tuple[float, float, float, float], width: int, height: int
) -> tuple[int, int, int, int]:
    a, b, c, d = fractions
    x0, x1 = sorted((round(a * width), round(c * width)))
    y0, y1 = sorted((round(b * height), round(d * height)))
    return x0, y0, x1, y1


BoxCase = tuple[int, int, int, int, tuple[int, int, int, int]]


@st.composite
def box_cases(
    draw: st.DrawFn,
    *,
    min_side: int,
    min_crop: int,
    resize_factors: tuple[float, float],
    box_fractions: tuple[float, float],
) -> BoxCase:
    """``(width, height, crop size, resize size, integer box)`` for :func:`check_drawn_box`."""
    width, height = draw(st.integers(min_side, 240)), draw(st.integers(min_side, 240))
    size = draw(st.integers(min_crop, 64))
    resize_size = max(4, round(size * draw(st.floats(*resize_factors))))
    fractions = draw(st.tuples(*[st.floats(*box_fractions)] * 4))
    return width, height, size, resize_size, integer_box(fractions, width, height)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(box_cases(min_side=8, min_crop=8, resize_factors=(0.6, 2.0), box_fractions=(0.0, 1.0)))
def test_drawn_box_follows_preprocessing(case: BoxCase) -> None:
    """Any box, any geometry (up- and downscaling, margins, padding, clipping)."""
    x0, y0, x1, y1 = case[4]
    assume(x1 - x0 >= 1 and y1 - y0 >= 1)
    check_drawn_box(*case)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(box_cases(min_side=24, min_crop=16, resize_factors=(1.0, 1.3), box_fractions=(0.3, 0.7)))
def test_drawn_box_centroid_is_subpixel_exact(case: BoxCase) -> None:
    """Boxes in the middle of the crop, where mass and centroid can be checked."""
    x0, y0, x1, y1 = case[4]
    assume(x1 - x0 >= 4 and y1 - y0 >= 4)
    assume(check_drawn_box(*case))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    box_cases(min_side=8, min_crop=8, resize_factors=(0.6, 2.0), box_fractions=(0.0, 1.0)),
    st.sampled_from(RESIZE_MODES),
    st.sampled_from(CROP_ROUNDINGS),
)
def test_drawn_box_follows_squash_and_floor_crops(
    case: BoxCase, resize_mode: str, crop_rounding: str
) -> None:
    """The same geometry checks with a non-uniform resize (squash) and floored crops."""
    x0, y0, x1, y1 = case[4]
    assume(x1 - x0 >= 1 and y1 - y0 >= 1)
    check_drawn_box(*case, resize_mode=resize_mode, crop_rounding=crop_rounding)


# --------------------------------------------------------------------------- zoo settings


def test_squash_geometry_and_pixels() -> None:
    # 200x100 squashed to 80x80 (x scale 0.4, y scale 0.8), centre 64 at (8, 8).
    preprocess = Preprocess(64, 80, resize_mode="squash")
    geometry = preprocess.geometry(200, 100)
    assert geometry.resized == (80, 80) and geometry.offset == (8, 8)
    image = random_image(200, 100, seed=9)
    ours, boxes = preprocess(image, [(50, 10, 150, 90)])
    assert torch.allclose(boxes, torch.tensor([[50 * 0.4 - 8, 0.0, 150 * 0.4 - 8, 64.0]]))
    squashed = TF.resize(image, [80, 80], InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(ours, TF.pil_to_tensor(TF.center_crop(squashed, [64, 64])).float() / 255)
    # (height, width) squash targets; the default is the crop size (no margin).
    assert Preprocess((24, 40), (30, 50), resize_mode="squash").geometry(7, 9).resized == (50, 30)
    assert Preprocess(32, resize_mode="squash").resize_size == (32, 32)


@pytest.mark.parametrize(("extent", "floor_start"), [(65, 0), (66, 1), (67, 1), (71, 3)])
def test_floor_crop_rounding(extent: int, floor_start: int) -> None:
    # Hugging Face floors the margin: 3 -> 1 where torchvision rounds half to even to 2.
    preprocess = Preprocess(64, 64, crop_rounding="floor")
    assert preprocess.geometry(extent, 64).offset == (floor_start, 0)
    assert preprocess.geometry(64, extent).offset == (0, floor_start)
    image = random_image(extent, 64, seed=extent)
    ours, _ = preprocess(image)
    expected = image.crop((floor_start, 0, floor_start + 64, 64))
    assert torch.equal(ours, TF.pil_to_tensor(expected).float() / 255)
    # Padding (crop larger than the image) is the same either way.
    assert Preprocess(32, 20, crop_rounding="floor").geometry(30, 20).offset == (-1, -6)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_interpolation_pixels_equal_torchvision(interpolation: str) -> None:
    image = random_image(150, 97, seed=4)
    ours, _ = Preprocess(40, 48, interpolation=interpolation)(image)
    resized = TF.resize(image, [48], InterpolationMode(interpolation), antialias=True)
    assert torch.equal(ours, TF.pil_to_tensor(TF.center_crop(resized, [40, 40])).float() / 255)


def test_bad_settings_are_refused_and_settings_compare() -> None:
    with pytest.raises(ValueError, match=r"unknown interpolation 'cubic' \(known: bilinear"):
        Preprocess(8, interpolation="cubic")
    with pytest.raises(ValueError, match="unknown resize_mode 'stretch'"):
        Preprocess(8, resize_mode="stretch")
    with pytest.raises(ValueError, match="unknown crop_rounding 'ceil'"):
        Preprocess(8, crop_rounding="ceil")
    with pytest.raises(ValueError, match="resize_size must be a positive int"):
        Preprocess(8, (8, 8))  # a pair only for squash
    plain = Preprocess(8, 10)
    assert plain == Preprocess(8, 10) and repr(plain) == "Preprocess(size=(8, 8), resize_size=10)"
    bicubic = Preprocess(8, 10, interpolation="bicubic")
    assert bicubic != plain and hash(bicubic) != hash(plain)
    assert "interpolation='bicubic'" in repr(bicubic)


# ----------------------------------------------------------------------------- memory bound


def peak_rss_growth(call: Any) -> tuple[int, Any]:
    """Run ``call()`` and return (how far this process's peak RSS rose above its RSS
    before the call, in bytes; what ``call`` returned).

    Linux keeps the peak (``VmHWM``) and resets it to the current RSS when "5" is
    written to ``/proc/self/clear_refs``: an exact peak, no sampling, no subprocess.
    """
    status, clear = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    if not status.exists() or not os.access(clear, os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")

    def read(field: str) -> int:
        found = re.search(rf"^{field}:\s+(\d+) kB", status.read_text(), re.MULTILINE)
        assert found is not None
        return int(found.group(1)) * 1024

    gc.collect()
    clear.write_text("5")
    before = read("VmRSS")
    result = call()
    return read("VmHWM") - before, result


def thin_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(1, 20_000), (20_000, 1)], ids=["tall", "wide"])
def test_a_thin_image_is_refused_before_its_resize_takes_memory(size: tuple[int, int]) -> None:
    data = thin_png(*size)
    assert len(data) < 1000  # a few hundred bytes, far under every cap
    image = decode_image(data)
    preprocess = Preprocess(64)

    def run() -> Exception | None:
        try:
            preprocess(image, [(0, 0, 1, 1)])
        except ValueError as exc:
            return exc
        return None

    # Resized on its shorter side, the image would be 64 x 1,280,000 pixels: 328 MB.
    growth, error = peak_rss_growth(run)
    assert growth < 50 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MB"
    assert error is not None
    shown = f"{size[0]}x{size[1]}"
    assert f"image is {shown}, an aspect ratio of 20,000.0:1, beyond the 32:1" in str(error)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess.transform_boxes([(0, 0, 1, 1)], *size)  # boxes follow the same rule


@pytest.mark.parametrize("resize_mode", RESIZE_MODES)
@pytest.mark.parametrize(("width", "height"), [(320, 10), (10, 320), (330, 10), (10, 330)])
def test_the_aspect_ratio_limit_is_32_to_1_in_every_mode(
    resize_mode: str, width: int, height: int
) -> None:
    assert MAX_ASPECT_RATIO == 32
    preprocess = Preprocess(16, 20, resize_mode=resize_mode)
    image = random_image(width, height, seed=width + height)
    if max(width, height) <= 32 * min(width, height):
        ours, boxes = preprocess(image, [(0, 0, width, height)])
        assert ours.shape == (3, 16, 16) and boxes.shape == (1, 4)
    else:
        with pytest.raises(ValueError, match=r"an aspect ratio of 33\.0:1, beyond the 32:1"):
            preprocess(image)


def test_a_thin_image_costs_one_error_row_and_the_shard_goes_on(tmp_path: Path) -> None:
    from test_data_reader import good_members, write_tar

    shard = tmp_path / "thin.tar"
    write_tar(
        shard,
        [
            *good_members("a", 1),
            ("thin.png", thin_png(1, 20_000)),
            ("thin.cls", b"2"),
            *good_members("b", 3),
        ],
    )
    reader = ShardReader(str(shard))
    batches = list(iter_batches(reader, Preprocess(64), 8))
    assert [b.keys for b in batches] == [["a", "b"]]
    assert [(e.key, e.stage) for e in reader.errors] == [("thin", "preprocess")]
    assert "1x20000, an aspect ratio of 20,000.0:1" in reader.errors[0].message
