"""The one colour map of saliency maps, for the report's gallery and the CLI's overlays.

A map value ``v`` in [0, 1] is shown as ``matplotlib.colormaps[COLORMAP](v)``: jet, dark
blue (0) through cyan, green (0.5) and yellow to dark red (1), as in the paper's figures.
An overlay blends that colour over the image::

    overlay = (1 - alpha) * image + alpha * colorize(map)        (per pixel, RGB in [0, 1])

This module imports neither pyplot (no backend is chosen behind the caller's back, so it
works under Agg and without a display) nor torch (a tensor is read through
``numpy.asarray``), so the CLI and the report can import it cheaply.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image

from opticam.errors import short_repr

__all__ = ["COLORMAP", "colorize", "overlay"]

#: Name of the matplotlib colour map of every saliency map the project draws.
COLORMAP = "jet"


def _as_map(saliency_map: Any) -> np.ndarray:
    values = np.asarray(saliency_map, dtype=np.float64)
    if values.ndim == 3 and values.shape[0] == 1:  # a (1,H,W) map, as methods return it
        values = values[0]
    if values.ndim != 2:
        raise ValueError(f"saliency_map must be (H, W) or (1, H, W), got shape {values.shape}")
    return values


def colorize(saliency_map: Any) -> np.ndarray:
    """RGB colours of a saliency map under :data:`COLORMAP`.

    ``rgb[i, j] = colormaps[COLORMAP](clip(m[i, j], 0, 1))[:3]``: matplotlib's 256-entry
    table of the map (the colours ``imshow(m, cmap=COLORMAP, vmin=0, vmax=1)`` shows).
    NaN values get the colour map's "bad" colour, black.

    Args:
        saliency_map: (H,W) or (1,H,W) values in [0, 1] (array, list or CPU tensor);
            values outside are clipped.

    Returns:
        (H,W,3) float64 array in [0, 1].
    """
    values = np.clip(_as_map(saliency_map), 0.0, 1.0)
    return np.asarray(colormaps[COLORMAP](values))[..., :3]


def overlay(image: Any, saliency_map: Any, alpha: float = 0.5) -> Image.Image:
    """Blend a saliency map's colours over its image: ``(1 - alpha) * x + alpha * colorize(m)``.

    Args:
        image: (3,H,W) (channels first, as a model sees it) or (H,W,3) RGB in [0, 1];
            array or CPU tensor.
        saliency_map: (H,W) or (1,H,W) map in [0, 1] of the same height and width.
        alpha: weight of the colours, in [0, 1] (0: the image alone, 1: the map alone).

    Returns:
        An RGB :class:`PIL.Image.Image`, each channel ``round(255 * blend)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {short_repr(alpha)}")
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim == 3 and pixels.shape[0] == 3:  # channels first wins, as a model sees it
        pixels = pixels.transpose(1, 2, 0)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"image must be (3, H, W) or (H, W, 3) RGB, got shape {pixels.shape}")
    colours = colorize(saliency_map)
    if colours.shape[:2] != pixels.shape[:2]:
        raise ValueError(
            f"saliency_map is {colours.shape[0]}x{colours.shape[1]} but the image is "
            f"{pixels.shape[0]}x{pixels.shape[1]}: upsample the map to the image first"
        )
    blended = (1.0 - alpha) * pixels + alpha * colours
    return Image.fromarray(np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8))
