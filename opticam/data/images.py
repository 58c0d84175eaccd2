"""Image decoding for shards: bytes -> RGB 8-bit PIL image.

Conversion rules (what a classifier trained with torchvision's ``pil_loader``,
i.e. ``Image.open(f).convert("RGB")``, would see, except where that loader is
wrong):

- ``RGB``: unchanged.
- ``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion
  to RGB (Pillow already undoes the inverted CMYK of Adobe JPEGs).
- Alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency, ...): the alpha
  channel is **dropped**, not composited, exactly like ``convert("RGB")`` in
  torchvision's loader, so pixels equal those the model was trained and
  evaluated on.
- 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I``): scaled to 8 bit as
  ``v8 = round(v16 * 255 / 65535)``. Pillow's own ``convert`` clips values
  above 255 instead, which turns almost every 16-bit image white. ``I`` is
  treated as a 16-bit container (PNG is the only format here that yields it),
  values are clipped to ``[0, 65535]`` first.
- 16-bit colour PNGs (``RGB``/``RGBA`` with 16 bits per channel) are reduced to
  8 bit by Pillow itself while decoding (high byte: ``v8 = floor(v16 / 256)``, at
  most one level below exact rounding).
- ``F`` (float): values are clipped to ``[0, 255]`` and rounded.

EXIF orientation is not applied (torchvision's loader does not either, and
box annotations refer to the stored pixel grid).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "decode_image", "to_rgb"]

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""Member extensions read as images, in order of preference when a key has several."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def _scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """``round(v * 255 / 65535)`` in integer arithmetic, for ``v`` in ``[0, 65535]``."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image to RGB 8-bit following the module's rules.

    Args:
        image: a loaded Pillow image of any mode.

    Returns:
        An ``RGB`` image of the same size (the input itself when already RGB).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        gray = _scale_16_to_8(np.asarray(image))
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    # Covers L, 1, P (with or without transparency), CMYK, YCbCr, LAB, HSV and all
    # alpha modes: Pillow drops alpha here, which is the documented choice.
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes (JPEG, PNG, WebP, or anything Pillow sniffs) to RGB 8-bit.

    Args:
        data: the encoded image.

    Returns:
        The fully decoded ``RGB`` image.

    Raises:
        ValueError: empty input, or bytes Pillow cannot identify or fully decode
            (truncated or corrupt files are errors, not partially grey images).
    """
    if not data:
        raise ValueError("empty image member (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = to_rgb(opened)
            if image is opened:
                # Detach from the closing file object.
                image = opened.copy()
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image refused as a decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ValueError(f"not a decodable image ({type(exc).__name__}: {exc})") from exc
    return image
