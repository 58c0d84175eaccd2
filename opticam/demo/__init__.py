"""Synthetic demo data and a small bundled classifier, so the project runs end to end offline.

- :func:`generate_sample` / :func:`make_shards`: a deterministic shapes dataset
  (10 classes, 128x128 RGB, one object per image on a cluttered background) with a
  ground-truth box and mask per image, written as WebDataset shards.
- :func:`load_model`: the bundled CNN trained on it (``python -m opticam.demo.train``),
  with its CAM target layer ``DEMO_TARGET_LAYER`` and input size ``DEMO_INPUT_SIZE``.

Names are imported on first use, so ``opticam.demo.cache`` (what the command line reads
to parse its flags) loads neither torch nor Pillow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opticam.lazy import lazy_attributes

if TYPE_CHECKING:
    from opticam.demo.generate import CLASS_NAMES, NUM_CLASSES, generate_sample, make_shards
    from opticam.demo.model import DEMO_INPUT_SIZE, DEMO_TARGET_LAYER, load_model

__all__ = [
    "CLASS_NAMES",
    "DEMO_INPUT_SIZE",
    "DEMO_TARGET_LAYER",
    "NUM_CLASSES",
    "generate_sample",
    "load_model",
    "make_shards",
]

_LAZY = {
    "CLASS_NAMES": "opticam.demo.generate",
    "NUM_CLASSES": "opticam.demo.generate",
    "generate_sample": "opticam.demo.generate",
    "make_shards": "opticam.demo.generate",
    "DEMO_INPUT_SIZE": "opticam.demo.model",
    "DEMO_TARGET_LAYER": "opticam.demo.model",
    "load_model": "opticam.demo.model",
}


__getattr__ = lazy_attributes(__name__, _LAZY)
