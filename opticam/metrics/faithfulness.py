"""Faithfulness metrics: Average Drop / Gain / Increase, insertion and deletion.

Everything here runs in torch on the images' device, batched: the model sees
whole batches (or chunks bounded by ``batch_size``), and nothing is copied to
the CPU per image. Probabilities are the softmax of the model's logits computed
in float64 whatever the model's dtype (float32 on devices without float64, such
as Apple's MPS): in float32 a confident ``p = 1 - 1e-8`` rounds to 1 and
``1 - p``, the denominator of the gain, is lost.

Average Drop / Gain / Increase (Opti-CAM paper, section 2 of METHOD.md): with
``p_i`` the probability of class ``c_i`` on the clean image and ``o_i`` the same on
the masked image ``x_i * M_i``::

    drop_i     = max(0, p_i - o_i) / p_i          (0 where p_i == 0)
    gain_i     = max(0, o_i - p_i) / (1 - p_i)    (0 where p_i == 1)
    increase_i = [p_i < o_i]
    AD = 100/N sum_i drop_i,  AG = 100/N sum_i gain_i,  AI = 100/N sum_i increase_i

Insertion and deletion (RISE protocol, as used by the paper): pixels are visited in
decreasing saliency order, ``n = ceil(H*W / steps)`` pixels per step. Deletion starts
from the image and sets visited pixels (all channels) to ``deletion_baseline``;
insertion starts from a Gaussian-blurred copy and restores visited pixels to the
original. After step ``k`` (``k = 0..steps``) the first ``min(k*n, H*W)`` pixels of the
order have been changed; the curve is the class probability at each of the
``steps + 1`` states and the score is its normalised trapezoidal area::

    AUC = (sum_k curve[k] - (curve[0] + curve[steps]) / 2) / steps     in [0, 1]

i.e. the trapezoid rule over an x axis of ``steps`` equal intervals rescaled to [0, 1]
(the same formula as the reference RISE code). Higher insertion and lower deletion
are better.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

from opticam.errors import short_repr

__all__ = [
    "DEFAULT_STEPS",
    "DEFAULT_BLUR_KERNEL",
    "DEFAULT_BLUR_SIGMA",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CPU_BATCH_SIZE",
    "MAP_TOLERANCE",
    "class_probabilities",
    "faithfulness_terms",
    "average_drop",
    "average_gain",
    "average_increase",
    "gaussian_blur",
    "saliency_ranks",
    "curve_auc",
    "insertion_deletion",
]

#: The paper's protocol: 224 steps (of 224 pixels each at 224x224).
DEFAULT_STEPS = 224
#: Blur of the insertion start image, as in the reference RISE implementation.
DEFAULT_BLUR_KERNEL = 11
DEFAULT_BLUR_SIGMA = 5.0
#: How far outside [0, 1] a map value may stray by rounding before it is an error.
MAP_TOLERANCE = 1e-5
#: Perturbed images per forward pass in :func:`insertion_deletion` on a GPU (bounds memory).
DEFAULT_BATCH_SIZE = 128
#: The same on the CPU, where small chunks stay in cache: at 224 px, chunks of 16 ran
#: 1.5x (ResNet-50) to 1.7x (EfficientNet-B0) faster than 128 with half the memory
#: (benchmarks/metric_chunks.py).
DEFAULT_CPU_BATCH_SIZE = 16

Model = nn.Module | Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------
# Input checks and model helpers
# ---------------------------------------------------------------------------


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B,C,H,W) tensor, got {shape}")


def _check_maps(maps: Tensor, images: Tensor) -> None:
    b, _, h, w = images.shape
    if not isinstance(maps, Tensor) or tuple(maps.shape) != (b, 1, h, w):
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(
            f"maps must have shape (B,1,H,W) = {(b, 1, h, w)} matching the images, got {shape}; "
            "upsample low-resolution saliency first (opticam.methods.upsample_normalize)"
        )


def _check_targets(targets: Tensor, batch: int, name: str = "targets") -> Tensor:
    if not isinstance(targets, Tensor) or targets.dim() != 1 or targets.shape[0] != batch:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"{name} must be a ({batch},) integer tensor, got {shape}")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"{name} must hold integer class indices, got dtype {targets.dtype}")
    return targets.long()


def _check_batch_size(batch_size: object) -> None:
    if batch_size is None:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive integer or None, got {short_repr(batch_size)}"
        )


def _probability_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


@contextmanager
def _evaluating(model: Model) -> Iterator[None]:
    """Run ``model`` in eval mode without gradients, restoring its train flags afterwards.

    Metrics must not depend on dropout or update batch-norm statistics, but a caller's
    model object is not ours to leave changed, so every module's flag is put back (also
    when the forward raises).
    """
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.training = flag


def _probabilities(model: Model, images: Tensor, targets: Tensor) -> Tensor:
    """Softmax probability of ``targets`` (B,) for ``images`` (B,C,H,W); one forward."""
    logits = model(images)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != images.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model must return (B, num_classes) logits, got {shape}")
    probs = torch.softmax(logits.to(_probability_dtype(logits.device)), dim=1)
    return probs.gather(1, targets.to(probs.device).view(-1, 1)).squeeze(1)


def _chunked_probabilities(
    model: Model, images: Tensor, targets: Tensor, batch_size: int | None
) -> Tensor:
    if batch_size is None or images.shape[0] <= batch_size:
        return _probabilities(model, images, targets)
    parts = [
        _probabilities(model, images[i : i + batch_size], targets[i : i + batch_size])
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(parts)


# ---------------------------------------------------------------------------
# Average Drop / Gain / Increase
# ---------------------------------------------------------------------------


def class_probabilities(
    model: Model, images: Tensor, targets: Tensor, *, batch_size: int | None = None
) -> Tensor:
    """Softmax probability of each image's target class.

    Args:
        model: classifier taking ``images`` and returning (B, num_classes) logits. Run in
            eval mode under ``torch.no_grad``; its train/eval flags are restored after.
        images: (B,C,H,W) images in the model's input space ([0,1] pixels here).
        targets: (B,) integer class per image.
        batch_size: images per forward pass; ``None`` runs the whole batch at once.

    Returns:
        (B,) float64 tensor ``softmax(model(images))[i, targets[i]]`` on the model's
        output device (float32 where the device has no float64).
    """
    _check_images(images)
    targets = _check_targets(targets, images.shape[0])
    _check_batch_size(batch_size)
    with _evaluating(model):
        return _chunked_probabilities(model, images, targets, batch_size)


def faithfulness_terms(
    model: Model,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    p_clean: Tensor | None = None,
    batch_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-image terms of Average Drop, Average Gain and Average Increase.

    The masked image is ``images * maps`` (pixel space, so masked pixels are black).

    Args:
        model: classifier returning (B, num_classes) logits (see :func:`class_probabilities`).
        images: (B,C,H,W) images in [0,1].
        maps: (B,1,H,W) saliency maps at full input resolution, values in [0,1].
        targets: (B,) integer class explained for each image.
        p_clean: optional (B,) probabilities of ``targets`` on the clean images, when the
            caller already has them (saves one forward pass).
        batch_size: images per forward pass; ``None`` runs the whole batch at once.

    Returns:
        Dict of (B,) float64 tensors on the device (float32 where the device has no
        float64), all fractions:
        ``p_clean`` (p), ``p_masked`` (o), ``drop = max(0, p - o) / p`` (0 where p == 0),
        ``gain = max(0, o - p) / (1 - p)`` (0 where p == 1), ``increase = [p < o]``.
        ``drop`` and ``gain`` lie in [0, 1] and are never inf or NaN.

    Raises:
        ValueError: on shapes that do not match, or maps outside [0, 1] by more than
            ``MAP_TOLERANCE`` (smaller rounding overshoots are clamped).
    """
    _check_images(images)
    _check_maps(maps, images)
    targets = _check_targets(targets, images.shape[0])
    _check_batch_size(batch_size)
    # One device sync per call (not per image): a map outside [0,1] would silently
    # amplify pixels and make every term meaningless. Rounding overshoots up to
    # MAP_TOLERANCE (e.g. from interpolation) are clamped instead of rejected.
    outside = (maps < -MAP_TOLERANCE) | (maps > 1 + MAP_TOLERANCE) | maps.isnan()
    if maps.numel() and bool(outside.any()):
        lo, hi = float(maps.min()), float(maps.max())
        raise ValueError(f"maps must lie in [0, 1], got values in [{lo}, {hi}]")

    masked = images * maps.clamp(0, 1).to(images.dtype)
    with _evaluating(model):
        if p_clean is None:
            p = _chunked_probabilities(model, images, targets, batch_size)
        else:
            if not isinstance(p_clean, Tensor) or tuple(p_clean.shape) != (images.shape[0],):
                shape = tuple(p_clean.shape) if isinstance(p_clean, Tensor) else p_clean
                raise ValueError(f"p_clean must be a ({images.shape[0]},) tensor, got {shape}")
            p = p_clean.to(_probability_dtype(p_clean.device))
        o = _chunked_probabilities(model, masked, targets, batch_size).to(p.device)

    return {"p_clean": p, "p_masked": o, **_per_image_terms(p, o)}


