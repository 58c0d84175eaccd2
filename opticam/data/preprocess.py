"""Resize and centre-crop images the way torchvision's classification presets do.

The pixels are exactly those of ``torchvision.transforms._presets.ImageClassification``
applied to a PIL image (what torchvision's reference evaluation does), minus the
normalization, which lives inside opticam's models: the shorter side is
resized to ``resize_size`` with bilinear interpolation (antialiased), then the
centre ``size`` is cropped and the result is scaled to ``[0, 1]``.

Boxes follow the same geometry. With the image ``W x H`` resized to
``W' x H'`` and the crop starting at ``(left, top)``:

    x' = x * W' / W - left,    y' = y * H' / H - top,

clipped to the crop ``[0, w] x [0, h]``; boxes left with no area are dropped.
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

__all__ = ["Geometry", "Preprocess"]


@dataclass(frozen=True)
class Geometry:
    """Where an image of a given size lands after resize and centre crop.

    Attributes:
        resized: ``(W', H')`` after resizing the shorter side.
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


def _crop_start(extent: int, crop: int) -> int:
    """First kept index of a centre crop of ``crop`` from ``extent`` pixels.

    torchvision rounds ``(extent - crop) / 2`` with Python's ``round`` (half to
    even: a 1-pixel margin starts the crop at 0, a 3-pixel margin at 2). When the
    crop is larger it pads ``(crop - extent) // 2`` zeros before the image, i.e.
    the crop starts at minus that.
    """
    if crop > extent:
        return -((crop - extent) // 2)
    return int(round((extent - crop) / 2.0))


class Preprocess:
    """Classification preset: resize the shorter side, centre crop, scale to ``[0, 1]``.

    Args:
        size: crop size, ``int`` for square or ``(height, width)``.
        resize_size: target of the shorter side before cropping. Defaults to the
            crop's larger side (for a square crop: ``size``, i.e. no margin, the whole
            shorter side is kept). ImageNet models use e.g. ``size=224,
            resize_size=256``.

    Calling it on ``(image, boxes)`` returns the image as a ``(3, h, w)`` float32
    tensor in ``[0, 1]`` and the boxes as an ``(n, 4)`` float32 tensor in output
    pixels (see the module docstring for the formula).

    Raises:
        ValueError: a non-positive or malformed size.
    """

    def __init__(self, size: int | Sequence[int], resize_size: int | None = None) -> None:
        if isinstance(size, int) and not isinstance(size, bool):
            height, width = size, size
        elif (
            isinstance(size, Sequence)
            and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
        ):
            height, width = int(size[0]), int(size[1])
        else:
            raise ValueError(f"size must be an int or (height, width) ints, got {size!r}")
        if height < 1 or width < 1:
            raise ValueError(f"size must be positive, got {size!r}")
        if resize_size is None:
            resize_size = max(height, width)
        if not isinstance(resize_size, int) or isinstance(resize_size, bool) or resize_size < 1:
            raise ValueError(f"resize_size must be a positive int or None, got {resize_size!r}")
        self.size: tuple[int, int] = (height, width)
        self.resize_size: int = resize_size

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, resize_size={self.resize_size})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Preprocess):
            return NotImplemented
        return (self.size, self.resize_size) == (other.size, other.resize_size)

    def __hash__(self) -> int:
        return hash((self.size, self.resize_size))

    def geometry(self, width: int, height: int) -> Geometry:
        """Resize target, crop offset and output size for a ``width x height`` image."""
        if width < 1 or height < 1:
            raise ValueError(f"image must have a positive size, got {width}x{height}")
        new_width, new_height = _resized_size(width, height, self.resize_size)
        if new_width < 1 or new_height < 1:
            raise ValueError(
                f"a {width}x{height} image resized to shorter side {self.resize_size} "
                f"would have a zero-length side ({new_width}x{new_height})"
            )
        crop_height, crop_width = self.size
        return Geometry(
            resized=(new_width, new_height),
            offset=(_crop_start(new_width, crop_width), _crop_start(new_height, crop_height)),
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
        """
        image = to_rgb(image)
        width, height = image.size
        geometry = self.geometry(width, height)
        resized = TF.resize(
            image,
            [self.resize_size],
            interpolation=InterpolationMode.BILINEAR,
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
