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

Formats: only :data:`IMAGE_FORMATS` (JPEG, PNG, WebP) are opened, whatever the
member's extension. Pillow picks its decoder from the bytes, and some of its plugins
hand data to other programs (the EPS plugin runs Ghostscript), so every other format
is refused before any plugin of it reads the data: :class:`ImageFormatError` names
what the bytes look like, found from their first bytes only (Pillow's own format
checks, plus PDF, SVG and HEIF, which Pillow cannot read).

Size limit: an image with more than ``max_pixels`` pixels (default
:data:`DEFAULT_MAX_PIXELS`) is refused from its header, before any pixel is
decoded (:class:`ImageTooLargeError`). The member-size cap of the reader does not
bound this: a 16-bit 9000 x 9000 PNG of zeros is 180 KB on disk and well over a
gigabyte decoded. This limit replaces Pillow's own decompression-bomb check
(``PIL.Image.MAX_IMAGE_PIXELS``): its warning is silenced here, and its error (at
twice that value) becomes :class:`ImageTooLargeError` too.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from opticam.config import DEFAULT_MAX_PIXELS as CONFIG_MAX_PIXELS

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "ImageFormatError",
    "ImageTooLargeError",
    "decode_image",
    "identify_format",
    "to_rgb",
]

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""Member extensions read as images, in order of preference when a key has several."""

IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
"""The only Pillow formats an image member is opened with (``Image.open(formats=...)``).

Any of them under any of :data:`IMAGE_EXTENSIONS` (a PNG named ``.jpg`` is read).
``JPEG`` includes the multi-picture JPEGs of cameras (Pillow's ``MPO``, first picture)
and ``PNG`` the animated ones (first frame). Everything else (EPS/PostScript, PDF,
BMP, GIF, TIFF, ...) is refused with :class:`ImageFormatError`."""

# Formats Pillow has no reader for, named by their first bytes for the message.
_FOREIGN_SIGNATURES: tuple[tuple[str, int, tuple[bytes, ...]], ...] = (
    ("PDF", 0, (b"%PDF-",)),
    ("SVG", 0, (b"<svg", b"<?xml")),
    ("HEIF", 4, (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypheif")),
)

DEFAULT_MAX_PIXELS = CONFIG_MAX_PIXELS  # the one default, RunConfig.max_pixels's
"""Most pixels (width x height) an image may have: 120 million.

Above the largest photos cameras take (100-megapixel medium format, e.g.
11648 x 8736 = 101.8 million) and hundreds of times the images of classification
datasets (ImageNet's average about 0.2 million). At the limit, the decoded RGB
image takes 360 MB, and converting a 16-bit grayscale one about 6 bytes per pixel
more for a moment."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class ImageTooLargeError(ValueError):
    """An image has more pixels than the limit; refused before its pixels were decoded."""


class ImageFormatError(ValueError):
    """The bytes are an image format outside :data:`IMAGE_FORMATS`; no plugin read them."""


def identify_format(data: bytes) -> str | None:
    """What image format ``data`` looks like, from its first 16 bytes only.

    Runs the magic-byte checks (``accept`` functions) Pillow's plugins register,
    in Pillow's own order, without calling any plugin's parser or decoder, then
    a few signatures of formats Pillow cannot read (PDF, SVG, HEIF).

    Args:
        data: the start of a file (more is ignored).

    Returns:
        The format's name (Pillow's, e.g. ``"EPS"``, ``"TIFF"``), or None.
    """
    prefix = data[:16]
    Image.init()  # registers every plugin's check; importing a plugin runs nothing
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a check that cannot handle a short prefix: not that format
            continue
    for name, offset, signatures in _FOREIGN_SIGNATURES:
        if any(data[offset:].startswith(signature) for signature in signatures):
            return name
    return None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse a ``width x height`` image with more than ``max_pixels`` pixels.

    Args:
        width: image width from its header.
        height: image height from its header.
        max_pixels: the most pixels accepted.

    Raises:
        ImageTooLargeError: naming the size and the limit.
    """
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels, more than "
            f"max_pixels={max_pixels:,}; refused before decoding"
        )


def _scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """``round(v * 255 / 65535)`` in integer arithmetic, for ``v`` in ``[0, 65535]``.

    In place on one uint32 copy (``65535 * 255 + 32767 < 2**32``): 4 bytes per pixel
    on top of the image, where int64 expressions made several 8-byte temporaries.
    """
    if values.dtype.kind != "u" or values.dtype.itemsize > 2:
        values = np.clip(values, 0, 65535)
    wide = values.astype(np.uint32)
    wide *= 255
    wide += 32767
    wide //= 65535
    return wide.astype(np.uint8)


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


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a JPEG, PNG or WebP image (:data:`IMAGE_FORMATS`) to RGB 8-bit.

    Only the plugins of :data:`IMAGE_FORMATS` see the bytes. The size is read from
    the header first (Pillow opens lazily) and checked against ``max_pixels``
    before any pixel is decoded.

    Args:
        data: the encoded image.
        max_pixels: the most pixels (width x height) accepted.

    Returns:
        The fully decoded ``RGB`` image.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels, or more than Pillow's
            own hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``); nothing decoded.
        ImageFormatError: another format than :data:`IMAGE_FORMATS`, named.
        ValueError: empty input, or bytes that are no image or cannot be fully
            decoded (truncated or corrupt files are errors, not partially grey
            images).
    """
    if not data:
        raise ValueError("empty image member (0 bytes)")
    accepted = ", ".join(IMAGE_FORMATS)
    try:
        # Pillow warns from Image.open (and for some formats from load) above
        # Image.MAX_IMAGE_PIXELS; max_pixels is the one limit here, so the warning is
        # silenced, not turned into an exception by `-W error`. catch_warnings is not
        # thread-safe before Python 3.14: a filter that another thread adds at the same
        # moment can be lost, or this one kept; both only change which warnings print.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as opened:
                _check_pixels(*opened.size, max_pixels)
                opened.load()
                image = to_rgb(opened)
                if image is opened:
                    # Detach from the closing file object.
                    image = opened.copy()
    except Image.DecompressionBombError as exc:
        # Raised by Image.open, before _check_pixels could run: exc names the size.
        raise ImageTooLargeError(
            f"image refused before decoding by Pillow's limit, 2 * PIL.Image.MAX_IMAGE_PIXELS "
            f"(max_pixels={max_pixels:,}): {exc}"
        ) from exc
    except ImageTooLargeError:
        raise
    except Image.UnidentifiedImageError as exc:
        # No plugin of IMAGE_FORMATS took the bytes; say what they are, unread.
        found = identify_format(data)
        if found in IMAGE_FORMATS:  # the right magic bytes, but a header its reader refused
            raise ValueError(
                f"not a decodable image: the bytes start as {found} but its header is "
                f"corrupt (first bytes {data[:8]!r})"
            ) from exc
        if found is not None:
            raise ImageFormatError(
                f"the bytes are {found}, not one of the formats opticam opens "
                f"({accepted}); refused unread"
            ) from exc
        raise ValueError(
            f"not a decodable image: no {accepted} data, nor any other known image "
            f"format (first bytes {data[:8]!r})"
        ) from exc
    except Exception as exc:
        # Any failure of the decoders (OSError, SyntaxError, struct.error, ...) is the
        # bytes' fault: one bad image costs one error row, not the shard.
        raise ValueError(f"not a decodable image ({type(exc).__name__}: {exc})") from exc
    return image
