"""What every saliency method shares: the result type, up + n, and the safety contexts.

``upsample_normalize`` is the one definition of ``M = n(up(S))`` (METHOD.md section 1)
used inside the Opti-CAM optimization, for every baseline, and by anyone rebuilding a
full-resolution map from a stored low-resolution saliency map.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opticam.allocator import tune_allocator
from opticam.errors import short_repr
from opticam.names import NORMALIZATIONS

__all__ = [
    "NORMALIZATIONS",
    "Explainer",
    "Explanation",
    "Normalization",
    "check_inputs",
    "frozen",
    "no_leaked_hooks",
    "normalize_maps",
    "upsample_normalize",
]

Normalization = Literal["range", "max", "sigmoid"]  # one of opticam.names.NORMALIZATIONS

# A map whose span (max - min) is within a few float rounding steps of its magnitude
# carries no spatial information: bilinear upsampling of a constant is only constant up
# to such rounding, and dividing by that span would turn rounding noise into a map.
_CONSTANT_ULPS = 8.0


@dataclass
class Explanation:
    """Saliency maps for a batch.

    Attributes:
        maps: (B,1,H,W) in [0,1], on the images' device.
        saliency: (B,1,h,w) low-resolution map with
            ``maps == upsample_normalize(saliency, (H, W), normalization)[0]``; None when
            the method has no low-resolution form (Fake-CAM).
        diagnostics: per-image tensors, each (B,): e.g. ``iterations``,
            ``initial_objective``, ``final_objective``, ``constant_map`` (bool).
        seconds: wall time of the call for the whole batch.
        channel_weights: (B, K) the weights of the layer's K feature maps that the map
            combines, for methods that optimize them (Opti-CAM: ``softmax(u*)``, each row
            summing to 1); None for the others. What a class prior is built from.
    """

    maps: Tensor
    saliency: Tensor | None
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    channel_weights: Tensor | None = None


def normalize_maps(
    maps: Tensor, normalization: Normalization | str = "range"
) -> tuple[Tensor, Tensor]:
    """Per-image normalization ``n`` of maps (B,1,H,W) into [0,1].

    - ``range``: ``(s - min s) / (max s - min s)``; a constant map becomes all ones.
    - ``max``: ``max(s, 0) / max s``; a map with ``max s <= 0`` becomes all ones.
    - ``sigmoid``: ``1 / (1 + exp(-s))``.

    Differentiable (used inside the Opti-CAM optimization); degenerate rows never produce
    NaN, also in the backward pass.

    Returns:
        ``(normalized (B,1,H,W), constant (B,) bool)``: ``constant`` flags rows whose
        span ``max s - min s`` is zero up to float rounding.
    """
    if maps.dim() != 4:
        raise ValueError(f"maps must be (B,1,H,W), got shape {tuple(maps.shape)}")
    flat = maps.flatten(1)
    hi = flat.amax(dim=1)
    lo = flat.amin(dim=1)
    span = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    constant = span <= _CONSTANT_ULPS * torch.finfo(maps.dtype).eps * scale
    ones = torch.ones_like(maps)
    if normalization == "range":
        # The safe denominator keeps the unused branch of torch.where finite, so that
        # its (zero-weighted) gradient is not 0 * inf = NaN.
        denom = torch.where(constant, torch.ones_like(span), span).view(-1, 1, 1, 1)
        out = (maps - lo.view(-1, 1, 1, 1)) / denom
        out = torch.where(constant.view(-1, 1, 1, 1), ones, out)
    elif normalization == "max":
        positive = hi > 0
        denom = torch.where(positive, hi, torch.ones_like(hi)).view(-1, 1, 1, 1)
        out = maps.clamp(min=0) / denom
        out = torch.where(positive.view(-1, 1, 1, 1), out, ones)
    elif normalization == "sigmoid":
        out = torch.sigmoid(maps)
    else:
        raise ValueError(
            f"unknown normalization {short_repr(normalization)} (known: {', '.join(NORMALIZATIONS)})"
        )
    return out.clamp(0.0, 1.0), constant


def upsample_normalize(
    saliency: Tensor,
    size: Sequence[int],
    normalization: Normalization | str = "range",
) -> tuple[Tensor, Tensor]:
    """``M = n(up(S))``: bilinear upsampling (align_corners=False), then normalization.

    Args:
        saliency: (B,1,h,w) low-resolution maps.
        size: (H, W) of the output.
        normalization: ``range`` (default), ``max`` or ``sigmoid``; see
            :func:`normalize_maps`.

    Returns:
        ``(maps (B,1,H,W) in [0,1], constant (B,) bool)``.
    """
    if saliency.dim() != 4 or saliency.shape[1] != 1:
        raise ValueError(f"saliency must be (B,1,h,w), got shape {tuple(saliency.shape)}")
    height, width = (int(s) for s in size)
    if tuple(saliency.shape[-2:]) == (height, width):
        up = saliency
    else:
        up = F.interpolate(saliency, size=(height, width), mode="bilinear", align_corners=False)
    return normalize_maps(up, normalization)


def check_inputs(images: Tensor, targets: Tensor | Sequence[int] | None) -> Tensor | None:
    """Validate images (B,3,H,W) and return targets as a (B,) int64 tensor on their device.

    Raises:
        ValueError: wrong shapes, non-float images, or a target count that differs from B.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B,C,H,W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0,1], got dtype {images.dtype}")
    if targets is None:
        return None
    t = torch.as_tensor(targets, device=images.device)
    if t.dim() == 0:
        t = t.expand(images.shape[0])
    if t.dim() != 1 or t.shape[0] != images.shape[0] or t.is_floating_point():
        raise ValueError(
            f"targets must be {images.shape[0]} class indices (one per image), "
            f"got {tuple(t.shape)} {t.dtype}"
        )
    return t.long()


