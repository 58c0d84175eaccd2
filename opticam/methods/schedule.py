"""Opti-CAM's schedule: the learning rate over the steps and when an image stops.

The paper's loop runs a fixed number of Adam steps at one learning rate and stops an image
once its objective changes by less than a tolerance. The options that spend fewer passes
(``lr_decay``, the plateau rule ``patience`` / ``plateau_rtol`` / ``plateau_atol``) live
here, so that :class:`opticam.methods.OptiCAM` reads like the paper's loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Schedule", "StopRule"]


@dataclass(frozen=True)
class Schedule:
    """How Opti-CAM's optimization runs (options of :class:`opticam.config.OptiCAMOptions`).

    Attributes:
        iterations: Adam steps per image.
        lr: learning rate at step 0.
        tolerance: an image stops once its objective changes by less than this.
        lr_decay: ``none`` (constant), ``cosine`` or ``linear`` decay to 0 over the steps.
        patience: stop an image once its best objective has not improved by more than
            ``max(plateau_atol, plateau_rtol * |best|)`` for this many steps (0: never).
        plateau_rtol: relative improvement that resets the patience count.
        plateau_atol: absolute improvement that resets the patience count.
    """

    iterations: int
    lr: float
    tolerance: float
    lr_decay: str = "none"
    patience: int = 0
    plateau_rtol: float = 0.0
    plateau_atol: float = 0.0

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): ``lr`` times the decay factor."""
        if self.lr_decay == "cosine":
            return self.lr * (0.5 * (1.0 + math.cos(math.pi * step / self.iterations)))
        if self.lr_decay == "linear":
            return self.lr * (1.0 - step / self.iterations)
        return self.lr * 1.0

    def stop_rule(self, batch: int, device: torch.device) -> StopRule:
        """The per-image stop state of one batch."""
        return StopRule(self, batch, device)


class StopRule:
    """Which images of a batch are done, step by step (the paper's rule and the plateau).

    Args:
        schedule: the tolerance and plateau settings.
        batch: images in the batch.
        device: where the objectives live.
    """

    def __init__(self, schedule: Schedule, batch: int, device: torch.device) -> None:
        self.schedule = schedule
        self.previous = torch.zeros(batch, device=device)
        # Plateau rule: the best value at the last improvement that counted, and the
        # number of steps since then.
        self.anchor = torch.full((batch,), -torch.inf, device=device)
        self.stale = torch.zeros(batch, dtype=torch.long, device=device)

    def update(self, step: int, value: Tensor, rows: Tensor) -> Tensor | None:
        """Record the objectives ``value`` of images ``rows`` at ``step``.

        Returns:
            A mask over ``rows`` of the images done, or None at step 0 (nothing to
            compare with yet).
        """
        done: Tensor | None = None
        if step > 0:
            # The paper's stopping rule, per image.
            done = (value - self.previous[rows]).abs() < self.schedule.tolerance
            if self.schedule.patience > 0:
                done |= self._plateau(value, rows)
        elif self.schedule.patience > 0:
            self._plateau(value, rows)
        self.previous[rows] = value
        return done

    def _plateau(self, value: Tensor, rows: Tensor) -> Tensor:
        """Update the plateau rule for ``rows`` with their ``value``; which rows are done.

        An improvement counts when it beats the anchor (the best value at the last
        improvement that counted) by more than ``max(plateau_atol, plateau_rtol * |anchor|)``.
        """
        base = self.anchor[rows]
        margin = torch.clamp(
            self.schedule.plateau_rtol * base.abs(), min=self.schedule.plateau_atol
        )
        # The first value always counts (base = -inf; inf * 0 would be NaN).
        counted = torch.isinf(base) | (value > base + torch.nan_to_num(margin, posinf=0.0))
        self.anchor[rows[counted]] = value[counted]
        stale = self.stale[rows]
        self.stale[rows] = torch.where(counted, torch.zeros_like(stale), stale + 1)
        return self.stale[rows] >= self.schedule.patience
