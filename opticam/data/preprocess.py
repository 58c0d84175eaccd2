"""Resize and centre-crop images the way the model zoos' evaluation transforms do.

By default the pixels are exactly those of
``torchvision.transforms._presets.ImageClassification`` applied to a PIL image (what
torchvision's reference evaluation does), minus the normalization, which lives inside
opticam's models: the shorter side is resized to ``resize_size`` with bilinear
interpolation (antialiased), then the centre ``size`` is cropped and the result is scaled
to ``[0, 1]``. Three settings cover the other zoos (values in :mod:`opticam.names`):

- ``interpolation``: PIL's filter (``bilinear``, ``bicubic``, ``nearest``, ...); timm's
  models mostly use ``bicubic``, Hugging Face's ViT ``bilinear``.
- ``resize_mode``: ``shorter`` (above) or ``squash``: resize to exactly ``resize_size``
  (an int for a square, or ``(height, width)``) ignoring the aspect ratio, as timm's
  ``crop_mode="squash"`` and Hugging Face's ``size={"height", "width"}`` do.
- ``crop_rounding``: where a crop with an odd margin ``m`` starts: ``round(m / 2)``
  half to even (``round``: torchvision, timm) or ``floor(m / 2)`` (``floor``: Hugging
  Face's image processors). They differ by one pixel when ``m = 3 (mod 4)``.

Boxes follow the same geometry. With the image ``W x H`` resized to
``W' x H'`` (in both modes) and the crop starting at ``(left, top)``:

    x' = x * W' / W - left,    y' = y * H' / H - top,

clipped to the crop ``[0, w] x [0, h]``; boxes left with no area are dropped.

Memory: an image whose longer side is more than :data:`MAX_ASPECT_RATIO` (32) times its
shorter side is refused (``ValueError``, an error row with stage ``"preprocess"``)
before anything is resized. Resizing keeps the aspect ratio, so without the limit a
1 x 10000 image of a few hundred bytes, far under the pixel cap, would be resized to
256 x 2,560,000 pixels (2.6 GB) to keep its centre 224 x 224. Within the limit the
resized image has at most ``32 * resize_size**2`` pixels (8 MB at 256) in
``shorter`` mode and ``resize_size`` in ``squash`` mode, and Pillow's intermediate
image at most ``resize_size`` times the source's longer side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from opticam.data.images import to_rgb
from opticam.data.types import Box
from opticam.errors import short_repr
from opticam.names import CROP_ROUNDINGS, INTERPOLATIONS, RESIZE_MODES

__all__ = ["MAX_ASPECT_RATIO", "Geometry", "Preprocess", "check_aspect_ratio"]

MAX_ASPECT_RATIO = 32
"""The most times an image's longer side may be its shorter one (32:1 is accepted).

Beyond photographs and most panoramas; the centre crop of a 32:1 image keeps a 32nd
of it. Bounds the memory of the resize (module doc)."""


def check_aspect_ratio(width: int, height: int) -> None:
    """Refuse a ``width x height`` image (sides >= 1) beyond :data:`MAX_ASPECT_RATIO`.

    Raises:
        ValueError: naming the size, the ratio and the limit.
    """
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        ratio = max(width, height) / min(width, height)
        raise ValueError(
            f"image is {width}x{height}, an aspect ratio of {ratio:,.1f}:1, beyond the "
            f"{MAX_ASPECT_RATIO}:1 that is resized (its resize would take memory out of "
            "proportion to the model's input); refused"
        )


@dataclass(frozen=True)
class Geometry:
    """Where an image of a given size lands after resize and centre crop.

    Attributes:
        resized: ``(W', H')`` after the resize.
        offset: ``(left, top)`` of the crop in resized pixels; negative where the
            crop is larger than the resized image (zero padding on that side).
        output: ``(w, h)`` of the crop.
    """

    resized: tuple[int, int]
    offset: tuple[int, int]
    output: tuple[int, int]


def _resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """``(W', H')`` with the shorter side ``shorter`` and the longer side truncated.

    Same arithmetic as torchvision's ``_compute_resized_output_size``:
    ``long' = int(shorter * long / short)`` (truncation, not rounding).
    """
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def _crop_start(extent: int, crop: int, rounding: str = "round") -> int:
    """First kept index of a centre crop of ``crop`` from ``extent`` pixels.

    torchvision rounds ``(extent - crop) / 2`` with Python's ``round`` (half to
    even: a 1-pixel margin starts the crop at 0, a 3-pixel margin at 2); Hugging Face
    floors it (``rounding="floor"``: 3 -> 1). When the crop is larger both pad
    ``(crop - extent) // 2`` zeros before the image, i.e. the crop starts at minus that.
    """
    if crop > extent:
        return -((crop - extent) // 2)
    if rounding == "floor":
        return (extent - crop) // 2
    return int(round((extent - crop) / 2.0))


def _pair(value: object, what: str) -> tuple[int, int]:
    """``(height, width)`` from an int (a square) or a pair of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{what} must be an int or (height, width) ints, got {short_repr(value)}")
    if min(pair) < 1:
        raise ValueError(f"{what} must be positive, got {short_repr(value)}")
    return pair