def check_target_range(targets: Tensor, num_classes: int) -> None:
    """Raise ValueError when a class index falls outside [0, num_classes)."""
    bad = (targets < 0) | (targets >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"target class {int(targets[bad][0])} out of range for a model with "
            f"{num_classes} outputs"
        )


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Freeze ``model`` for one call: parameters ``requires_grad=False``, eval mode.

    The caller's ``requires_grad`` flags and train/eval modes are restored on exit, also
    when the body raises. Frozen weights never receive ``.grad`` and autograd keeps no
    graph for them, which is what makes the per-call optimization cheap.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@contextmanager
def no_leaked_hooks(model: nn.Module) -> Iterator[None]:
    """Remove, on exit, every module hook registered on ``model`` during the block.

    A safety net around code that registers hooks itself (pytorch-grad-cam, Ablation-CAM's
    own forward hook): whatever happens inside, the model leaves with the hooks it came
    with, and no hook keeps tensors alive between calls.
    """
    before = [
        (module, {name: set(getattr(module, name, {})) for name in _HOOK_DICTS})
        for module in model.modules()
    ]
    try:
        yield
    finally:
        for module, known in before:
            for name, keys in known.items():
                hooks = getattr(module, name, None)
                if hooks is None:
                    continue
                for key in [k for k in hooks if k not in keys]:
                    del hooks[key]


class Explainer(ABC):
    """A saliency method bound to a model: ``explainer(images, targets) -> Explanation``.

    ``images`` (B,3,H,W) in [0,1] on the model's device; ``targets`` (B,) class indices,
    or None for the model's predicted classes.
    """

    #: Options a caller may pass (besides the model and the target layer).
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        # Once per process, before the first explanation allocates its buffers.
        tune_allocator()
        self.model = model

    def __call__(
        self, images: Tensor, targets: Tensor | Sequence[int] | None = None
    ) -> Explanation:
        """Explain ``images`` for ``targets``; see the class docstring."""
        t = check_inputs(images, targets)
        start = time.perf_counter()
        result = self.explain(images.detach(), t)
        if images.is_cuda:
            # Maps are produced asynchronously; the wall time must include the work.
            torch.cuda.synchronize(images.device)
        result.seconds = time.perf_counter() - start
        return result

    @abstractmethod
    def explain(self, images: Tensor, targets: Tensor | None) -> Explanation:
        """Compute the explanation; ``images`` already validated and detached."""


def predicted_classes(model: nn.Module, images: Tensor) -> Tensor:
    """Argmax class (B,) of ``model`` on ``images``, without autograd."""
    with torch.no_grad():
        return model(images).argmax(dim=1)
