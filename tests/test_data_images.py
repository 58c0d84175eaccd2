"""Tests for opticam.data.images: the pixel limit, Pillow's bomb check, 16-bit scaling.

Decoding of the usual modes through a shard is tested in tests/test_data_reader.py
(``test_image_modes_convert_to_rgb``).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from opticam.data import IMAGE_FORMATS, ImageFormatError, ImageTooLargeError, decode_image
from opticam.data.images import DEFAULT_MAX_PIXELS, _scale_16_to_8, identify_format


def blank_png(width: int, height: int) -> bytes:
    """A real 16-bit grayscale PNG of zeros, built row by row: tiny on disk and in memory.

    PIL would need the whole ``width x height`` array to write it; a few hundred
    megapixels of zeros deflate to a few hundred kilobytes.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    # bit depth 16, colour type 0 (grayscale), deflate, adaptive filters, no interlace
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    rows = bytes(1 + 2 * width) * 100  # filter byte 0 + two zero bytes per pixel
    compressor = zlib.compressobj(6)
    parts = [compressor.compress(rows) for _ in range(height // 100)]
    parts.append(compressor.compress(bytes(1 + 2 * width) * (height % 100)))
    parts.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def refuse_loading(monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]) -> None:
    """Make decoding the pixels of any image of ``size`` fail the test."""
    for cls in (Image.Image, ImageFile.ImageFile):
        original = cls.load

        def load(self: Image.Image, original: Any = original) -> Any:
            assert self.size != size, f"pixels of the {size} image were decoded"
            return original(self)

        monkeypatch.setattr(cls, "load", load)


def test_blank_png_is_a_real_16_bit_png() -> None:
    with Image.open(io.BytesIO(blank_png(30, 250))) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "I;16", (30, 250))
        image.load()
        assert image.getextrema() == (0, 0)
    decoded = decode_image(blank_png(30, 250))
    assert decoded.mode == "RGB" and decoded.size == (30, 250)
    assert not np.asarray(decoded).any()


def test_too_many_pixels_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = blank_png(3000, 2000)  # 6 megapixels, 12 MB decoded at 16 bit
    assert len(data) < 30_000
    refuse_loading(monkeypatch, (3000, 2000))
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data, max_pixels=5_999_999)
    message = str(info.value)
    assert "3000x2000 = 6,000,000 pixels" in message and "max_pixels=5,999,999" in message
    assert isinstance(info.value, ValueError)  # callers catching ValueError still do


def test_limit_is_inclusive() -> None:
    data = blank_png(30, 20)
    assert decode_image(data, max_pixels=600).size == (30, 20)
    with pytest.raises(ImageTooLargeError, match="30x20 = 600 pixels"):
        decode_image(data, max_pixels=599)


