"""Tests of opticam.metrics.localization: exact values on small hand-made maps."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import array_shapes, arrays
from torch import Tensor

from opticam.metrics import (
    LOCALIZATION_METRICS,
    box_iou,
    boxes_union_mask,
    largest_component_box,
    localization,
)
from opticam.names import LOCALIZATION_COLUMNS, METRICS_BY_COLUMN


def one(values: list[list[float]]) -> Tensor:
    """A (1,1,H,W) map from nested lists."""
    return torch.tensor(values, dtype=torch.float32)[None, None]


def scalars(out: dict[str, Tensor]) -> dict[str, float]:
    return {name: float(value.item()) for name, value in out.items()}


def test_pointing_energy_f1_and_box_by_hand() -> None:
    m = torch.zeros(4, 4)
    m[0, 1] = 1.0  # the peak, inside the box
    m[3, 3] = 0.5
    out = scalars(localization(m[None, None], [torch.tensor([[0.0, 0.0, 2.0, 2.0]])]))
    p, r = 1 / 1.5, 1 / 4  # energy in U / total, energy in U / |U|
    assert out["pointing_game"] == 1.0
    assert out["energy_in_box"] == pytest.approx(p, abs=1e-7)
    assert out["f1"] == pytest.approx(2 * p * r / (p + r), abs=1e-7)
    assert out["f1"] == pytest.approx(4 / 11, abs=1e-7)
    # Threshold at the mean 1.5/16: two single-pixel components tie; the first in raster
    # order, (0,1), gives the box (1,0,2,1): IoU with (0,0,2,2) = 1/4.
    assert out["loc_error"] == pytest.approx(0.75, abs=1e-7)
    assert out["box_acc"] == 0.0


def test_pointing_outside_the_box() -> None:
    m = torch.zeros(4, 4)
    m[3, 3] = 1.0
    m[0, 0] = 0.25
    out = scalars(localization(m[None, None], [torch.tensor([[0.0, 0.0, 2.0, 2.0]])]))
    assert out["pointing_game"] == 0.0
    assert out["energy_in_box"] == pytest.approx(0.25 / 1.25, abs=1e-7)


def test_largest_component_uses_8_connectivity() -> None:
    # A 2x3 blob at rows 1-2, cols 1-3 touches the pixel (0,0) only by a corner:
    # 8-connected, so the component's box is (0,0,4,3); a lone pixel at (4,5) is smaller.
    m = torch.zeros(5, 6)
    m[1:3, 1:4] = 1.0
    m[0, 0] = 1.0
    m[4, 5] = 1.0
    box = torch.tensor([[0.0, 0.0, 4.0, 3.0]])
    out = scalars(localization(m[None, None], [box]))
    assert out["loc_error"] == pytest.approx(0.0, abs=1e-7)
    assert out["box_acc"] == 1.0
    assert largest_component_box((m > 0).numpy()) == (0, 0, 4, 3)


def test_multiple_boxes_form_a_union() -> None:
    # Two one-pixel boxes in opposite corners of a uniform map: |U| = 2.
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [3.0, 3.0, 4.0, 4.0]])
    out = scalars(localization(torch.ones(1, 1, 4, 4), [boxes]))
    assert out["pointing_game"] == 1.0  # first maximum in raster order is (0,0)
    p, r = 2 / 16, 2 / 2
    assert out["energy_in_box"] == pytest.approx(p, abs=1e-7)
    assert out["f1"] == pytest.approx(2 * p * r / (p + r), abs=1e-7)  # 2/9
    # A constant map is all foreground: box (0,0,4,4), IoU 1/16 with each ground truth.
    assert out["loc_error"] == pytest.approx(15 / 16, abs=1e-7)
    # Overlapping boxes count their shared pixel once: 4 + 4 - 1.
    overlap = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    assert int(boxes_union_mask([overlap], 4, 4).sum()) == 7
    out = scalars(localization(torch.ones(1, 1, 4, 4), [overlap]))
    assert out["energy_in_box"] == pytest.approx(7 / 16, abs=1e-7)
    assert out["loc_error"] == pytest.approx(1 - 4 / 16, abs=1e-7)


def test_pixel_centre_rule() -> None:
    # x in [0.5, 1.5) holds the centre 0.5 of column 0 but not 1.5 of column 1;
    # y in [0.5, 1.6) holds the centres 0.5 and 1.5 of rows 0 and 1.
    mask = boxes_union_mask([torch.tensor([[0.5, 0.5, 1.5, 1.6]])], 3, 3)
    assert mask[0].int().tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]
    # Boxes sharing an edge never share a pixel.
    mask = boxes_union_mask([[[0.0, 0.0, 2.0, 3.0]], [[2.0, 0.0, 3.0, 3.0]]], 3, 3)
    assert mask[0].int().tolist() == [[1, 1, 0]] * 3
    assert mask[1].int().tolist() == [[0, 0, 1]] * 3


def test_no_boxes_gives_nan_and_batches_match_single_images() -> None:
    torch.manual_seed(0)
    maps = torch.rand(4, 1, 6, 5)
    boxes: list[Tensor | list[list[float]]] = [
        torch.tensor([[1.0, 1.0, 4.0, 5.0]]),
        torch.zeros(0, 4),  # no boxes
        [],  # no boxes, as a list
        torch.tensor([[2.0, 2.0, 2.0, 6.0]]),  # degenerate: holds no pixel centre
    ]
    out = localization(maps, boxes)
    assert set(out) == {"pointing_game", "energy_in_box", "f1", "loc_error", "box_acc"}
    assert tuple(out) == LOCALIZATION_COLUMNS == LOCALIZATION_METRICS
    assert all(METRICS_BY_COLUMN[name].group == "localization" for name in out)
    for name, value in out.items():
        assert value.shape == (4,) and value.dtype == torch.float32
        assert not math.isnan(value[0].item()), name
        assert torch.isnan(value[1:]).all(), name
        single = localization(maps[:1], boxes[:1])[name]
        torch.testing.assert_close(value[:1], single)


def test_zero_map_has_no_energy_and_no_nan() -> None:
    out = scalars(localization(torch.zeros(1, 1, 4, 4), [torch.tensor([[0.0, 0.0, 2.0, 2.0]])]))
    assert out["energy_in_box"] == 0.0 and out["f1"] == 0.0
    assert out["pointing_game"] == 1.0  # argmax of a constant map is (0,0), inside
    assert out["loc_error"] == pytest.approx(0.75)  # whole-image box vs a quarter


def test_constant_maps_are_all_foreground() -> None:
    # 0.1 is not a float32 sum-friendly value: its float32 mean over many pixels rounds
    # away from 0.1, which must not empty the thresholded map.
    out = scalars(localization(torch.full((1, 1, 64, 48), 0.1), [[[0.0, 0.0, 48.0, 64.0]]]))
    assert out["loc_error"] == pytest.approx(0.0, abs=1e-7) and out["box_acc"] == 1.0


def test_box_iou() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([1 / 7, 0.0, 1.0]))
    zero = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert box_iou(zero, zero).item() == 0.0


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(B,1,H,W\)"):
        localization(torch.ones(1, 4, 4), [torch.zeros(0, 4)])
    with pytest.raises(ValueError, match="one entry per map: 2 maps, 1 entries"):
        localization(torch.ones(2, 1, 4, 4), [torch.zeros(0, 4)])
    with pytest.raises(ValueError, match=r"boxes\[0\] must have shape \(n, 4\)"):
        localization(torch.ones(1, 1, 4, 4), [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="2-D"):
        largest_component_box(np.ones((2, 2, 2), dtype=bool))


def _flood_fill_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Reference: the largest 8-connected component by breadth-first search, plainly.

    Components are met in raster order of their first pixel and only a strictly larger one
    replaces the best, which is the documented tie rule.
    """
    height, width = mask.shape
    seen = np.zeros_like(mask)
    best, best_size = None, 0
    for i0 in range(height):
        for j0 in range(width):
            if not mask[i0, j0] or seen[i0, j0]:
                continue
            seen[i0, j0] = True
            queue, pixels = deque([(i0, j0)]), []
            while queue:
                i, j = queue.popleft()
                pixels.append((i, j))
                for a in range(max(0, i - 1), min(height, i + 2)):
                    for b in range(max(0, j - 1), min(width, j + 2)):
                        if mask[a, b] and not seen[a, b]:
                            seen[a, b] = True
                            queue.append((a, b))
            if len(pixels) > best_size:
                rows, cols = zip(*pixels, strict=True)
                best_size, best = len(pixels), (min(cols), min(rows), max(cols) + 1, max(rows) + 1)
    return best


@settings(max_examples=300, deadline=None)
@given(arrays(bool, array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=14)))
def test_largest_component_matches_a_flood_fill(mask: np.ndarray) -> None:
    assert largest_component_box(mask) == _flood_fill_box(mask)


def test_largest_component_on_many_random_masks() -> None:
    # Densities around the percolation threshold give many components of similar size,
    # where the tie rule and the corner connections decide the answer.
    rng = np.random.default_rng(0)
    for trial in range(200):
        shape = (int(rng.integers(1, 24)), int(rng.integers(1, 24)))
        mask = rng.random(shape) < rng.uniform(0.05, 0.7)
        assert largest_component_box(mask) == _flood_fill_box(mask), trial
    assert largest_component_box(np.zeros((3, 3), dtype=bool)) is None
