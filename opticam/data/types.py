"""Records passed between the data layer and the rest of opticam.

A shard yields :class:`Sample` records (decoded, original size); anything that
could not be turned into a sample becomes an :class:`ErrorRecord` instead, so a
bad image costs one row in the error table and never the whole shard.
:class:`Batch` is what the explain step consumes: preprocessed tensors of one
shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

__all__ = [
    "Batch",
    "Box",
    "ErrorRecord",
    "Sample",
]

Box = tuple[float, float, float, float]
"""One box ``(x0, y0, x1, y1)`` in pixel-edge coordinates: a box covering pixel
columns ``0..9`` has ``x0 = 0`` and ``x1 = 10``."""


@dataclass
class Sample:
    """One decoded record of a shard.

    Attributes:
        key: the sample's ``__key__`` (member path up to the first dot of its basename).
        shard: URL of the shard the sample came from.
        image: RGB 8-bit PIL image at its original size (``W x H``).
        label: class index from ``.cls`` or ``.json["label"]``; ``None`` when unknown.
        boxes: boxes ``(x0, y0, x1, y1)`` in original-image pixels; ``[]`` when none.
    """

    key: str
    shard: str
    image: Image.Image
    label: int | None
    boxes: list[Box] = field(default_factory=list)


@dataclass
class ErrorRecord:
    """Why one sample (or a whole shard, ``key=None``) was not processed.

    Attributes:
        shard: URL of the shard.
        key: sample key, or ``None`` for a shard-level problem.
        stage: what failed, one of :data:`opticam.names.ERROR_STAGES` (``"open"``,
            ``"tar"``, ``"decode"``, ``"label"``, ``"boxes"``, ``"key"``,
            ``"unsafe-member"``, ``"preprocess"``, ``"explain"``, ...).
        message: human-readable cause, naming the offending member or value.
    """

    shard: str
    key: str | None
    stage: str
    message: str


@dataclass
class Batch:
    """Preprocessed samples of one shard, ready for a model.

    Attributes:
        shard: URL of the shard all samples come from (a batch never mixes shards).
        keys: ``B`` sample keys, in shard order.
        images: ``(B, 3, H, W)`` float32 in ``[0, 1]`` (no normalization).
        labels: ``(B,)`` int64 class indices, ``-1`` where unknown.
        boxes: ``B`` float32 tensors of shape ``(n_i, 4)``, ``x0, y0, x1, y1`` in input
            (model) pixels after the same resize and crop as the image.
    """

    shard: str
    keys: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    boxes: list[torch.Tensor]

    def __len__(self) -> int:
        """The number of samples ``B``."""
        return len(self.keys)
