"""Step 1 of a batch: which images are explained, for which class, with clean scores.

``target="label"`` explains the ground-truth class (the paper's tables): an image without
a usable label becomes an error row (stage ``"label"``) instead. ``target="predicted"``
explains the argmax of the clean logits. Either way the clean probabilities are computed
once per batch and shared by every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opticam.data import Batch, ErrorRecord
from opticam.names import STAGE_LABEL, STAGE_NONFINITE

__all__ = ["BatchTargets", "choose_targets", "label_problem"]


@dataclass
class BatchTargets:
    """The images of one batch that are explained, on the device.

    Attributes:
        keys: sample keys of the kept images.
        images: (B,3,H,W) in [0,1] on the device.
        labels: ground truth per image, None where unknown.
        predicted: (B,) long, argmax of the clean logits.
        targets: (B,) long, the class explained.
        p_clean: (B,) float, softmax probability of the target on the clean image.
        boxes: B tensors (n_i, 4) in input pixels, on the device.
    """

    keys: list[str]
    images: torch.Tensor
    labels: list[int | None]
    predicted: torch.Tensor
    targets: torch.Tensor
    p_clean: torch.Tensor
    boxes: list[torch.Tensor]

    @property
    def has_boxes(self) -> bool:
        """Whether any image of the batch has a box (localization is computed then)."""
        return any(b.numel() > 0 for b in self.boxes)


def label_problem(label: int, num_classes: int) -> str | None:
    """Why a ground-truth label cannot be explained (None when it can)."""
    if label < 0:
        return "no label (target='label' needs one; target='predicted' does not)"
    if label >= num_classes:
        return f"label {label} outside the model's {num_classes} classes (0..{num_classes - 1})"
    return None


def _labelled(
    batch: Batch, shard_url: str, labels: list[int], num_classes: int, errors: list[ErrorRecord]
) -> list[int]:
    """The indices of the images whose label can be explained; an error record for others."""
    keep = []
    for i, value in enumerate(labels):
        problem = label_problem(value, num_classes)
        if problem is None:
            keep.append(i)
        else:
            errors.append(ErrorRecord(shard_url, batch.keys[i], STAGE_LABEL, problem))
    return keep


def choose_targets(
    batch: Batch,
    shard_url: str,
    model: torch.nn.Module,
    num_classes: int,
    target: str,
    device: str,
    errors: list[ErrorRecord],
) -> BatchTargets | None:
    """The explained images of ``batch`` and their targets; None when none is left.

    Args:
        batch: a preprocessed batch (on the CPU, possibly pinned).
        shard_url: the input shard's URL, as the error records name it.
        model: the classifier (images in [0,1]).
        num_classes: its number of logits.
        target: ``"label"`` or ``"predicted"`` (:attr:`opticam.config.RunConfig.target`).
        device: where the model lives.
        errors: error records of images that cannot be explained are appended here.
    """
    labels = [int(v) for v in batch.labels.tolist()]
    keep = list(range(len(batch.keys)))
    if target == "label":
        keep = _labelled(batch, shard_url, labels, num_classes, errors)
        if not keep:
            return None
    cpu_images = batch.images
    if len(keep) < len(batch.keys):
        cpu_images = cpu_images.index_select(0, torch.tensor(keep, dtype=torch.long))
    # Pinned batches (CUDA) copy asynchronously while the host goes on.
    images = cpu_images.to(device, non_blocking=True)
    with torch.no_grad():
        logits = model(images).float()
    finite = torch.isfinite(logits).all(dim=1).tolist()
    if not all(finite):
        # NaN or inf logits make every score of that image meaningless: an error row,
        # never a row whose metrics are computed from them.
        for i, ok in zip(keep, finite, strict=True):
            if not ok:
                errors.append(
                    ErrorRecord(
                        shard_url,
                        batch.keys[i],
                        STAGE_NONFINITE,
                        "the model returned non-finite logits (NaN or inf) for this image",
                    )
                )
        rows = [j for j, ok in enumerate(finite) if ok]
        if not rows:
            return None
        index = torch.tensor(rows, dtype=torch.long, device=images.device)
        images, logits = images.index_select(0, index), logits.index_select(0, index)
        keep = [keep[j] for j in rows]
    probs = torch.softmax(logits, dim=1)
    predicted = probs.argmax(dim=1)
    if target == "label":
        targets = torch.tensor([labels[i] for i in keep], device=device)
    else:
        targets = predicted
    return BatchTargets(
        keys=[batch.keys[i] for i in keep],
        images=images,
        labels=[labels[i] if labels[i] >= 0 else None for i in keep],
        predicted=predicted,
        targets=targets,
        p_clean=probs.gather(1, targets.view(-1, 1)).squeeze(1),
        boxes=[batch.boxes[i].to(device) for i in keep],
    )