class Preprocess:
    """Evaluation preset: resize, centre crop, scale to ``[0, 1]`` (see the module doc).

    Args:
        size: crop size, ``int`` for square or ``(height, width)``.
        resize_size: with ``resize_mode="shorter"``, the target of the shorter side
            before cropping (an int); with ``"squash"``, the exact size of the resized
            image (an int for a square, or ``(height, width)``). Defaults to the crop's
            larger side (shorter) or the crop size (squash), i.e. no margin. ImageNet
            models use e.g. ``size=224, resize_size=256``.
        interpolation: resampling filter, one of :data:`opticam.names.INTERPOLATIONS`.
        resize_mode: ``"shorter"`` (keep the aspect ratio) or ``"squash"``.
        crop_rounding: ``"round"`` (torchvision, timm) or ``"floor"`` (Hugging Face).

    Calling it on ``(image, boxes)`` returns the image as a ``(3, h, w)`` float32
    tensor in ``[0, 1]`` and the boxes as an ``(n, 4)`` float32 tensor in output
    pixels (see the module docstring for the formula).

    Raises:
        ValueError: a non-positive or malformed size, or an unknown setting.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        resize_size: int | Sequence[int] | None = None,
        *,
        interpolation: str = "bilinear",
        resize_mode: str = "shorter",
        crop_rounding: str = "round",
    ) -> None:
        height, width = _pair(size, "size")
        for value, known, what in (
            (interpolation, INTERPOLATIONS, "interpolation"),
            (resize_mode, RESIZE_MODES, "resize_mode"),
            (crop_rounding, CROP_ROUNDINGS, "crop_rounding"),
        ):
            if value not in known:
                raise ValueError(f"unknown {what} {short_repr(value)} (known: {', '.join(known)})")
        resized: int | tuple[int, int]
        if resize_mode == "squash":
            resized = _pair(
                resize_size if resize_size is not None else (height, width), "resize_size"
            )
        else:
            if resize_size is None:
                resize_size = max(height, width)
            if not isinstance(resize_size, int) or isinstance(resize_size, bool) or resize_size < 1:
                raise ValueError(
                    f"resize_size must be a positive int or None, got {short_repr(resize_size)}"
                )
            resized = resize_size
        self.size: tuple[int, int] = (height, width)
        #: Shorter side (``shorter``) or ``(height, width)`` of the resized image (``squash``).
        self.resize_size: int | tuple[int, int] = resized
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.crop_rounding = crop_rounding

    def _key(self) -> tuple[object, ...]:
        return (
            self.size,
            self.resize_size,
            self.interpolation,
            self.resize_mode,
            self.crop_rounding,
        )

    def __repr__(self) -> str:
        """``Preprocess(size=..., resize_size=...)``, plus the settings not at their default."""
        extra = "".join(
            f", {name}={short_repr(value)}"
            for name, value, default in (
                ("interpolation", self.interpolation, "bilinear"),
                ("resize_mode", self.resize_mode, "shorter"),
                ("crop_rounding", self.crop_rounding, "round"),
            )
            if value != default
        )
        return f"Preprocess(size={self.size}, resize_size={self.resize_size}{extra})"

    def __eq__(self, other: object) -> bool:
        """Equal to another :class:`Preprocess` with the same sizes and settings."""
        if not isinstance(other, Preprocess):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        """A hash of the sizes and settings, consistent with ``==``."""
        return hash(self._key())

    def geometry(self, width: int, height: int) -> Geometry:
        """Resize target, crop offset and output size for a ``width x height`` image.

        Raises:
            ValueError: a size below 1, or an aspect ratio beyond
                :data:`MAX_ASPECT_RATIO` (naming the size and the ratio).
        """
        if width < 1 or height < 1:
            raise ValueError(f"image must have a positive size, got {width}x{height}")
        check_aspect_ratio(width, height)
        if isinstance(self.resize_size, tuple):
            new_height, new_width = self.resize_size
        else:
            new_width, new_height = _resized_size(width, height, self.resize_size)
        if new_width < 1 or new_height < 1:
            raise ValueError(
                f"a {width}x{height} image resized to shorter side {self.resize_size} "
                f"would have a zero-length side ({new_width}x{new_height})"
            )
        crop_height, crop_width = self.size
        rounding = self.crop_rounding
        return Geometry(
            resized=(new_width, new_height),
            offset=(
                _crop_start(new_width, crop_width, rounding),
                _crop_start(new_height, crop_height, rounding),
            ),
            output=(crop_width, crop_height),
        )

    def transform_boxes(
        self, boxes: Sequence[Box] | torch.Tensor, width: int, height: int
    ) -> torch.Tensor:
        """Map boxes of a ``width x height`` image into output pixels.

        Args:
            boxes: ``(n, 4)`` boxes ``x0, y0, x1, y1`` in original pixel-edge coordinates.
            width: original image width ``W``.
            height: original image height ``H``.

        Returns:
            ``(m, 4)`` float32 boxes, ``m <= n``: scaled by ``(W'/W, H'/H)``, shifted by
            the crop offset, clipped to ``[0, w] x [0, h]``, zero-area boxes dropped.
        """
        geometry = self.geometry(width, height)
        table = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        (new_width, new_height), (left, top) = geometry.resized, geometry.offset
        out_width, out_height = geometry.output
        scale = torch.tensor([new_width / width, new_height / height] * 2, dtype=torch.float64)
        shift = torch.tensor([left, top] * 2, dtype=torch.float64)
        upper = torch.tensor([out_width, out_height] * 2, dtype=torch.float64)
        moved = (table * scale - shift).clamp(min=torch.zeros(4, dtype=torch.float64), max=upper)
        keep = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])
        return moved[keep].to(torch.float32)

    def __call__(
        self, image: Image.Image, boxes: Sequence[Box] | torch.Tensor = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocess one image and its boxes.

        Args:
            image: PIL image of any mode (converted to RGB first), size ``W x H``.
            boxes: ``(n, 4)`` boxes in original pixels (may be empty).

        Returns:
            ``(image, boxes)``: ``(3, h, w)`` float32 in ``[0, 1]`` and ``(m, 4)`` float32.

        Raises:
            ValueError: the image's aspect ratio is beyond :data:`MAX_ASPECT_RATIO`,
                checked before anything is converted or resized.
        """
        width, height = image.size
        geometry = self.geometry(width, height)  # refuses an extreme aspect ratio first
        image = to_rgb(image)
        # A one-item size is torchvision's "shorter side"; two items are (height, width).
        target = (
            list(self.resize_size) if isinstance(self.resize_size, tuple) else [self.resize_size]
        )
        resized = TF.resize(
            image,
            target,
            interpolation=InterpolationMode(self.interpolation),
            antialias=True,
        )
        if tuple(resized.size) != geometry.resized:
            # Guards the box arithmetic against a future change in torchvision.
            raise RuntimeError(
                f"torchvision resized {width}x{height} to {resized.size}, "
                f"expected {geometry.resized}"
            )
        (left, top), (out_width, out_height) = geometry.offset, geometry.output
        # PIL fills out-of-image areas with zeros, as torchvision's padding does.
        cropped = resized.crop((left, top, left + out_width, top + out_height))
        tensor = TF.pil_to_tensor(cropped).to(torch.float32).div_(255.0)
        return tensor, self.transform_boxes(boxes, width, height)
