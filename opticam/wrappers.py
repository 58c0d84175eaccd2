"""The modules that wrap a classifier for the saliency methods.

They live in one place so that the layer lookup (:mod:`opticam.layers`), the model
loader (:mod:`opticam.models`) and the zoos (:mod:`opticam.zoo`) can all see through
them without importing each other.

- :class:`Normalized`: normalization inside the model, so that a masked image ``x * M``
  is black where ``M = 0``;
- :class:`HFClassifier`: a transformers classifier as a plain ``forward(x) -> logits``.

Both hold the wrapped module as ``.model``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["HFClassifier", "Normalized"]


class Normalized(nn.Module):
    """Wraps a classifier trained on normalized inputs so that it takes [0,1] images.

    ``forward(x) = model((x - mean) / std)`` with x (B,3,H,W) in [0,1]; mean and std are
    (1,3,1,1) buffers, so they follow ``.to(device)``.

    Args:
        model: the classifier that expects normalized inputs.
        mean: per-channel mean (3 values).
        std: per-channel standard deviation (3 values).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Images (B,3,H,W) in [0,1] -> logits of the wrapped model."""
        return self.model((x - self.mean) / self.std)


class HFClassifier(nn.Module):
    """A transformers image classifier as a plain module: ``forward(x) = model(x).logits``.

    Args:
        model: e.g. ``ViTForImageClassification``; ``x`` is its ``pixel_values``
            (B,3,H,W), normalized as its image processor does.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """Normalized images (B,3,H,W) -> logits (B, num_labels)."""
        return self.model(pixel_values=x).logits  # type: ignore[no-any-return]
