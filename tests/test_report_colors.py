"""Tests of opticam.report.colors: the one colour map, its colours and the overlay blend."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from opticam.report.colors import COLORMAP, colorize, overlay


def test_the_colour_map_is_jet() -> None:
    # The paper's figures and every earlier report drew maps in jet: low dark blue,
    # middle green, high dark red (matplotlib's 256-entry table).
    assert COLORMAP == "jet"
    colours = colorize(np.array([[0.0, 0.5, 1.0]]))
    np.testing.assert_allclose(colours[0, 0], [0.0, 0.0, 0.5])
    np.testing.assert_allclose(colours[0, 2], [0.5, 0.0, 0.0])
    assert colours[0, 1, 1] == 1.0 and colours[0, 1, 0] < 0.5 and colours[0, 1, 2] < 0.5


def test_colorize_is_what_imshow_shows() -> None:
    # imshow(m, cmap=COLORMAP, vmin=0, vmax=1), as the gallery drew maps before, colours
    # each value through the same normalisation and table; out-of-range values take the
    # end colours.
    rng = np.random.default_rng(0)
    saliency = rng.uniform(-0.2, 1.2, size=(7, 5))
    expected = ScalarMappable(Normalize(0.0, 1.0), colormaps[COLORMAP]).to_rgba(saliency)
    colours = colorize(saliency)
    assert colours.shape == (7, 5, 3) and colours.dtype == np.float64
    np.testing.assert_allclose(colours, expected[..., :3])
    np.testing.assert_array_equal(colorize(saliency[None]), colours)  # (1,H,W) as well
    np.testing.assert_array_equal(colorize(torch.from_numpy(saliency)), colours)


def test_overlay_blends_map_colours_over_the_image() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((3, 4, 6))  # channels first
    saliency = rng.random((4, 6))
    hwc = image.transpose(1, 2, 0)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        expected = np.rint(255 * ((1 - alpha) * hwc + alpha * colorize(saliency)))
        picture = overlay(image, saliency, alpha=alpha)
        assert picture.mode == "RGB" and picture.size == (6, 4)  # PIL sizes are (W, H)
        np.testing.assert_array_equal(np.asarray(picture), expected.astype(np.uint8))
    # Channels last, a tensor, and the default alpha of one half give the same picture.
    half = np.asarray(overlay(image, saliency))
    np.testing.assert_array_equal(np.asarray(overlay(hwc, saliency, 0.5)), half)
    np.testing.assert_array_equal(
        np.asarray(overlay(torch.from_numpy(image).float(), torch.from_numpy(saliency))),
        np.asarray(overlay(image.astype(np.float32), saliency.astype(np.float32))),
    )


def test_overlay_colours_of_a_black_image() -> None:
    image = np.zeros((3, 2, 2), dtype=np.float32)
    saliency = np.array([[0.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    out = np.asarray(overlay(image, saliency, alpha=1.0))
    assert tuple(out[0, 0]) == (0, 0, 128)  # low: dark blue
    assert tuple(out[0, 1]) == (128, 0, 0)  # high: dark red
    assert out[1, 0, 1] == 255  # middle: green
    assert tuple(np.asarray(overlay(image, saliency))[0, 1]) == (64, 0, 0)


def test_bad_inputs_name_the_offending_value() -> None:
    image = np.zeros((3, 4, 4))
    with pytest.raises(ValueError, match=r"saliency_map is 2x2 but the image is 4x4"):
        overlay(image, np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        overlay(image, np.zeros((4, 4)), alpha=1.5)
    with pytest.raises(ValueError, match=r"image must be \(3, H, W\) or \(H, W, 3\).*\(4, 4\)"):
        overlay(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"saliency_map must be \(H, W\).*\(2, 4, 4\)"):
        colorize(np.zeros((2, 4, 4)))


@pytest.mark.e2e
def test_importing_colors_imports_neither_torch_nor_pyplot() -> None:
    # The CLI imports it for `opticam explain`; the report draws with the Agg renderer.
    code = (
        "import sys; from opticam.report.colors import overlay; "
        "print(sorted(m for m in ('torch', 'matplotlib.pyplot', 'pyarrow') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
