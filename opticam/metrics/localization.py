"""Localization metrics against ground-truth boxes (section 4 of METHOD.md).

The map scored is the one for the ground-truth class. ``U`` is the union of the
image's ground-truth boxes, rasterised on the map's pixel grid:

    pixel (i, j) (row i, column j) is in box (x0, y0, x1, y1)
        iff  x0 <= j + 0.5 < x1  and  y0 <= i + 0.5 < y1

i.e. a pixel belongs to a box when its centre does, with half-open intervals so that
two boxes sharing an edge never both claim a pixel row. Boxes are in the map's pixel
coordinates (x right, y down, the image spans [0, W] x [0, H]).

Per image, with ``m`` the map (B,1,H,W), ``|U|`` the number of pixels in U:

- ``pointing_game`` (SP): 1 if the map's maximum lies in U, else 0. The maximum is the
  first one in raster order (``argmax`` of the flattened map), so ties are deterministic.
- ``energy_in_box`` (EP): ``P = sum_{U} m / sum m`` (0 for an all-zero map).
- ``f1``: ``2 P R / (P + R)`` with ``R = sum_{U} m / |U|`` (0 when ``P + R == 0``).
- box metrics: the map is thresholded at its mean (``m >= mean(m)``), the largest
  8-connected component of the foreground is boxed (pixels in rows ``i0..i1`` and
  columns ``j0..j1`` give the box ``(j0, i0, j1 + 1, i1 + 1)``; ties between equally
  large components go to the one met first in raster order), and its IoU with every
  ground-truth box is computed as continuous box areas.
  ``loc_error = 1 - max IoU`` (LE) and ``box_acc = [max IoU >= 0.5]``.

Images without boxes, or whose boxes contain no pixel centre, get NaN in every metric.
Everything but the connected components runs batched on the maps' device; the
components are labelled on the CPU by :func:`scipy.ndimage.label` (one transfer per
call, for the whole batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from opticam.names import LOCALIZATION_COLUMNS

__all__ = [
    "LOCALIZATION_METRICS",
    "boxes_union_mask",
    "largest_component_box",
    "box_iou",
    "localization",
]

#: The per-image columns :func:`localization` returns (a view of
#: :data:`opticam.names.LOCALIZATION_COLUMNS`).
LOCALIZATION_METRICS: tuple[str, ...] = LOCALIZATION_COLUMNS

#: IoU at or above which a predicted box counts as correct for ``box_acc``.
BOX_ACC_IOU = 0.5

# 8-connectivity: a pixel touches the 8 pixels around it, corners included.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_box_tensor(boxes: Tensor | Sequence[Sequence[float]], index: int) -> Tensor:
    tensor = torch.as_tensor(boxes, dtype=torch.float32)
    if tensor.numel() == 0:
        return tensor.reshape(0, 4)
    if tensor.dim() != 2 or tensor.shape[1] != 4:
        raise ValueError(
            f"boxes[{index}] must have shape (n, 4) as x0, y0, x1, y1, got {tuple(tensor.shape)}"
        )
    return tensor


def _flatten_boxes(
    boxes: Sequence[Tensor | Sequence[Sequence[float]]], batch: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """All boxes as one (T,4) tensor and the (T,) index of the image each belongs to."""
    if len(boxes) != batch:
        raise ValueError(f"boxes must hold one entry per map: {batch} maps, {len(boxes)} entries")
    per_image = [_as_box_tensor(bx, i) for i, bx in enumerate(boxes)]
    counts = torch.tensor([len(bx) for bx in per_image], dtype=torch.long)
    if len({bx.device for bx in per_image}) > 1:  # mixed devices cannot be concatenated
        per_image = [bx.to(device) for bx in per_image]
    # Boxes usually come from the CPU loader: concatenate there, copy to the device once.
    flat = torch.cat(per_image).to(device) if per_image else torch.zeros(0, 4, device=device)
    owner = torch.repeat_interleave(torch.arange(batch), counts).to(device)
    return flat, owner


def _rasterise(flat: Tensor, owner: Tensor, batch: int, height: int, width: int) -> Tensor:
    """(B,H,W) bool union of the boxes of each image (pixel-centre rule)."""
    xs = torch.arange(width, device=flat.device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=flat.device, dtype=torch.float32) + 0.5
    cols = (xs >= flat[:, 0:1]) & (xs < flat[:, 2:3])  # (T,W)
    rows = (ys >= flat[:, 1:2]) & (ys < flat[:, 3:4])  # (T,H)
    inside = (rows.unsqueeze(2) & cols.unsqueeze(1)).float()  # (T,H,W)
    counts = torch.zeros(batch, height, width, device=flat.device)
    return counts.index_add_(0, owner, inside) > 0


def boxes_union_mask(
    boxes: Sequence[Tensor | Sequence[Sequence[float]]],
    height: int,
    width: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Rasterise the union of each image's boxes on an ``height`` x ``width`` grid.

    Args:
        boxes: B entries of (n_b, 4) boxes ``x0, y0, x1, y1`` in pixel coordinates.
        height: grid rows H.
        width: grid columns W.
        device: where the mask is built.

    Returns:
        (B,H,W) bool tensor, True where the pixel centre ``(j + 0.5, i + 0.5)`` lies in
        ``[x0, x1) x [y0, y1)`` of at least one box.
    """
    flat, owner = _flatten_boxes(boxes, len(boxes), torch.device(device))
    return _rasterise(flat, owner, len(boxes), height, width)


