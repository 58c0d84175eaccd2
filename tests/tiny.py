"""A tiny CNN shared by the method tests: cheap enough to optimise many times per test."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyNet(nn.Module):
    """Two convs at 32x32 -> features A (B,8,16,16) -> GAP -> linear, ``classes`` logits.

    Weights are drawn from N(0, 0.5^2) with a generator seeded by ``seed``, so every test
    gets the same network for the same seed.
    """

    def __init__(self, seed: int = 0, classes: int = 5) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
