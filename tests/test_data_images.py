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

from opticam.data import ImageTooLargeError, decode_image
from opticam.data.images import DEFAULT_MAX_PIXELS, _scale_16_to_8


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