def largest_component_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box of the largest 8-connected component of a binary mask.

    Components are labelled by :func:`scipy.ndimage.label` with a 3x3 structure of ones
    (8-connectivity). SciPy numbers them in raster order of their first pixel, so the
    first maximum of their sizes is the first of equally large components in raster order.

    Args:
        mask: (H,W) boolean array.

    Returns:
        ``(x0, y0, x1, y1) = (j0, i0, j1 + 1, i1 + 1)`` for the component spanning rows
        ``i0..i1`` and columns ``j0..j1`` (pixel-edge coordinates), or ``None`` when the
        mask is empty. Among equally large components the first in raster order wins.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H,W), got shape {mask.shape}")
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    largest = int(np.argmax(sizes)) + 1
    rows, cols = ndimage.find_objects(labels)[largest - 1]
    return (int(cols.start), int(rows.start), int(cols.stop), int(rows.stop))


def box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Element-wise IoU of two aligned sets of boxes ``x0, y0, x1, y1``.

    ``IoU = |a ∩ b| / (|a| + |b| - |a ∩ b|)`` with continuous areas (degenerate boxes
    have area 0); 0 where the union is empty.

    Args:
        boxes_a: (T,4) boxes.
        boxes_b: (T,4) boxes.

    Returns:
        (T,) IoU values in [0, 1].
    """
    width = (
        torch.minimum(boxes_a[:, 2], boxes_b[:, 2]) - torch.maximum(boxes_a[:, 0], boxes_b[:, 0])
    ).clamp(min=0)
    height = (
        torch.minimum(boxes_a[:, 3], boxes_b[:, 3]) - torch.maximum(boxes_a[:, 1], boxes_b[:, 1])
    ).clamp(min=0)
    inter = width * height

    def area(boxes: Tensor) -> Tensor:
        return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)

    union = area(boxes_a) + area(boxes_b) - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, 1.0), 0.0)


def localization(
    maps: Tensor, boxes: Sequence[Tensor | Sequence[Sequence[float]]]
) -> dict[str, Tensor]:
    """Pointing game, energy, F1 and box metrics of saliency maps against boxes.

    See the module docstring for the exact pixel rule and definitions.

    Args:
        maps: (B,1,H,W) saliency maps (for the ground-truth class), non-negative.
        boxes: B entries, each (n_b, 4) ``x0, y0, x1, y1`` in the map's pixel
            coordinates (``n_b = 0`` for an image without boxes).

    Returns:
        Dict of (B,) float32 tensors on the maps' device: ``pointing_game``,
        ``energy_in_box``, ``f1``, ``loc_error``, ``box_acc``; NaN for images without a
        box pixel.
    """
    if not isinstance(maps, Tensor) or maps.dim() != 4 or maps.shape[1] != 1:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a (B,1,H,W) tensor, got {shape}")
    batch, _, height, width = maps.shape
    device = maps.device
    flat_boxes, owner = _flatten_boxes(boxes, batch, device)
    union = _rasterise(flat_boxes, owner, batch, height, width)  # (B,H,W)
    values = maps[:, 0].float()

    area = union.sum((1, 2)).float()
    valid = area > 0
    total = values.sum((1, 2))
    inside = (values * union).sum((1, 2))

    peak = values.reshape(batch, -1).argmax(dim=1)
    pointing = union.reshape(batch, -1).gather(1, peak.unsqueeze(1)).squeeze(1).float()
    precision = torch.where(total > 0, inside / torch.where(total > 0, total, 1.0), 0.0)
    recall = inside / torch.where(valid, area, 1.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / torch.where(denom > 0, denom, 1.0), 0.0)

    # The mean threshold is taken in float64 so that a constant map equals its own mean
    # (in float32 the rounded mean of a constant can exceed it, leaving no foreground).
    exact = values.to(torch.float32 if device.type == "mps" else torch.float64)
    foreground_mask = exact >= exact.mean((1, 2), keepdim=True)
    # Connected components are inherently sequential: label them on the CPU, one
    # transfer for the whole batch, and only for images that have boxes.
    foreground = foreground_mask.cpu().numpy()
    predicted = torch.zeros(batch, 4)
    for b in np.flatnonzero(valid.cpu().numpy()):
        box = largest_component_box(foreground[b])
        if box is not None:
            predicted[b] = torch.tensor(box, dtype=torch.float32)
    predicted = predicted.to(device)
    iou = box_iou(predicted[owner], flat_boxes)
    best_iou = torch.zeros(batch, device=device).scatter_reduce(
        0, owner, iou, reduce="amax", include_self=True
    )

    nan = torch.tensor(float("nan"), device=device)
    results = {
        "pointing_game": pointing,
        "energy_in_box": precision,
        "f1": f1,
        "loc_error": 1 - best_iou,
        "box_acc": (best_iou >= BOX_ACC_IOU).float(),
    }
    return {name: torch.where(valid, results[name], nan) for name in LOCALIZATION_COLUMNS}
