"""Opti-CAM (Zhang et al., CVIU 2024): saliency maps optimized per image.

With images ``x`` (B,3,H,W) in [0,1], target-layer features ``A`` (B,K,h,w) and one
weight vector ``u`` (K,) per image::

    S(x; u) = sum_k softmax(u)_k A_k                  (B,1,h,w)
    M(x; u) = n(up(S(x; u)))                          (B,1,H,W) in [0,1]
    F(x; u) = g_c(f(x * M(x; u)))                     (B,)

and ``u* = argmax_u F``, found with Adam from ``u = 0`` (the mean feature map). The
network is frozen; only ``u`` is optimized. The loss is the sum of the B objectives, and
Adam is element-wise, so the batch is exactly B independent optimizations.

Cost per call: one forward pass under ``torch.no_grad`` gives both the features ``A`` (a
forward hook on the target layer, removed right after) and the clean logits; then each
iteration is one forward and one backward pass of the masked batch, with no graph kept
for the weights.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opticam.methods.common import (
    Explainer,
    Explanation,
    check_target_range,
    frozen,
    upsample_normalize,
)
from opticam.names import NORMALIZATIONS, OBJECTIVES, SCORES

__all__ = ["OBJECTIVES", "SCORES", "OptiCAM", "capture_features"]

_AMP_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def capture_features(
    model: nn.Module,
    layer: nn.Module,
    images: Tensor,
    *,
    reshape_transform: Callable[[Tensor], Tensor] | None = None,
    autocast: AbstractContextManager[object] | None = None,
) -> tuple[Tensor, Tensor]:
    """One no-grad forward pass: ``(features (B,K,h,w) float32, logits (B,C) float32)``.

    The layer's output is captured by a forward hook that exists only during this pass.
    When the layer runs several times in one forward (a shared module), the last call's
    output is kept. ``reshape_transform`` maps token outputs (B,N,C) to (B,C,h,w).

    Raises:
        ValueError: the layer did not run, or its output is not a (B,K,h,w) tensor.
    """
    captured: list[Tensor] = []
    owner = threading.get_ident()

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if threading.get_ident() != owner:
            return  # another thread's forward through a shared model
        if not isinstance(output, Tensor):
            raise ValueError(
                f"target layer {type(layer).__name__} returns {type(output).__name__}, "
                "not a tensor; choose another layer"
            )
        # A copy: later in-place ops of the model (e.g. ResNet's `out += identity`)
        # must not change the captured features.
        captured[:] = [output.detach().clone()]

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad(), autocast or nullcontext():
            logits = model(images)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(
            f"target layer {type(layer).__name__} did not run in the model's forward pass"
        )
    feats = captured[0]
    if reshape_transform is not None:
        feats = reshape_transform(feats)
    if feats.dim() != 4:
        raise ValueError(
            f"target layer features must be (B,K,h,w), got {tuple(feats.shape)}; "
            "token outputs need a reshape_transform"
        )
    return feats.float(), logits.float()


class OptiCAM(Explainer):
    """Opti-CAM saliency maps; see the module docstring for the formulas.

    Args:
        model: classifier taking (B,3,H,W) images in [0,1].
        target_layer: module whose output gives the features ``A``.
        reshape_transform: maps the layer's output to (B,K,h,w) (ViT tokens), or None.
        relu_features: ReLU the features (CNNs in the paper; not for transformers).
        iterations: at most this many Adam steps (paper: 100).
        lr: Adam learning rate (paper: 0.1).
        objective: ``mask`` maximizes ``g_c(f(x*M))``; ``diff`` minimizes
            ``|g_c(f(x)) - g_c(f(x*M))|``, i.e. maximizes its negative.
        score: ``g_c`` is the ``logit`` (default) or the softmax ``probability`` of c.
        normalization: ``n`` in ``M = n(up(S))``: ``range``, ``max`` or ``sigmoid``.
        tolerance: an image stops (its ``u`` frozen) once its objective changes by less
            than this between consecutive iterations; 1e-10 is the paper's rule.
        amp_dtype: ``bf16`` or ``fp16`` runs the model under CUDA autocast; ignored, with a
            warning, on other devices.

    The explanation is the map of the best ``u`` seen (never worse than the uniform
    start). Diagnostics, each (B,): ``iterations`` (Adam steps applied to the image),
    ``initial_objective`` (at ``u = 0``), ``final_objective`` (at the returned ``u``;
    for ``diff`` both are ``-|g_c(f(x)) - g_c(f(x*M))|``), ``constant_map``.

    Calls from several threads on one model are safe when its parameters are already
    frozen (a LoadedModel's are): the feature hook only records its own thread's pass.
    """

    options: ClassVar[tuple[str, ...]] = (
        "iterations",
        "lr",
        "objective",
        "score",
        "normalization",
        "tolerance",
        "amp_dtype",
    )

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module,
        *,
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        relu_features: bool = True,
        iterations: int = 100,
        lr: float = 0.1,
        objective: str = "mask",
        score: str = "logit",
        normalization: str = "range",
        tolerance: float = 1e-10,
        amp_dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(model)
        if not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r} (known: {', '.join(SCORES)})")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {normalization!r} (known: {', '.join(NORMALIZATIONS)})"
            )
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
        self.target_layer = target_layer
        self.reshape_transform = reshape_transform
        self.relu_features = relu_features
        self.iterations = iterations
        self.lr = float(lr)
        self.objective = objective
        self.score = score
        self.normalization = normalization
        self.tolerance = float(tolerance)
        self.amp_dtype = _parse_amp_dtype(amp_dtype)

    def explain(self, images: Tensor, targets: Tensor | None) -> Explanation:
        """Optimize one ``u`` per image; see the class docstring."""
        autocast = self._autocast(images.device)
        # The feature hook removes itself (try/finally in capture_features); no global
        # hook sweep here, so concurrent calls on one model from other threads are safe.
        with frozen(self.model):
            feats, logits = capture_features(
                self.model,
                self.target_layer,
                images,
                reshape_transform=self.reshape_transform,
                autocast=autocast,
            )
            if self.relu_features:
                feats = F.relu(feats)
            if targets is None:
                targets = logits.argmax(dim=1)
            check_target_range(targets, logits.shape[1])
            clean = self._class_score(logits, targets)
            best_u, diagnostics = self._optimize(images, feats, targets, clean, autocast)
            with torch.no_grad():
                saliency = self._saliency(best_u, feats)
                maps, constant = upsample_normalize(saliency, images.shape[-2:], self.normalization)
        diagnostics["constant_map"] = constant
        return Explanation(maps=maps, saliency=saliency, diagnostics=diagnostics)

    def _optimize(
        self,
        images: Tensor,
        feats: Tensor,
        targets: Tensor,
        clean: Tensor,
        autocast: AbstractContextManager[object],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        batch, channels = feats.shape[:2]
        device = images.device
        # u = 0: softmax is uniform and S is the mean feature map (the paper's start).
        u = torch.zeros(batch, channels, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([u], lr=self.lr)
        scaler = (
            torch.amp.GradScaler("cuda")
            if self.amp_dtype == torch.float16 and device.type == "cuda"
            else None
        )
        best_u = u.detach().clone()
        best = torch.full((batch,), -torch.inf, device=device)
        initial = torch.zeros(batch, device=device)
        previous = torch.zeros(batch, device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        steps = torch.zeros(batch, dtype=torch.long, device=device)

        for step in range(self.iterations + 1):
            # The last pass only scores the final u; it needs no graph.
            last = step == self.iterations
            # Only images still optimizing are forwarded: stopped ones are final.
            rows = active.nonzero().squeeze(1)
            # While every image is active (the usual case) slicing avoids gather copies.
            sel: Tensor | slice = slice(None) if rows.numel() == batch else rows
            with torch.set_grad_enabled(not last):
                saliency = self._saliency(u[sel], feats[sel])
                masks, _ = upsample_normalize(saliency, images.shape[-2:], self.normalization)
                with autocast:
                    out = self.model(images[sel] * masks)
                objective = self._objective(out.float(), targets[sel], clean[sel])

            value = objective.detach()
            if step == 0:
                initial[rows] = value
            improved = value > best[rows]
            best_rows = rows[improved]
            best[best_rows] = value[improved]
            best_u[best_rows] = u.detach()[best_rows]
            if step > 0:
                # The paper's stopping rule, per image.
                done = (value - previous[rows]).abs() < self.tolerance
                active[rows[done]] = False
            previous[rows] = value
            if last or not bool(active.any()):
                break

            optimizer.zero_grad(set_to_none=True)
            # Maximize: minimize the negative sum; stopped images get no gradient.
            loss = -(objective * active[rows].to(objective.dtype)).sum()
            before = u.detach().clone()
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            with torch.no_grad():
                # Adam's momentum would still move a row with zero gradient: pin the
                # stopped rows to the u they stopped at.
                u.copy_(torch.where(active.unsqueeze(1), u, before))
            steps += active.long()

        diagnostics = {
            "iterations": steps,
            "initial_objective": initial,
            "final_objective": best,
        }
        return best_u, diagnostics

    @staticmethod
    def _saliency(u: Tensor, feats: Tensor) -> Tensor:
        """S = sum_k softmax(u)_k A_k: u (B,K), feats (B,K,h,w) -> (B,1,h,w)."""
        weights = torch.softmax(u, dim=1)
        return torch.einsum("bk,bkhw->bhw", weights, feats).unsqueeze(1)

    def _class_score(self, logits: Tensor, targets: Tensor) -> Tensor:
        """g_c: logits (B,C) -> (B,) logit or probability of each image's class."""
        if self.score == "probability":
            logits = torch.softmax(logits, dim=1)
        return logits.gather(1, targets.unsqueeze(1)).squeeze(1)

    def _objective(self, masked_logits: Tensor, targets: Tensor, clean: Tensor) -> Tensor:
        """The quantity maximized, (B,): g_c(f(x*M)) or -|g_c(f(x)) - g_c(f(x*M))|."""
        masked = self._class_score(masked_logits, targets)
        if self.objective == "diff":
            return -(clean - masked).abs()
        return masked

    def _autocast(self, device: torch.device) -> AbstractContextManager[object]:
        if self.amp_dtype is None:
            return nullcontext()
        if device.type != "cuda":
            warnings.warn(
                f"amp_dtype={self.amp_dtype} needs a CUDA device; images are on "
                f"{device.type}, running in float32",
                stacklevel=4,
            )
            return nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)


def _parse_amp_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype) and value == torch.float32:
        return None
    if isinstance(value, torch.dtype) and value in (torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str) and value.lower() in _AMP_DTYPES:
        return _AMP_DTYPES[value.lower()]
    raise ValueError(f"unknown amp_dtype {value!r} (known: None, bf16, fp16)")