def test_default_limit_refuses_a_huge_16_bit_png_without_pillow_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 11000 x 11000 = 121 megapixels: above DEFAULT_MAX_PIXELS and above Pillow's own
    # warning threshold; 235 KB on disk, 242 MB as 16-bit pixels.
    data = blank_png(11000, 11000)
    assert 11000 * 11000 > DEFAULT_MAX_PIXELS > (Image.MAX_IMAGE_PIXELS or 0)
    assert len(data) < 300_000
    refuse_loading(monkeypatch, (11000, 11000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would raise here
        with pytest.raises(ImageTooLargeError, match=f"max_pixels={DEFAULT_MAX_PIXELS:,}"):
            decode_image(data)


def test_pillow_bomb_check_becomes_our_error_or_stays_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Between Pillow's warning (1000) and error (2000) thresholds, within max_pixels:
        # decoded, and Pillow's warning does not escape (it would raise here).
        assert decode_image(blank_png(40, 40)).size == (40, 40)
        # Above Pillow's hard limit, though within max_pixels: our error, not Pillow's.
        with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS") as info:
            decode_image(blank_png(50, 50), max_pixels=10_000)
    assert "2500 pixels" in str(info.value)


def test_sixteen_bit_scaling_is_exact_rounding() -> None:
    values = np.arange(65536, dtype=np.uint16)
    expected = np.rint(values / 257.0).astype(np.uint8)  # v * 255 / 65535 = v / 257, no ties
    assert np.array_equal(_scale_16_to_8(values), expected)
    # Mode "I" is int32: out-of-range values are clipped first.
    signed = np.array([-5, 0, 128, 129, 65535, 70000], dtype=np.int32)
    assert _scale_16_to_8(signed).tolist() == [0, 0, 0, 1, 255, 255]


def encoded(fmt: str, **options: Any) -> bytes:
    """A small RGB image saved by Pillow as ``fmt``."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(buffer, fmt, **options)
    return buffer.getvalue()


def forbid_other_plugins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the parser of every plugin outside IMAGE_FORMATS by one that records its
    name and fails: the list it returns names the plugins that were asked to read."""
    Image.init()
    called: list[str] = []
    for name in Image.ID:
        if name in IMAGE_FORMATS:
            continue
        factory, accept = Image.OPEN[name]

        def refuse(*args: Any, name: str = name) -> Any:
            called.append(name)
            raise SyntaxError(f"the {name} plugin was asked to read the data")

        monkeypatch.setitem(Image.OPEN, name, (refuse, accept))
    return called


# PostScript (Pillow's EPS plugin runs Ghostscript to load it), PDF (Pillow has no
# reader) and other formats Pillow reads but opticam does not.
_FOREIGN = ["EPS", "PDF", "BMP", "TIFF", "GIF", "ICO", "PPM", "QOI", "SGI", "DDS"]


@pytest.mark.parametrize("fmt", _FOREIGN)
def test_formats_outside_the_list_are_refused_unread_and_named(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = encoded(fmt)
    called = forbid_other_plugins(monkeypatch)
    with pytest.raises(ImageFormatError, match=f"the bytes are {fmt}, not one of") as info:
        decode_image(data)
    assert "JPEG, PNG, WEBP" in str(info.value)
    assert called == []  # no plugin but those of IMAGE_FORMATS saw the bytes
    assert identify_format(data) == fmt


def test_postscript_named_jpeg_never_reaches_the_eps_plugin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import EpsImagePlugin

    def no_ghostscript(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Ghostscript was asked to render data from a shard")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    script = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 6\nshowpage\n"
    called = forbid_other_plugins(monkeypatch)
    with pytest.raises(ImageFormatError, match="the bytes are EPS"):
        decode_image(script)
    assert called == []


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (encoded("JPEG"), "JPEG"),
        (encoded("PNG"), "PNG"),
        (encoded("WEBP"), "WEBP"),
        # A camera's multi-picture JPEG: Pillow's JPEG plugin opens it as MPO.
        (encoded("MPO", save_all=True, append_images=[Image.new("RGB", (8, 6))]), "MPO"),
        (encoded("PNG", save_all=True, append_images=[Image.new("RGB", (8, 6))]), "PNG"),
    ],
    ids=["jpeg", "png", "webp", "mpo", "apng"],
)
def test_the_listed_formats_still_decode(
    data: bytes, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Image.open(io.BytesIO(data)).format == fmt
    called = forbid_other_plugins(monkeypatch)
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert called == []


def test_bytes_of_no_known_format_are_a_plain_decode_error() -> None:
    with pytest.raises(ValueError, match="nor any other known image format") as info:
        decode_image(b"hello, not an image at all")
    assert not isinstance(info.value, ImageFormatError)
    assert identify_format(b"hello") is None
    # A PNG signature with a broken header is a corrupt PNG, not "another format".
    broken = encoded("PNG")[:12] + b"XXXX" + encoded("PNG")[16:]
    with pytest.raises(ValueError, match="start as PNG but its header is corrupt") as info:
        decode_image(broken)
    assert not isinstance(info.value, ImageFormatError)