def _per_image_terms(p: Tensor, o: Tensor) -> dict[str, Tensor]:
    """``drop``, ``gain`` and ``increase`` per image from probabilities p (clean), o (masked)."""
    # max(0, p-o) is 0 whenever p == 0 (o >= 0) and max(0, o-p) is 0 whenever p == 1
    # (o <= 1), so swapping a zero denominator for 1 gives exactly the guarded value.
    one = torch.ones_like(p)
    drop = torch.clamp(p - o, min=0) / torch.where(p > 0, p, one)
    gain = torch.clamp(o - p, min=0) / torch.where(p < 1, 1 - p, one)
    increase = (p < o).to(p.dtype)
    return {"drop": drop, "gain": gain, "increase": increase}


def _as_float64(values: Tensor | np.ndarray | float | list[float], name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        array = values.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(values, dtype=np.float64)
    array = array.reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty: an average needs at least one image")
    return array


def _mean_term(p_clean: object, p_masked: object, term: str) -> float:
    """100 * the mean of one per-image term, in float64 on the CPU."""
    p = _as_float64(p_clean, "p_clean")  # type: ignore[arg-type]
    o = _as_float64(p_masked, "p_masked")  # type: ignore[arg-type]
    if p.shape != o.shape:
        raise ValueError(f"p_clean and p_masked differ in length: {p.size} vs {o.size}")
    values = _per_image_terms(torch.from_numpy(p), torch.from_numpy(o))[term]
    return float(100.0 * values.mean())


def average_drop(p_clean: Tensor | np.ndarray, p_masked: Tensor | np.ndarray) -> float:
    """Average Drop in percent, ``AD = 100/N sum_i max(0, p_i - o_i) / p_i``; lower is better.

    Args:
        p_clean: (N,) probabilities ``p_i`` of the explained class on the clean images.
        p_masked: (N,) probabilities ``o_i`` on the masked images.

    Terms with ``p_i == 0`` count as 0.
    """
    return _mean_term(p_clean, p_masked, "drop")


def average_gain(p_clean: Tensor | np.ndarray, p_masked: Tensor | np.ndarray) -> float:
    """Average Gain in percent, ``AG = 100/N sum_i max(0, o_i - p_i) / (1 - p_i)``; higher is better.

    Args:
        p_clean: (N,) probabilities ``p_i`` of the explained class on the clean images.
        p_masked: (N,) probabilities ``o_i`` on the masked images.

    Terms with ``p_i == 1`` count as 0.
    """
    return _mean_term(p_clean, p_masked, "gain")


def average_increase(p_clean: Tensor | np.ndarray, p_masked: Tensor | np.ndarray) -> float:
    """Average Increase in percent, ``AI = 100/N sum_i [p_i < o_i]``; higher is better.

    Args:
        p_clean: (N,) probabilities ``p_i`` of the explained class on the clean images.
        p_masked: (N,) probabilities ``o_i`` on the masked images.
    """
    return _mean_term(p_clean, p_masked, "increase")


# ---------------------------------------------------------------------------
# Insertion and deletion
# ---------------------------------------------------------------------------


def gaussian_blur(images: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Blur each channel with a normalised ``kernel_size`` x ``kernel_size`` Gaussian.

    ``torchvision.transforms.v2.functional.gaussian_blur(images, [k, k], [sigma, sigma])``:
    the 1-D kernel is ``g(t) = exp(-t^2 / (2 sigma^2))`` at ``t = -(k-1)/2 .. (k-1)/2``,
    divided by its sum, the 2-D kernel is ``g(i) g(j)``, and the borders are reflected
    (``dcb|abcd|cba``). The RISE code pads with zeros instead, which darkens the borders
    of the insertion start image. This wrapper only checks the arguments, so that a bad
    ``blur_kernel`` or ``blur_sigma`` is reported in this project's words.

    Args:
        images: (B,C,H,W) float images; H and W must exceed ``kernel_size // 2``.
        kernel_size: odd positive size; 1 leaves the values unchanged.
        sigma: positive standard deviation in pixels.

    Returns:
        (B,C,H,W) blurred images, same dtype and device.
    """
    if isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"blur kernel size must be an odd positive integer, got {short_repr(kernel_size)}"
        )
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {short_repr(sigma)}")
    pad = kernel_size // 2
    _, _, h, w = images.shape
    if pad >= h or pad >= w:
        raise ValueError(
            f"blur kernel {kernel_size} needs images larger than {pad} pixels per side for "
            f"reflect padding, got {h}x{w}; use a kernel size of at most {2 * min(h, w) - 1}"
        )
    return TF.gaussian_blur(images, [kernel_size, kernel_size], [float(sigma), float(sigma)])


def saliency_ranks(maps: Tensor) -> Tensor:
    """Rank of every pixel in decreasing saliency order.

    Ties are broken by raster order (row-major; the smaller flat index ``i*W + j`` comes
    first), so the order is deterministic and the same on every device.

    Args:
        maps: (B,1,H,W) saliency maps.

    Returns:
        (B, H*W) int64 tensor; ``ranks[b, i*W + j] = r`` means pixel (i, j) is the
        ``r``-th most salient of image ``b`` (0 = most salient).
    """
    flat = maps.reshape(maps.shape[0], -1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks


def curve_auc(curves: Tensor) -> Tensor:
    """Normalised trapezoidal area under curves sampled at equally spaced steps.

    ``AUC = (sum_k c[k] - (c[0] + c[S]) / 2) / S`` for a curve ``c[0..S]``, i.e. the
    trapezoid rule with the x axis ``k / S`` in [0, 1]. A curve in [0, 1] has AUC in [0, 1].

    Args:
        curves: (..., S+1) curves with ``S >= 1``.

    Returns:
        (...,) areas, float.
    """
    if curves.shape[-1] < 2:
        raise ValueError(f"a curve needs at least 2 points, got {curves.shape[-1]}")
    steps = curves.shape[-1] - 1
    return (curves.sum(-1) - (curves[..., 0] + curves[..., -1]) / 2) / steps


def _perturbation_curves(
    model: Model,
    start: Tensor,
    finish: Tensor,
    ranks: Tensor,
    classes: Tensor,
    steps: int,
    pixels_per_step: int,
    batch_size: int,
) -> Tensor:
    """Probabilities along the path from ``start`` to ``finish`` (B,steps+1), chunked.

    ``start`` is (B,C,H,W); ``finish`` is (B,C,H,W) or broadcastable with leading size 1.

    State ``k`` of image ``b`` takes ``finish`` at pixels ranked below ``k * n`` and
    ``start`` elsewhere. All (image, step) pairs are flattened into one list and cut into
    chunks of ``batch_size`` states, so a forward pass mixes steps and images freely.
    """
    b, c, h, w = start.shape
    n_states = steps + 1
    total = b * n_states
    curves = torch.empty(total, dtype=_probability_dtype(start.device), device=start.device)
    device = start.device
    for first in range(0, total, batch_size):
        index = torch.arange(first, min(first + batch_size, total), device=device)
        image = index // n_states
        changed = (index % n_states) * pixels_per_step  # > H*W at the end is harmless
        mask = (ranks[image] < changed.unsqueeze(1)).view(-1, 1, h, w)
        target = finish[image] if finish.shape[0] != 1 else finish
        states = torch.where(mask, target, start[image])
        probs = _probabilities(model, states, classes[image])
        curves[first : first + index.shape[0]] = probs.to(device)
    return curves.view(b, n_states)


def _check_curve_options(steps: int, modes: tuple[str, ...]) -> None:
    """Refuse a number of steps that is not a positive integer, and unknown modes."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {short_repr(steps)}")
    unknown = [m for m in modes if m not in ("insertion", "deletion")]
    if unknown or not modes:
        raise ValueError(f"unknown modes {unknown or modes!r} (known: insertion, deletion)")


def _deletion_end(deletion_baseline: float | Tensor, images: Tensor) -> Tensor:
    """The deletion curve's last state: the baseline as a 4-d tensor that broadcasts to ``images``.

    Raises:
        ValueError: a baseline that does not broadcast to the images' shape.
    """
    baseline = torch.as_tensor(deletion_baseline, dtype=images.dtype, device=images.device)
    try:
        fits = torch.broadcast_shapes(baseline.shape, images.shape) == images.shape
    except RuntimeError:
        fits = False
    if not fits or baseline.dim() > 4:
        raise ValueError(
            f"deletion_baseline of shape {tuple(baseline.shape)} does not broadcast to "
            f"the images' shape {tuple(images.shape)}"
        )
    # Kept un-expanded: a shared baseline (leading size 1) is never copied per state.
    return baseline.reshape((1,) * (4 - baseline.dim()) + baseline.shape)


def insertion_deletion(
    model: Model,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    blur_kernel: int = DEFAULT_BLUR_KERNEL,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    deletion_baseline: float | Tensor = 0.0,
    batch_size: int | None | Literal["auto"] = "auto",
    modes: tuple[str, ...] = ("insertion", "deletion"),
) -> dict[str, Tensor]:
    """Insertion and deletion curves and their areas (RISE protocol, as in the paper).

    Pixels are visited in decreasing order of ``maps`` (ties in raster order, see
    :func:`saliency_ranks`), ``n = ceil(H*W / steps)`` pixels per step; state ``k``
    (``k = 0..steps``) has the first ``min(k*n, H*W)`` visited pixels changed in all
    channels.

    - deletion: from ``images`` towards ``deletion_baseline`` (black by default);
    - insertion: from ``gaussian_blur(images, blur_kernel, blur_sigma)`` towards ``images``.

    ``curve[b, k]`` is the softmax probability of ``classes[b]`` in state ``k``; the AUC is
    :func:`curve_auc`, ``(sum_k curve[k] - (curve[0] + curve[steps]) / 2) / steps``.

    Args:
        model: classifier returning (B, num_classes) logits; run in eval mode, no grad.
        images: (B,C,H,W) images in [0,1].
        maps: (B,1,H,W) saliency maps at full input resolution (only their order matters).
        classes: (B,) class scored per image; the paper's protocol uses the predicted class.
        steps: number of steps ``S`` (224 in the paper, 224 pixels each at 224x224).
        blur_kernel: odd Gaussian kernel size for the insertion start (1 = no blur).
        blur_sigma: Gaussian standard deviation in pixels.
        deletion_baseline: value of deleted pixels, a float or a tensor broadcastable to
            (B,C,H,W) (e.g. a per-channel mean of shape (C,1,1)).
        batch_size: perturbed images per forward pass (bounds memory: about
            ``batch_size * C*H*W`` floats per state tensor); ``None`` runs all
            ``B * (steps+1)`` states of a curve in one pass; ``"auto"``
            :data:`DEFAULT_CPU_BATCH_SIZE` for images on the CPU, else
            :data:`DEFAULT_BATCH_SIZE`. The curves do not depend on it.
        modes: which curves to compute, any of ``"insertion"``, ``"deletion"``.

    Returns:
        Dict with, for each requested mode, ``<mode>_auc`` (B,) and ``<mode>_curve``
        (B, steps+1), float64 on the images' device (float32 where it has no float64).
    """
    _check_images(images)
    _check_maps(maps, images)
    classes = _check_targets(classes, images.shape[0], name="classes")
    if batch_size == "auto":
        batch_size = DEFAULT_CPU_BATCH_SIZE if images.device.type == "cpu" else DEFAULT_BATCH_SIZE
    _check_batch_size(batch_size)
    _check_curve_options(steps, modes)

    b, c, h, w = images.shape
    pixels_per_step = math.ceil(h * w / steps)
    chunk = batch_size if batch_size is not None else max(1, b * (steps + 1))
    classes = classes.to(images.device)
    ranks = saliency_ranks(maps.to(images.device))

    paths: dict[str, tuple[Tensor, Tensor]] = {}
    if "deletion" in modes:
        paths["deletion"] = (images, _deletion_end(deletion_baseline, images))
    if "insertion" in modes:
        paths["insertion"] = (gaussian_blur(images, blur_kernel, blur_sigma), images)

    out: dict[str, Tensor] = {}
    with _evaluating(model):
        for mode in ("insertion", "deletion"):
            if mode not in paths:
                continue
            start, finish = paths[mode]
            curve = _perturbation_curves(
                model, start, finish, ranks, classes, steps, pixels_per_step, chunk
            )
            out[f"{mode}_auc"] = curve_auc(curve)
            out[f"{mode}_curve"] = curve
    return out
